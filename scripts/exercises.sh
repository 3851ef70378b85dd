#!/bin/bash
# The tutorial's reference numbers on the demo pair, made again in one command: the demo (results/demo/), then
# each exercise run that changes only flags, scored as the demo scores its legs (results/demo_exercises/<run>/
# with config.json, log.jsonl, eval.json, and summary.txt: each run's wall time, peak resident memory and last
# lines). Exercises 1 and 2 change the code, so their numbers are the reader's to make. About 4 min on 2 idle
# cores; beside other work, prefix OMP_NUM_THREADS=1.
#
#   bash scripts/exercises.sh
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
demo=runs/demo ex=runs/ex out=results/demo_exercises
timed() {  # timed NAME COMMAND...: run it, keep its printout, add its wall time and peak memory to the summary
  local name=$1; shift
  /usr/bin/time -f "$name wall %e s maxrss %M KB" -o "$ex/$name.time" "$@" 2>&1 | grep -v "Loading weights" \
    > "$ex/$name.txt"
  cat "$ex/$name.time" >> "$out/summary.txt"
  grep -E "^(first batch|task prompts|step [0-9]+/|\| target \+)" "$ex/$name.txt" >> "$out/summary.txt" || true
}
mkdir -p "$ex" "$out"
: > "$out/summary.txt"
timed demo python -u train.py --demo --force
cp "$ex/demo.txt" results/demo/demo_output.txt
cat "$ex/demo.time" >> results/demo/demo_output.txt
for leg in known-answer different; do
  mkdir -p "results/demo/$leg" && cp "$demo/$leg"/{config.json,log.jsonl,eval.json} "results/demo/$leg/"
done
# the demo's known-answer leg (demo.py), and one change of flags per run
leg=(--source $demo/models/source --cartridge $demo/cartridge --target $demo/models/twin
     --corpus $demo/world/corpus.txt --task $demo/world/task.jsonl --steps 300 --seq-len 64 --max-chunks 0
     --monitor 16 --monitor-every 100 --log-every 50 --cache-mb 256)
score=(--task $demo/world/task.jsonl --n 100 --n-held 100)
declare -A change=(
  [known_s100]="--steps 100"              # exercise 3: fewer steps
  [known_ridgein]="--init ridge-in"       # exercise 4: the zero-effect start instead of --init auto's ridge
  [identity]="--target $demo/models/source"  # exercise 6: the identity pair
  [known_kl]="--loss kl"                  # exercise 7: the paper's ablations
  [known_mse]="--loss mse"
)
for name in known_s100 known_ridgein identity known_kl known_mse; do
  retrained=$demo/retrained-twin
  [ "$name" = identity ] && retrained=$demo/cartridge  # a LoRA trained on the source is the cartridge itself
  # shellcheck disable=SC2086  # the change is several words
  timed "$name" python -u train.py "${leg[@]}" ${change[$name]} --out "$ex/$name" --force
  timed "$name.eval" python -u evaluate.py --run "$ex/$name" --retrained "$retrained" "${score[@]}"
  mkdir -p "$out/$name" && cp "$ex/$name"/{config.json,log.jsonl,eval.json} "$out/$name/"
done
echo "wrote results/demo/ and $out/ (summary.txt)"
