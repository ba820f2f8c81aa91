#!/usr/bin/env bash
# The GPU checks of #14 in one call on a lent GPU machine (Python 3.12, torch, no network), ~10 minutes:
#   bash ../shared/device/bundle.sh mini-imagenet-lite        (here, once: .device/ with higher, learn2learn, data)
#   device run, carrying .device:  bash .device/gpu-setup.sh && export PYTHONPATH=/tmp/site && bash benchmarks/gpu_session.sh
# Writes into $OUT (or benchmarks/results): the meta-training benchmark (<4 min), the episode pipeline with the
# augmentation on the GPU (<2 min), the precision check, test output.
# A dry run on a CPU, as CI runs it (#37): GPU_SESSION_DRY=1 OUT=$(mktemp -d) PYTHON=.venv/bin/python bash
# benchmarks/gpu_session.sh (tiny settings): every benchmark starts, parses its arguments and writes its file, or
# the script exits 1 naming it, so a broken interface fails CI instead of a lent GPU's 15 minutes.
set -uo pipefail
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
data=.device/data/mini-imagenet-lite
[ -d "$data" ] || data=../shared/data/mini-imagenet-lite
if [ -n "${GPU_SESSION_DRY:-}" ]; then
  bench=(--quick --rounds 1 --archs conv4 --meta-batch 1 --image-size 16) precision=(--tasks 8 --episodes 5 --val-episodes 2) pipeline=(--episodes 16 --workers 0)
else
  bench=() precision=(--tasks 2000 --episodes 500 --parallel-tasks 8 --parallel-episodes 16) pipeline=(--episodes 400 --workers 4 8)
fi
failed=()
# step NAME CODE BEFORE: a step failed if it exited non-zero or wrote no new file into $out
step() {
  local files
  files=$(find "$out" -maxdepth 1 -type f -newer "$3" | wc -l)
  if [ "$2" != 0 ] || [ "$files" = 0 ]; then
    echo "gpu_session: $1 failed (exit $2, $files new files in $out)"
    failed+=("$1")
  fi
}
mark() { local m; m=$(mktemp); sleep 1; echo "$m"; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee "$out/gpu.txt"
m=$(mark); "$py" -m pytest -q tests/test_gpu.py 2>&1 | tail -5 | tee "$out/test_gpu.txt"; step tests/test_gpu.py "${PIPESTATUS[0]}" "$m"
start=$(date +%s)
m=$(mark); timeout 300 "$py" benchmarks/meta_train_speed.py "${bench[@]}" --out "$out" 2>&1 | tail -40
step benchmarks/meta_train_speed.py "${PIPESTATUS[0]}" "$m"
echo "make bench equivalent: $(( $(date +%s) - start )) s"
m=$(mark); timeout 150 "$py" benchmarks/episode_pipeline.py --skip-memory --data-root "$data" "${pipeline[@]}" --out "$out" 2>&1 \
  | tail -14
step benchmarks/episode_pipeline.py "${PIPESTATUS[0]}" "$m"
m=$(mark); "$py" benchmarks/precision_check.py --data-root "$data" --archs conv4 "${precision[@]}" --out "$out" 2>&1 | tail -12
step benchmarks/precision_check.py "${PIPESTATUS[0]}" "$m"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_session: ${#failed[@]} step(s) failed: ${failed[*]}"
  exit 1
fi
echo "gpu_session: every step ran and wrote its file into $out"
