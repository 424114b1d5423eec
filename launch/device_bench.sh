#!/usr/bin/env bash
# The GPU measurement for the README's performance section, as one short run on a lent accelerator (the device
# tool's `run`, from the repository root; results as JSON under $OUT, default ./bench_out). Needs a CUDA build of
# JAX there (`pip install "jax[cuda12]"`, or carried wheels) besides this package; PEFT/torch are optional (without
# them the --vs-peft rows are skipped). Each bench prints step time, tokens/s and utilisation of the device's
# bf16 peak (bench.PEAK_FLOPS: H100/H200 989 TFLOP/s). About 5 minutes on an H100.
set -uo pipefail
out="${OUT:-bench_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python -c "import jax; print(jax.devices())" | tee "$out/devices.txt"
peft=$(python -c "import peft, torch" 2>/dev/null && echo --vs-peft)
# ../shared does not travel to a device machine: copy data/superglue/rte and tokenizers/llama2 of it into a folder
# that .git/info/exclude ignores, name that folder in `carry`, and set FIXTURES to it
fixtures="${FIXTURES:-../shared/fixtures}"
# the attention implementations side by side (models.attention: xla, cudnn, pallas; cpu is the CPU's), L = 1024 and 4096
for len in 1024 4096; do
  timeout 120 python -m jaxprompt.cli bench --attention --attention-length "$len" --dtype bfloat16 \
    --json "$out/attention_${len}.json" 2>&1 | grep -v Warning
done
rte="$fixtures/data/superglue/rte/train.jsonl"
for preset in t5-v1_1-small llama-small; do
  for dtype in bfloat16 float32; do
    timeout 150 python -m jaxprompt.cli bench --preset "$preset" --dtype "$dtype" --no-generation $peft \
      --json "$out/${preset}_${dtype}.json" 2>&1 | grep -v Warning
  done
  if [ -f "$rte" ]; then  # the real-data bench
    timeout 150 python -m jaxprompt.cli bench --preset "$preset" --data "$rte" --task rte \
      --tokenizer "$fixtures/tokenizers/llama2" --iters 8 $peft --json "$out/${preset}_rte.json" 2>&1 | grep -v Warning
  fi
done
