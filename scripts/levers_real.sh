#!/bin/bash
# The levers on the text and the heads, on the embedded pair (SmolLM2 -> Gemma-3, forward), one rung per call:
# 300 steps each, scored on the validation split (CAST rows only: the pair's base, teacher and retrained rows are
# those of the default's runs). Writes results/levers/<rung>/ (config.json, log.jsonl, eval.json, printouts).
#
#   bash scripts/levers_real.sh default|factored|effect|onpolicy
#
# default: python train.py as it is; factored: scripts/factored_heads.py (A_T, B_T trained directly); effect:
# scripts/effect_text.py keeps the 300 of 3,000 candidates (the teacher's 300 samples, 2,700 docstring chunks)
# where the cartridge changes the source most; onpolicy: scripts/on_policy.py, three rounds of 100 steps. On 2
# CPU cores about 25 min a rung (the effect scoring adds about 10 min).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
rung=${1:?"which rung: default, factored, effect, onpolicy"}
run=runs/levers/${rung}_s300 out=results/levers/${rung}_s300
[ -e "$out" ] && { echo "$out exists" >&2; exit 1; }
mkdir -p runs/levers
common=(--steps 300 --out "$run")
log() { grep --line-buffered -v "Loading weights" | tee "$run.$1.txt"; }
if [ ! -f "$run/heads.safetensors" ]; then
  case $rung in
    default)  python -u train.py "${common[@]}" 2>&1 | log train ;;
    factored) python -u scripts/factored_heads.py "${common[@]}" 2>&1 | log train ;;
    effect)   [ -f runs/levers/effect.jsonl ] || python -u scripts/effect_text.py --out runs/levers/effect.jsonl 2>&1 \
                | grep -v "Loading weights" | tee runs/levers/effect_text.txt
              python -u train.py --corpus runs/levers/effect.jsonl --max-chunks 0 "${common[@]}" 2>&1 | log train ;;
    onpolicy) python -u scripts/on_policy.py --rounds 3 "${common[@]}" 2>&1 | log train ;;
    *) echo "unknown rung $rung" >&2; exit 2 ;;
  esac
fi
python -u evaluate.py --run "$run" --skip-baselines 2>&1 | log eval
mkdir -p "$out.tmp"
cp "$run"/config.json "$run"/log.jsonl "$run"/eval.json "$run.train.txt" "$run.eval.txt" "$out.tmp/"
[ "$rung" != effect ] || cp runs/levers/effect_text.txt "$out.tmp/"
mv "$out.tmp" "$out"
echo "wrote $out"
