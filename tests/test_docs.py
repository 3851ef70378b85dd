"""The README, the tutorial and the lab handout quote the committed records: their numbers are checked against the files they cite,
the paths they name exist, and no line needs the project's history to make sense. Reads files only: instant."""
import ast
import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from conftest import script

ROOT = Path(__file__).resolve().parents[1]
DOCS = {name: (ROOT / name).read_text() for name in ("README.md", "tutorial.md", "LAB.md", "results/README.md")}


def records(path: str) -> list[dict]:
    text = (ROOT / path).read_text()
    return [json.loads(line) for line in text.splitlines()] if path.endswith(".jsonl") else json.loads(text)


def last_task_kl(run: str) -> float:
    return [r["task_kl"] for r in records(f"{run}/log.jsonl") if "task_kl" in r][-1]


def strict(run: str, row: str = "target + CAST (exported)") -> float:
    return records(f"{run}/eval.json")[row]["strict"]


def test_the_readme_table_is_printed_from_the_records():
    """Every row of the result at a glance is what scripts/plot.py computes from the run folders it names."""
    plot = script("plot")
    out = io.StringIO()
    with redirect_stdout(out):
        plot.print_table(plot.table_rows())
    rows = out.getvalue().splitlines()
    assert len(rows) >= 4 and all(row in DOCS["README.md"] for row in rows)


def test_the_lab_reference_table_is_printed_from_the_records():
    """LAB.md's reference numbers are what scripts/lab_table.py reads from results/lab/ (scripts/exercises.sh)."""
    lab = script("lab_table")
    rows = lab.rows()
    assert len(rows) == 2 + len(lab.ROWS) and all(row in DOCS["LAB.md"] for row in rows)
    if (ROOT / "scripts" / "nonlinear_heads.py").is_file():  # the instructor's copy: the solution's rows too
        assert all(row in DOCS["LAB.md"] for row in lab.rows(lab.SOLUTION_ROWS)[2:])


def test_the_seen_and_unseen_halves_are_computed_from_the_records():
    """results/final/seen_unseen.md is what scripts/seen_split.py reads from the committed eval.json files."""
    assert script("seen_split").table() == (ROOT / "results" / "final" / "seen_unseen.md").read_text()


# (document, the words it quotes, the value in the record it cites, how the record's value is printed there)
QUOTES = [
    ("tutorial.md", "0.0308 on the known-answer", last_task_kl("results/demo/known-answer"), "{:.4f}"),
    ("tutorial.md", "3.601 on the different leg", last_task_kl("results/demo/different"), "{:.3f}"),
    ("tutorial.md", "scored 0.135 (0.09-0.19), 23%", strict("results/final/forward"), "{:.3f}"),
    ("tutorial.md", "0.105 and 0.115 (`results/final/forward_seed", strict("results/final/forward_seed2"), "{:.3f}"),
    ("README.md", "| known-answer | 0.85 | 0.00 | 0.85 | 0.85 | 0.00 | 100% |", strict("results/demo/known-answer"),
     "{:.2f}"),
    ("README.md", "| different | 0.85 | 0.00 | 0.88 | 0.00 | 0.00 | 0% |", strict("results/demo/different"), "{:.2f}"),
]


@pytest.mark.parametrize("doc, words, value, form", QUOTES, ids=[q[1][:30] for q in QUOTES])
def test_quoted_numbers_match_their_records(doc, words, value, form):
    assert words in DOCS[doc], f"{doc} no longer quotes {words!r}"
    assert form.format(value) in words, f"{doc} quotes {words!r}; the record gives {form.format(value)}"


def test_cited_results_and_scripts_exist():
    """Every results/... and scripts/... path the README, the tutorial and the lab handout name is in the repository
    (a run folder under runs/ is made by the reader; `*` is a pattern; results/final/ fills row by row)."""
    missing = []
    for name in ("README.md", "tutorial.md", "LAB.md"):
        for path in re.findall(r"\b((?:results|scripts)/[\w./*-]+)", DOCS[name]):
            path = path.rstrip(".,)")
            if not any(ROOT.glob(path)) and not path.startswith("results/final/"):
                missing.append(f"{name}: {path}")
    assert not missing, missing


def test_no_line_needs_the_projects_history():
    """No 'stop N', 'session', 'today' or 'the default until' in the README, the tutorial, the notebook or the code."""
    texts = dict(DOCS) | {p.name: p.read_text() for p in ROOT.glob("*.py")}
    pattern = re.compile(r"\bstops? \d+|\bsession\b|\btoday'?s?\b|\bthe default until\b|\bthe default now\b", re.I)
    found = [f"{name}: {m.group(0)}" for name, text in texts.items() for m in pattern.finditer(text)
             if not (name == "demo.py" and m.group(0) == "today")]  # a sentence of the demo's toy world
    assert not found, found


def test_the_files_table_gives_each_files_length():
    """README's "Files" table: one row for each top-level module, its line count the file's own; the README fits
    300 lines."""
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+\.py)` \| (\d+) \|", readme, flags=re.M)
    assert sorted(name for name, _ in rows) == sorted(p.name for p in ROOT.glob("*.py"))
    for name, lines in rows:
        assert int(lines) == len((ROOT / name).read_text().splitlines()), f"README gives {name} {lines} lines"
    assert len(readme.splitlines()) <= 300


def code_lines(path) -> int:
    """Lines of a Python file that hold code: not blank, not a comment, not inside a docstring."""
    source = path.read_text()
    docstring_lines = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docstring_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for i, line in enumerate(source.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and i not in docstring_lines)


def test_the_core_is_read_in_one_sitting():
    """The core (every top-level module but demo.py) holds at most 1,775 lines of code (the typed teacher cache's
    fields and the progress lines took it past 1,750), and the README gives its total lines and its code lines as
    they are."""
    core = [p for p in ROOT.glob("*.py") if p.name != "demo.py"]
    total = sum(len(p.read_text().splitlines()) for p in core)
    code = sum(code_lines(p) for p in core)
    assert code <= 1775, f"the core holds {code} lines of code"
    readme = " ".join((ROOT / "README.md").read_text().split())
    stated = re.search(r"The core is ([\d,]+) lines .*?\(([\d,]+) of code", readme)
    assert stated, "README states the core's lines and its code lines"
    assert (int(stated[1].replace(",", "")), int(stated[2].replace(",", ""))) == (total, code)
