#!/bin/bash
# Where a GPU CAST step's extra time goes, at 7B sizes (written at commit 951a96a; not yet run on a GPU).
# On a GPU machine, from the repository root:  bash scripts/probes/gpu_ab.sh   (about 8 min on an H200)
# Three runs of scripts/scale_check.py at batch 4: the default (the teacher cache moved to the GPU once; with
# --profile, the operators that take the GPU's time in a CAST step and in the plain step), the
# cache left on the CPU as before commit 07844c3 (each step copies x_S and the head rows across), and the default
# without the MSE term (--loss kl: no x_S, no P_in x_T at full width). At commit b294653, cache on the CPU: a CAST
# step 0.26-0.34 s against 0.15-0.17 s for the plain step with the same logits.
# Writes $OUT/ab_*.txt (results/step_feed/ without $OUT).
out=${OUT:-results/step_feed}
for flags in "--profile" "--cache-on-cpu" "--loss kl"; do
  name=ab_b4$(echo $flags | tr -d ' -')
  timeout 190 python scripts/scale_check.py --batch-size 4 $flags 2>&1 | grep -v -e "Loading weights" -e USDT > $out/$name.txt
  grep -A4 "^benchmark" $out/$name.txt
done
