#!/usr/bin/env bash
# The GPU checks of #14 in one call on a lent GPU machine (Python 3.12, torch, no network), ~10 minutes:
#   bash ../shared/device/bundle.sh mini-imagenet-lite        (here, once: .device/ with higher, learn2learn, data)
#   device run, carrying .device:  bash .device/gpu-setup.sh && export PYTHONPATH=/tmp/site && bash benchmarks/gpu_session.sh
# Writes into $OUT (or benchmarks/results): the meta-training benchmark (<4 min), the episode pipeline with the
# augmentation on the GPU (<2 min), the precision check, test output.
# A dry run on a CPU: GPU_SESSION_DRY=1 PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh (tiny settings).
set -uo pipefail
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
data=.device/data/mini-imagenet-lite
[ -d "$data" ] || data=../shared/data/mini-imagenet-lite
if [ -n "${GPU_SESSION_DRY:-}" ]; then
  bench=(--quick --rounds 1) precision=(--tasks 8 --episodes 5 --val-episodes 2) pipeline=(--episodes 16 --workers 0 1)
else
  bench=() precision=(--tasks 2000 --episodes 500 --parallel-tasks 8 --parallel-episodes 16) pipeline=(--episodes 400 --workers 4 8)
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee "$out/gpu.txt"
"$py" -m pytest -q tests/test_gpu.py 2>&1 | tail -5 | tee "$out/test_gpu.txt"
start=$(date +%s)
timeout 300 "$py" benchmarks/meta_train_speed.py "${bench[@]}" --out "$out" 2>&1 | tail -40
echo "make bench equivalent: $(( $(date +%s) - start )) s"
timeout 150 "$py" benchmarks/episode_pipeline.py --skip-memory --data-root "$data" "${pipeline[@]}" --out "$out" 2>&1 \
  | tail -14
"$py" benchmarks/precision_check.py --data-root "$data" --archs conv4 "${precision[@]}" --out "$out" 2>&1 | tail -12
