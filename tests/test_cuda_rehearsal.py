"""The GPU path's defects of issue #47, each reproduced on a CPU in a CUDA rehearsal (fsl.device.rehearsal): torch's
public CUDA functions run as shipped, with their argument checks, and only the driver's entry points in torch._C are
faked. What only a real GPU can check is in tests/test_gpu.py."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import REPO
from test_gpu_path import CONFIG, tiny, weights
from test_maml import batch_of, make_episode

from fsl.config import ConfigError, ModelConfig, load_config
from fsl.device.distributed import resolve_device
from fsl.device.rehearsal import GiB, rehearsal
from fsl.maml import InnerLoop, batching, meta_optimizer, meta_train_step
from fsl.models import build_model
from fsl.train import meta_test
from fsl.train import meta_train as train


def on_cuda(tmp_path, *extra):
    return [*(s for s in tiny(tmp_path, *extra) if s != "device=cpu"), "device=cuda"]


def test_the_rehearsal_keeps_torchs_own_argument_checks():
    """torch.cuda.set_device of a device without an index is refused by torch itself, as on a GPU machine (a stub of
    set_device hid the crash of #47.1); torch is as it was after the block."""
    with rehearsal(devices=2) as driver:
        assert torch.cuda.is_available() and torch.cuda.device_count() == 2
        with pytest.raises(ValueError, match="Expected a torch.device with a specified index"):
            torch.cuda.set_device(torch.device("cuda"))
        torch.cuda.set_device(torch.device("cuda", 1))
        assert torch.cuda.current_device() == 1
        with pytest.raises(RuntimeError, match="invalid device ordinal"):
            torch.cuda.set_device(2)
        assert ("cudaSetDevice(1)", "MainThread") in driver.calls
    assert not torch.cuda.is_available()


def test_device_cuda_without_an_index_resolves_to_the_current_gpu():
    with rehearsal(devices=2):
        assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 0)
        assert resolve_device("cuda:1") == torch.device("cuda", 1)
        with pytest.raises(ConfigError, match=r"device=cuda:2 but torch sees 2 CUDA GPU\(s\) .* fix: device=cuda"):
            resolve_device("cuda:2")
    with pytest.raises(ConfigError, match="device=cuda but torch sees no CUDA GPU"):
        resolve_device("cuda")


def test_fsl_train_and_test_with_device_cuda_reach_their_steps(tmp_path):
    """#47.1: every single-GPU run crashed on its first batch: the producer thread called torch.cuda.set_device with
    torch.device('cuda'), which torch refuses. Now the whole run goes through, the producer thread on its side
    stream: it selects the run's GPU, builds on a stream of its own and records an event the step waits for."""
    cfg = load_config(CONFIG, on_cuda(tmp_path, "train.tasks=8", "train.val_every=8"))
    with rehearsal() as driver:
        best = train.run(cfg)
        row = meta_test.run(cfg, best)
    log = pd.read_csv(cfg.run_dir / "log.csv")
    assert log[log.split == "train"].tasks.max() == 8 and (log.split == "val").sum() == 1
    assert row["episodes"] == 4 and 0 <= row["mean_acc"] <= 100
    producer = [name for name, thread in driver.calls if thread == "fsl-episode-stream"]
    assert producer[:1] == ["cudaSetDevice(0)"] and "cudaEventRecord" in producer
    assert ("cudaStreamWaitEvent", "MainThread") in driver.calls and ("recordStream", "MainThread") in driver.calls
    assert ("cudaHostAlloc", "fsl-episode-stream") in driver.calls  # labels pinned before their copy
    assert "cuda" in weights(cfg.run_dir)["config"]["device"]


def test_bf16_trains_a_cell_whose_batch_norm_has_no_scale():
    """#47.2: with model.bn_scale=false (every Omniglot cell) the constant scale was made in the input's dtype
    (bfloat16 under autocast) while the bias stayed float32: 'expected scalar type BFloat16 but found Float'."""
    torch.manual_seed(0)
    model = build_model("conv4", ways=3, image_size=16, options=ModelConfig(bn_scale=False))
    optimizer = meta_optimizer(list(model.parameters()), 1e-3)
    episodes = batch_of(make_episode(), make_episode(seed=1))
    episodes = type(episodes)(*(t.float() if t.is_floating_point() else t for t in episodes))
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums = meta_train_step(model, optimizer, episodes, InnerLoop(1, 0.1))
    assert torch.isfinite(sums).all()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_a_checkpoint_from_a_machine_with_more_gpus_resumes_on_one(tmp_path):
    """#47.7: the CUDA RNG states of every visible GPU were saved and restored by index: a run written where 2 GPUs
    were visible failed to resume where 1 is (IndexError). fsl draws nothing on a GPU, so none is saved; a checkpoint
    that has them loads (its tensors on the CPU, never restored to a device by torch.load)."""
    first = load_config(CONFIG, on_cuda(tmp_path, "train.tasks=4", "train.parallel_tasks=1"))
    with rehearsal(devices=2):
        train.run(first)
    state = weights(first.run_dir)
    assert "cuda" not in state["rng"]
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 2  # as written before #47
    torch.save(state, first.run_dir / "latest.pth")
    resumed = load_config(CONFIG, on_cuda(tmp_path, "train.tasks=8", "train.parallel_tasks=1"))
    with rehearsal(devices=1):
        train.run(resumed)
    assert weights(resumed.run_dir)["tasks_done"] == 8


