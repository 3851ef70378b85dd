#!/bin/bash
# LAB.md's reference numbers on the demo pair, made again in one command: the demo (results/lab/demo/), then each
# lab exercise and the assignment's reference, every run at two seeds (train.py --seed 0 and 1: the batches and
# the sampled x_S positions), scored as the demo scores its legs. Writes results/lab/<run>_s<seed>/ (config.json,
# log.jsonl, eval.json) and results/lab/summary.txt (each run's wall time, peak resident memory and last lines).
# tests/test_docs.py checks LAB.md's numbers against these records. One thread (OMP_NUM_THREADS=1, as LAB.md
# asks of students: the thread count moves the tiny models' numbers); about 25 min beside another job.
#
#   bash scripts/exercises.sh
set -euo pipefail
shopt -s inherit_errexit
export OMP_NUM_THREADS=1
cd "$(dirname "$0")/.."
demo=runs/demo ex=runs/lab out=results/lab
timed() {  # timed NAME COMMAND...: run it, keep its printout, add its wall time and peak memory to the summary
  local name=$1; shift
  /usr/bin/time -f "$name wall %e s maxrss %M KB" -o "$ex/$name.time" "$@" 2>&1 | grep -v "Loading weights" \
    > "$ex/$name.txt"
  cat "$ex/$name.time" >> "$out/summary.txt"
  grep -E "^(first batch|task prompts|step [0-9]+/|scored )" "$ex/$name.txt" >> "$out/summary.txt" || true
}
rm -rf "$ex" "$out.tmp" && mkdir -p "$ex" "$out.tmp"
out=$out.tmp  # written whole, then renamed
: > "$out/summary.txt"
timed demo python -u train.py --demo --force
mkdir -p "$out/demo" && cp "$ex/demo.txt" "$out/demo/demo_output.txt" && cat "$ex/demo.time" >> "$out/demo/demo_output.txt"
for leg in known-answer different; do
  mkdir -p "$out/demo/$leg" && cp "$demo/$leg"/{config.json,log.jsonl,eval.json} "$out/demo/$leg/"
done
# one leg of the demo by hand (LAB.md's $PAIR), and one change per run
pair=(--source $demo/models/source --cartridge $demo/cartridge --corpus $demo/world/corpus.txt
      --task $demo/world/task.jsonl --seq-len 64 --max-chunks 0 --steps 300 --monitor 16
      --monitor-every 100 --log-every 50 --cache-mb 256)
score=(--task $demo/world/task.jsonl --n 100 --n-held 100)
declare -A change=(
  [known]="--target $demo/models/twin"                              # the known-answer leg, as the demo
  [known_ridgein]="--target $demo/models/twin --init ridge-in"      # exercise 1: the zero-effect start
  [different]="--target $demo/models/gemma"                         # the different leg, as the demo
  [different_s100]="--target $demo/models/gemma --steps 100"        # exercise 2: fewer steps, more steps
  [different_s1000]="--target $demo/models/gemma --steps 1000"
  [different_kl]="--target $demo/models/gemma --loss kl"            # exercise 3: one term of the loss
  [different_mse]="--target $demo/models/gemma --loss mse"
  [different_lr1e-2]="--target $demo/models/gemma --lr 1e-2"        # exercise 4: ten times the step
  [different_mlp]="--target $demo/models/gemma"                     # the assignment: the nonlinear heads
)
for name in known known_ridgein different different_s100 different_s1000 different_kl different_mse different_lr1e-2 \
            different_mlp; do
  retrained=$demo/retrained-twin
  [[ $name = different* ]] && retrained=$demo/retrained-gemma
  trainer=(python -u train.py) scorer=(python -u evaluate.py)
  [ "$name" = different_mlp ] && trainer=(python -u scripts/nonlinear_heads.py train) \
    && scorer=(python -u scripts/nonlinear_heads.py evaluate)
  for seed in 0 1; do
    run=${name}_s$seed
    # shellcheck disable=SC2086  # the change is several words
    timed "$run" "${trainer[@]}" "${pair[@]}" ${change[$name]} --seed $seed --out "$ex/$run" --force
    timed "$run.eval" "${scorer[@]}" --run "$ex/$run" --retrained "$retrained" "${score[@]}"
    mkdir -p "$out/$run" && cp "$ex/$run"/{config.json,log.jsonl,eval.json} "$out/$run/"
    [ ! -f "$ex/$run/nonlinear.json" ] || cp "$ex/$run/nonlinear.json" "$out/$run/"
  done
done
rm -rf results/lab && mv "$out" results/lab
echo "wrote results/lab/ (summary.txt)"
