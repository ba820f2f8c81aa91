#!/usr/bin/env bash
# The GPU checks in two calls of at most 5 minutes each on a lent GPU machine (Python 3.12, torch, no network), #47:
#   here, once:   bash ../shared/device/bundle.sh mini-imagenet-lite     (.device/: higher, learn2learn, the fixture)
#   call 1:       device run, carrying .device, timeout_s=330:
#                 bash .device/gpu-setup.sh && export PYTHONPATH=/tmp/site && bash benchmarks/gpu_session.sh 1
#   call 2:       the same with `bash benchmarks/gpu_session.sh 2`, on the still-warm machine
# Call 1: the machine's versions; tests/test_gpu.py on the fixture that travelled in .device/data (a skip that this
#         machine should not have fails the session, naming the test); `fsl train` of a conv4 and a ResNet-12 cell
#         with `auto` (benchmarks/gpu_pipeline.py: tasks/s, input wait, auto's group, the probe's MiB per task beside
#         benchmarks/step_memory.py's count).
# Call 2: the noise-batch speed rows beside learn2learn (benchmarks/meta_train_speed.py, written after each arch);
#         the episode pipeline with the augmentation on the GPU; the precision check.
# Every step has its own `timeout` and writes its file into $OUT (or benchmarks/results) as it finishes; a step
# failed if it exited non-zero or wrote no new file. Each call stays under 5 minutes on an H100 (budgets below).
# A dry run on a CPU, as CI runs it (#37): GPU_SESSION_DRY=1 OUT=$(mktemp -d) PYTHON=.venv/bin/python bash
# benchmarks/gpu_session.sh all (tiny settings; both calls): every step starts, parses its arguments and writes its
# file, or the script exits 1 naming it, so a broken interface fails CI instead of a lent GPU's 15 minutes.
set -uo pipefail
part=${1:-}
case "$part" in 1|2|all) ;; *) echo "usage: bash benchmarks/gpu_session.sh 1|2|all (module header)" >&2; exit 2;; esac
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
fixtures=.device/data
data=$fixtures/mini-imagenet-lite
if [ ! -d "$data" ]; then
  if [ -z "${GPU_SESSION_DRY:-}" ]; then
    echo "gpu_session: $data not found: the fixture must travel with the call; fix: bash ../shared/device/bundle.sh" \
         "mini-imagenet-lite here, and carry .device" >&2
    exit 1
  fi
  fixtures=../shared/data data=../shared/data/mini-imagenet-lite
fi
export FSL_SHARED_DATA=$fixtures  # tests/conftest.py reads the fixtures from here
if [ -n "${GPU_SESSION_DRY:-}" ]; then
  allowed_skips="needs a CUDA GPU|needs 2 CUDA GPUs|no bf16 on this GPU"
  bench=(--quick --rounds 1 --archs conv4 --meta-batch 1 --image-size 16) precision=(--tasks 4 --episodes 5 --val-episodes 2)
  pipeline=(--episodes 16 --workers 0 --repeats 1 --rounds 1 --host-batches 2 --photo-classes 5 --consumer-rates 100)
  train=(--archs conv4 --tasks 8 --timeout 240 data.image_size=28 train.meta_batch=2 train.queries=2 data.workers=0
         train.val_episodes=4)
  budget=(240 240 240 240 240)
else
  allowed_skips="needs 2 CUDA GPUs"  # this machine has one GPU
  bench=(--archs conv4 resnet12 --rounds 3) precision=(--tasks 2000 --episodes 500 --parallel-tasks 8 --parallel-episodes 16)
  pipeline=(--episodes 400 --workers 4 8 --repeats 1 --rounds 2 --consumer-rates 100)
  train=(--archs conv4 resnet12 --tasks 400 96 --timeout 100)
  # seconds per step: test_gpu, the two fsl train runs | meta_train_speed, episode_pipeline, precision_check
  budget=(60 220 170 70 70)
fi
failed=()
# step NAME CODE BEFORE: a step failed if it exited non-zero or wrote no new file into $out; its seconds since its
# mark (BEFORE's time) are printed, so a CI log shows where the dry session's minutes go
step() {
  local files
  files=$(find "$out" -maxdepth 1 -type f -newer "$3" | wc -l)
  echo "gpu_session: $1 took $(( $(date +%s) - $(stat -c %Y "$3") )) s"
  if [ "$2" != 0 ] || [ "$files" = 0 ]; then
    echo "gpu_session: $1 failed (exit $2, $files new files in $out)"
    failed+=("$1")
  fi
}
mark() { local m; m=$(mktemp); sleep 1; echo "$m"; }

if [ "$part" = 1 ] || [ "$part" = all ]; then
  m=$(mark)
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$py" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}")'
  } | tee "$out/environment.txt"
  step environment "${PIPESTATUS[0]}" "$m"
  m=$(mark)
  timeout "${budget[0]}" "$py" -m pytest -q -rs tests/test_gpu.py > "$out/test_gpu.txt" 2>&1
  code=$?
  tail -8 "$out/test_gpu.txt"
  unexpected=$(grep '^SKIPPED' "$out/test_gpu.txt" | grep -Ev "$allowed_skips")
  if [ -n "$unexpected" ]; then
    echo "gpu_session: tests/test_gpu.py skipped what this machine should run:"; echo "$unexpected"; code=1
  fi
  step tests/test_gpu.py "$code" "$m"
  m=$(mark); timeout "${budget[1]}" "$py" benchmarks/gpu_pipeline.py --data-root "$data" "${train[@]}" --out "$out" 2>&1 | tail -6
  step benchmarks/gpu_pipeline.py "${PIPESTATUS[0]}" "$m"
fi
if [ "$part" = 2 ] || [ "$part" = all ]; then
  m=$(mark); timeout "${budget[2]}" "$py" benchmarks/meta_train_speed.py "${bench[@]}" --out "$out" 2>&1 | tail -30
  step benchmarks/meta_train_speed.py "${PIPESTATUS[0]}" "$m"
  m=$(mark); timeout "${budget[3]}" "$py" benchmarks/episode_pipeline.py --skip-memory --data-root "$data" "${pipeline[@]}" \
    --out "$out" 2>&1 | tail -14
  step benchmarks/episode_pipeline.py "${PIPESTATUS[0]}" "$m"
  m=$(mark); timeout "${budget[4]}" "$py" benchmarks/precision_check.py --data-root "$data" --archs conv4 "${precision[@]}" \
    --out "$out" 2>&1 | tail -12
  step benchmarks/precision_check.py "${PIPESTATUS[0]}" "$m"
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_session: ${#failed[@]} step(s) failed: ${failed[*]}"
  exit 1
fi
echo "gpu_session: call $part: every step ran and wrote its file into $out"