def test_deterministic_auto_groups_do_not_depend_on_other_processes():
    """#47.8: with deterministic=true, `auto` read the device's free memory, which other processes change: two equal
    commands could choose different groups, and so different bits. It now reads the total memory."""
    def group(deterministic: bool, used_elsewhere: int) -> int:
        with rehearsal() as driver:
            driver.used_elsewhere = used_elsewhere

            def run(size: int) -> None:
                torch.ones(2**20, device="cuda")  # 4 MiB of device memory for the task's graph
            return batching.resolve("auto", 10**6, torch.device("cuda", 0), run, deterministic=deterministic)[0]
    assert group(True, 0) == group(True, 70 * GiB)
    assert group(False, 0) > group(False, 70 * GiB)


def test_the_memory_probe_measures_a_warm_run():
    """#47.6: the probe measured the kernels' first run; cuDNN's autotuner (cudnn_benchmark) then holds workspaces
    that a step does not, and the per-task figure came out too large."""
    calls = []

    def run_one() -> None:
        calls.append(1)
        workspace = torch.empty(64 * 2**20 if len(calls) == 1 else 0, dtype=torch.uint8, device="cuda")  # noqa: F841
        torch.ones(2**20, device="cuda")  # 4 MiB: the task's own
    with rehearsal():
        peak = batching.peak_bytes(run_one, torch.device("cuda", 0))
    assert len(calls) == 2 and peak == 4 * 2**20


