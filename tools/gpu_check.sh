#!/usr/bin/env bash
# The GPU checks of issue 13 in one call on a lent GPU machine: the CUDA tests (tests/test_cuda.py: CUDA
# against the CPU), then benchmarks/bench_merge.py on the ViT-B/32-sized task set (12 blocks, 8 tasks)
# with its profiles, and its TIES rows again without mergelib's kernels (the torch code on CUDA). Everything lands in $OUT (default gpu_out/): logs, the table (markdown, JSON), the
# profiler tables. Uses the machine's own python3 and packages (torch, numpy, pytest, psutil, peft).
#
#   bash tools/gpu_check.sh                # on the GPU machine
#   GPU_CHECK_DRY=1 bash tools/gpu_check.sh  # here, on the CPU, tiny sizes: the script's own dry run
set -u
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${GPU_CHECK_DRY:-}" ]; then
  export MERGELIB_TEST_DEVICE=cpu
  bench_args=(--device cpu --blocks 1 --tasks 3 --repeats 1)
else
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.sm,driver_version --format=csv | tee "$OUT/nvidia_smi.txt"
  bench_args=()
fi
$PY -c "import torch, numpy, platform; print('python', platform.python_version(), 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'device', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$OUT/env.txt"

echo "== tests/test_cuda.py"
timeout 150 $PY -m pytest -q -p no:cacheprovider -ra tests/test_cuda.py > "$OUT/test_cuda.log" 2>&1
echo "rc=$?" >> "$OUT/test_cuda.log"
tail -n 25 "$OUT/test_cuda.log"

echo "== benchmarks/bench_merge.py"
timeout 240 $PY benchmarks/bench_merge.py "${bench_args[@]}" --json "$OUT/bench_gpu.json" \
  --markdown "$OUT/bench_gpu.md" --profile "$OUT/bench_gpu_profiles.txt" > "$OUT/bench.log" 2>&1
echo "rc=$?" >> "$OUT/bench.log"
tail -n 40 "$OUT/bench.log"

echo "== benchmarks/bench_merge.py --kernels torch (TIES without the Triton kernels, for comparison)"
timeout 90 $PY benchmarks/bench_merge.py "${bench_args[@]}" --kernels torch --skip-naive --methods "TIES" \
  --markdown "$OUT/bench_gpu_torch.md" > "$OUT/bench_torch.log" 2>&1
echo "rc=$?" >> "$OUT/bench_torch.log"
tail -n 12 "$OUT/bench_torch.log"
