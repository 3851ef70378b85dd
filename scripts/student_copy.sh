#!/bin/bash
# The students' copy of the repository for LAB.md's assignment: the committed tree without the reference solution
# of the nonlinear heads (scripts/nonlinear_heads.py, its test, its records and LAB.md's instructor notes), then
# the documentation tests and the test collection run inside it, so the copy is known to be whole.
#
#   bash scripts/student_copy.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?"where to write the students' copy"}
[ ! -e "$out" ] || { echo "$out exists: choose another folder" >&2; exit 1; }
mkdir -p "$out"
git archive HEAD | tar -x -C "$out"
rm -f "$out/scripts/nonlinear_heads.py"
rm -rf "$out"/results/lab/different_mlp_s*
python - "$out" <<'PY'
import re, sys
from pathlib import Path
out = Path(sys.argv[1])
lab = out / "LAB.md"  # the instructor's notes sit between <!-- instructor --> and <!-- /instructor -->
lab.write_text(re.sub(r"<!-- instructor -->.*?<!-- /instructor -->\n?", "", lab.read_text(), flags=re.S))
tests = out / "tests" / "test_train.py"  # the solution's test, up to the next test or the end of the file
tests.write_text(re.sub(r"\n\n\ndef test_nonlinear_heads_.*?(?=\n\n\ndef |\Z)", "", tests.read_text(), flags=re.S))
script = out / "scripts" / "exercises.sh"  # the exercises without the solution's runs
script.write_text(script.read_text().replace(" \\\n            different_mlp;", ";"))
PY
(cd "$out" && python -m pytest -q tests/test_docs.py && python -m pytest -q --co tests | tail -1)
echo "wrote $out: the repository without the assignment's reference solution"