def test_every_cuda_only_line_runs_in_the_rehearsal_or_says_why_not(tmp_path):
    """#47 Deliver 2: benchmarks/cuda_rehearsal.py runs fsl's commands with device=cuda in a rehearsal and lists every
    CUDA-only line of fsl/ (found in the source) with whether it ran: a new CUDA-only line that no scenario reaches,
    and that has no reason, fails here."""
    import subprocess
    import sys
    out = tmp_path / "cuda-rehearsal.md"
    done = subprocess.run([sys.executable, "benchmarks/cuda_rehearsal.py", "--check", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text()
    assert "0 not executed without a reason" in report and "**no reason" not in report
    assert "| fsl/data/episodes.py:" in report and "`torch.cuda.set_device(self.device)` | yes |" in report


def test_the_cuda_only_lines_are_found_in_the_source(tmp_path):
    """The finder: a cuda test's branch (either sense, and the statements after a `!= "cuda"` that returns; a test over
    two lines), a `# cuda-only` line, a torch.cuda call (after a non-ASCII character too), a stream method; not the
    branch that runs on a CPU."""
    import sys
    sys.path.insert(0, str(REPO / "benchmarks"))
    from cuda_rehearsal import cuda_only_lines
    source = tmp_path / "example.py"
    source.write_text(
        "def f(device, side, x):\n"                       # 1
        "    if device.type == 'cuda':\n"                 # 2
        "        a = 1\n"                                 # 3
        "    else:\n"                                     # 4
        "        a = 2\n"                                 # 5
        "    if device.type != 'cuda':\n"                 # 6
        "        return a\n"                              # 7
        "    b = 3\n"                                     # 8
        "    if side is not None:  # cuda-only\n"         # 9
        "        c = 4\n"                                 # 10
        "    x.record_stream(side)\n"                     # 11
        "    torch.cuda.synchronize()\n"                  # 12
        "    return x\n"                                  # 13
        "def g(device, x):\n"                             # 14
        "    y = ('é', torch.cuda.current_device())\n"    # 15: columns are UTF-8 bytes
        "    if (device.type\n"                           # 16
        "            == 'cuda'):\n"                       # 17: a test over two lines
        "        return y\n"                              # 18
        "    return x\n")                                 # 19
    assert sorted(cuda_only_lines(source)) == [3, 8, 9, 10, 11, 12, 13, 15, 18]


def test_the_tracer_follows_only_the_functions_that_hold_a_cuda_only_line(tmp_path):
    """The rehearsal's line tracer records the lines of a function holding a CUDA-only line; a function without one
    (the store's decoding, the model) runs untraced: tracing every line of fsl/ cost 25 of the rehearsal's 182 s."""
    import sys
    sys.path.insert(0, str(REPO / "benchmarks"))
    from cuda_rehearsal import LineTracer
    source = tmp_path / "example.py"
    source.write_text("def plain(x):\n"        # 1
                      "    return x + 1\n"     # 2
                      "def on_gpu(x):\n"       # 3
                      "    y = plain(x)\n"     # 4
                      "    return y\n")        # 5
    namespace: dict = {}
    exec(compile(source.read_text(), str(source), "exec"), namespace)
    tracer = LineTracer({source: {5: "return y"}})
    sys.settrace(tracer)
    try:
        assert namespace["on_gpu"](1) == 2
    finally:
        sys.settrace(None)
    assert tracer.executed == {(str(source), 4), (str(source), 5)}
    assert tracer.traced[namespace["plain"].__code__] is False


def test_step_memory_counts_the_step_on_the_meta_device():
    """#47 Deliver 3: benchmarks/step_memory.py counts fsl's own step without running it; conv4, second order, 105
    images at 84x84 and 2 inner steps: 1.08 GiB for one task in fp32 (the figure counted on real CPU tensors in
    #47), twice that for two tasks at once, about half in bf16."""
    import sys
    sys.path.insert(0, str(REPO / "benchmarks"))
    from step_memory import count_step
    cell = str(REPO / "experiments/mini-imagenet-conv4-5shot.yaml")
    one, two = (count_step(cell, [], tasks, False, "fp32")["step_gib"] for tasks in (1, 2))
    bf16 = count_step(cell, [], 1, False, "bf16")["step_gib"]
    assert one == pytest.approx(1.08, rel=0.05) and two == pytest.approx(2 * one, rel=0.03)
    assert bf16 == pytest.approx(0.60, rel=0.05)


def test_live_tensors_count_storages_once_and_free_them():
    from fsl.device.memory_count import LiveTensors
    counter = LiveTensors()
    with counter:
        a = torch.ones(1000)              # 4,000 bytes
        view = a.view(10, 100)            # the same storage
        b = a * 2                         # 4,000 more
        del b
        c = a + 1                         # reuses nothing: 4,000
    assert counter.current() == 8000 and counter.peak == 8000
    del a, view, c
    assert counter.current() == 0
    with pytest.raises(torch.cuda.OutOfMemoryError, match="faked"), LiveTensors(limit=1000):
        torch.ones(1000)


def test_the_gpu_session_refuses_to_run_without_its_fixture(tmp_path):
    """#47.3: benchmarks/gpu_session.sh ran tests/test_gpu.py without the fixtures (../shared/data does not travel
    to the GPU machine): the real-data tests skipped and the session passed. Now the fixture must be in .device/data,
    or the session stops at once, saying how to bundle it."""
    import os
    import subprocess
    environment = {k: v for k, v in os.environ.items() if k != "GPU_SESSION_DRY"}
    done = subprocess.run(["bash", str(REPO / "benchmarks/gpu_session.sh"), "1"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**environment, "OUT": str(tmp_path / "out")})
    assert done.returncode == 1 and ".device/data/mini-imagenet-lite not found" in done.stderr
    assert "bundle.sh mini-imagenet-lite" in done.stderr and not (tmp_path / "out" / "test_gpu.txt").exists()


def test_the_speed_benchmarks_peak_is_the_steps_own():
    """#47.5: benchmarks/meta_train_speed.py's peak_mb was max_memory_allocated, which counts every row's model,
    gradient and Adam state kept between rows (about 2.2 GiB for ResNet-12); it is now the step's peak above what
    was allocated before it, on a rehearsed GPU here."""
    import sys
    sys.path.insert(0, str(REPO / "benchmarks"))
    from meta_train_speed import peak_memory_mb
    with rehearsal():
        device = torch.device("cuda", 0)
        torch.cuda.synchronize(device)  # as the benchmark does first (it initialises CUDA)
        kept = torch.empty(3 * 2**20, dtype=torch.uint8, device="cuda")  # noqa: F841  (the other rows' state)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        torch.empty(2**20, dtype=torch.uint8, device="cuda")  # the step: 1 MiB, freed
        assert peak_memory_mb(device, before) == 1.0 and torch.cuda.max_memory_allocated(device) == 4 * 2**20
