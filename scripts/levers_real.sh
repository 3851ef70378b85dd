#!/bin/bash
# The levers on the text and the heads, on the embedded pair (SmolLM2 -> Gemma-3, forward), one rung per call:
# 300 steps each (STEPS= sets another count), scored on the validation split (CAST rows only: the pair's base,
# teacher and retrained rows are those of the default's runs). Writes results/levers/<rung>/ (config.json,
# log.jsonl, eval.json, printouts, and the text a rung wrote or chose).
#
#   bash scripts/levers_real.sh default|factored|effect|weighted|onpolicy|amplified1|amplified2 [TAG]
#   STEPS=1000 bash scripts/levers_real.sh weighted c58c0     # a longer rung: results/levers/weighted_c58c0_s1000/
#
# TAG names a second run of a rung (results/levers/<rung>_<TAG>_s300/), e.g. the default again with a cartridge
# remade on another machine: lora.py is deterministic on one machine, not across CPUs (config.json records the
# cartridge's hash), so rungs are compared with a default that used the same cartridge.
#
# default: python train.py as it is; factored: scripts/factored_heads.py (A_T, B_T trained directly); effect:
# scripts/effect_text.py keeps the 316 of 3,000 candidates (the teacher's 300 samples, 2,700 docstring chunks)
# where the cartridge changes the source most; weighted: scripts/effect_weighted.py, the default's text with
# each aligned position's KL weighted by the cartridge's effect there; onpolicy: scripts/on_policy.py, three
# rounds of 100 steps; amplified1, amplified2: scripts/amplified_text.py, prompt-format samples written by an
# amplified teacher (g = 1, 2). A corpus file loses 5% of its texts to train.py's held-out split, so the text levers keep 316
# texts for the default's 300 chunks. On 2 CPU cores about 25 min a rung (writing or scoring text adds 10-20).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
rung=${1:?"which rung: default, factored, effect, weighted, onpolicy, amplified1, amplified2"}
steps=${STEPS:-300}
name=$rung${2:+_$2}_s$steps
run=runs/levers/$name out=results/levers/$name
[ -e "$out" ] && { echo "$out exists" >&2; exit 1; }
mkdir -p runs/levers
common=(--steps "$steps" --out "$run")
# a rung stopped midway goes on from its last checkpoint (train.py --resume; on-policy's rounds are not resumed)
append=()
[ "$rung" = onpolicy ] || [ ! -f "$run.partial/checkpoint.pt" ] || { common+=(--resume); append=(-a); }
log() { grep --line-buffered -v "Loading weights" | tee "${append[@]}" "$run.$1.txt"; }
if [ ! -f "$run/heads.safetensors" ]; then
  case $rung in
    default)  python -u train.py "${common[@]}" 2>&1 | log train ;;
    detached) python -u train.py --mse-detach "${common[@]}" 2>&1 | log train ;;
    factored) python -u scripts/factored_heads.py "${common[@]}" 2>&1 | log train ;;
    effect)   [ -f runs/levers/effect.jsonl ] || python -u scripts/effect_text.py --keep 316 --out runs/levers/effect.jsonl 2>&1 \
                | grep -v "Loading weights" | tee runs/levers/effect_text.txt
              python -u train.py --corpus runs/levers/effect.jsonl "${common[@]}" 2>&1 | log train ;;
    weighted) python -u scripts/effect_weighted.py "${common[@]}" 2>&1 | log train ;;
    onpolicy) python -u scripts/on_policy.py --rounds 3 "${common[@]}" 2>&1 | log train ;;
    amplified[12]) text=runs/levers/$rung.jsonl
              [ -f "$text" ] || python -u scripts/amplified_text.py --gain "${rung#amplified}" --n 316 --out "$text" 2>&1 \
                | grep -v "Loading weights" | tee "runs/levers/$rung.text.txt"
              python -u train.py --corpus "$text" "${common[@]}" 2>&1 | log train ;;
    *) echo "unknown rung $rung" >&2; exit 2 ;;
  esac
fi
python -u evaluate.py --run "$run" --skip-baselines 2>&1 | log eval
mkdir -p "$out.tmp"
cp "$run"/config.json "$run"/log.jsonl "$run"/eval.json "$run.train.txt" "$run.eval.txt" "$out.tmp/"
[ "$rung" != effect ] || cp runs/levers/effect_text.txt runs/levers/effect.jsonl "$out.tmp/"
[[ "$rung" != amplified* ]] || cp "runs/levers/$rung.text.txt" "runs/levers/$rung.jsonl" "$out.tmp/"
[ "$rung" != onpolicy ] || cp "$run"/student_round*.jsonl "$out.tmp/"
mv "$out.tmp" "$out"
echo "wrote $out"
