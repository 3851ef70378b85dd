#!/bin/bash
# The final table, one row per call: trained once at 1000 steps, scored once on the test split against the LoRA
# retrained on the target with the learning rate chosen on the validation split (results/retrained_tuning/).
# Writes results/final/<row>/: config.json, log.jsonl, eval.json and the exported LoRA in fp16 (a few MB), so a
# row can be checked and re-scored without training (python evaluate.py --lora results/final/<row>/lora ...).
#
#   bash scripts/final_table.sh forward|reverse|forward_paper|reverse_paper|identity|twin [SEED [CARTRIDGE_SEED]]
#     SEED: train.py --seed (the teacher's text and the batches), row <row>_seed<SEED>;
#     CARTRIDGE_SEED: lora.py --seed of the source's cartridge (default 0), row <row>_cartridge<N>[_seed<SEED>]
#   bash scripts/final_table.sh denominators   # each target's tuned retrained LoRAs (rank 8; Gemma-3 also 16), scored
#                                              # once on test
#
# On 2 CPU cores a cross-family row takes about an hour (the teacher's writing 9 min once, training 42-51 min,
# the test evaluation 12 min; for a seed past 0, CAST's rows only, about 4 min). The models, cartridges and
# retrained LoRAs are remade where missing (the same seeds and settings as the records: the same files on one
# machine, not bit for bit across CPUs; each config.json records the cartridge's hash).
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."
row=${1:?"which row: forward, reverse, forward_paper, reverse_paper, identity, twin, denominators"}
smol=smollm2-135m gemma=gemma3-270m
chosen() {  # chosen NAME FIELD: a field of results/retrained_tuning/NAME-chosen.json (rank: 8 if not recorded)
  python -c "import json; print(json.load(open('results/retrained_tuning/$1-chosen.json')).get('$2', 8))"; }
tuned() {  # the retrained LoRA chosen on validation (NAME: a target, or a target-r16), made again if missing
  local dir rank; dir=$(chosen "$1" adapter) rank=$(chosen "$1" rank)
  [ -f "$dir/adapter_config.json" ] || python -u lora.py --model "$(chosen "$1" model)" --lr "$(chosen "$1" lr)" \
    --steps "$(chosen "$1" steps)" --rank "$rank" --alpha $((2 * rank)) --out "$dir" >&2
  [ -f "$dir/adapter_config.json" ] || { echo "no retrained LoRA at $dir" >&2; exit 1; }
  echo "$dir"
}
cartridge_seed=${3:-0}
cartridge() {  # the cartridges: lora.py's defaults on each source (lr 2e-3, 150 steps), seed CARTRIDGE_SEED
  local dir=$2; [ "$cartridge_seed" = 0 ] || dir=$2-seed$cartridge_seed
  [ -f "$dir/adapter_config.json" ] || python -u lora.py --model "$1" --seed "$cartridge_seed" --out "$dir" >&2
  echo "$dir"
}
if [ "$row" = denominators ]; then  # results/final/retrained-<name>.json: the table's test denominators
  for name in $gemma $smol $gemma-r16; do  # -r16: rank 16, the forward export's rank, tuned as well
    [ -f "results/retrained_tuning/$name-chosen.json" ] || continue
    model=$(chosen $name model) record=results/final/retrained-$name.json adapter=$(tuned $name)
    if [ -f "$record" ]; then
      scored=$(python -c "import json; print(json.load(open('$record'))['lora'])")
      [ "$scored" = "$adapter" ] && continue
      echo "$record scored $scored, but the rate chosen on validation is now $adapter: move it aside first" >&2
      exit 1
    fi
    python -u evaluate.py --lora "$adapter" --model $model --split test --out "$record" 2>&1 \
      | grep --line-buffered -v "Loading weights"
  done
  exit 0
fi
case $row in
  forward)       flags=(--source $smol --cartridge "$(cartridge $smol cartridges/smollm2-arith)" --target $gemma) ;;
  reverse)       flags=(--source $gemma --cartridge "$(cartridge $gemma cartridges/gemma3-270m-arithmetic)" --target $smol) ;;
  forward_paper) flags=(--source $smol --cartridge "$(cartridge $smol cartridges/smollm2-arith)" --target $gemma --paper-recipe) ;;
  reverse_paper) flags=(--source $gemma --cartridge "$(cartridge $gemma cartridges/gemma3-270m-arithmetic)" --target $smol --paper-recipe) ;;
  identity)      flags=(--source $smol --cartridge "$(cartridge $smol cartridges/smollm2-arith)" --target $smol) ;;
  twin)          flags=(--source $smol --cartridge "$(cartridge $smol cartridges/smollm2-arith)" --target rotated:$smol) ;;
  *) echo "unknown row $row" >&2; exit 2 ;;
esac
[ "$cartridge_seed" = 0 ] || row=${row}_cartridge$cartridge_seed
seed=${2:-}  # another seed of a row (train.py --seed: the teacher's text and the batches): results/final/<row>_seed<N>
[ -z "$seed" ] || { flags+=(--seed "$seed"); row=${row}_seed$seed; }
run=runs/final/$row out=results/final/$row
[ -e "$out" ] && { echo "$out exists: a row is scored on the test split once" >&2; exit 1; }
# the denominator: the tuned LoRA retrained on the target; none for the twin (a LoRA of SmolLM2 does not fit its
# rotated weights): its row is read against the teacher, the cartridge on its own source
# rows of another cartridge skip it as well: their denominator is results/final/retrained-<target>*.json
if [[ $row = twin* || $cartridge_seed != 0 ]]; then retrained=none; else retrained=$(tuned "${flags[5]}"); fi
mkdir -p runs/final
if [ ! -f "$run/heads.safetensors" ]; then  # a run trained before an evaluation that failed is not trained again
  append=()  # a training run stopped midway goes on from its last checkpoint (one every 100 steps)
  [ ! -f "$run.partial/checkpoint.pt" ] || { flags+=(--resume); append=(-a); }
  python -u train.py "${flags[@]}" --out "$run" 2>&1 | grep --line-buffered -v "Loading weights" \
    | tee "${append[@]}" "$run.train.txt"
fi
scoring=(--retrained "$retrained")
# the seed moves only the heads (through the teacher's text and the batches): the bases, the teacher, the retrained
# LoRA and the weight-space baseline are scored once per cartridge, in the row of head seed 0 (scripts/plot.py reads
# them from there)
[ "${seed:-0}" = 0 ] || scoring=(--skip-baselines)
python -u evaluate.py --run "$run" "${scoring[@]}" --split test 2>&1 | grep --line-buffered -v "Loading weights" \
  | tee "$run.eval.txt"
mkdir -p "$out.tmp/lora"
cp "$run"/config.json "$run"/log.jsonl "$run"/eval.json "$run.train.txt" "$run.eval.txt" "$out.tmp/"
cp "$run/lora/adapter_config.json" "$out.tmp/lora/"
python -c "
from safetensors.torch import load_file, save_file
t = load_file('$run/lora/adapter_model.safetensors')
save_file({k: v.half() for k, v in t.items()}, '$out.tmp/lora/adapter_model.safetensors', metadata={'format': 'pt'})"
mv "$out.tmp" "$out"
echo "wrote $out (.gitignore lets its fp16 LoRA be committed)"
