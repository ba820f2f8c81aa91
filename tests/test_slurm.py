"""fsl's job arrays on a real Slurm (#23): the single-node cluster of scripts/slurm-local.sh (CI starts it), jobs
submitted with sbatch, preempted with scontrol requeue. Skipped where no Slurm answers."""
import re
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from conftest import MINI_84, REPO, STORE_CACHE, fixture_root


def slurm_is_up() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    try:
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return states.returncode == 0 and any(s.strip() in ("idle", "mix", "alloc") for s in states.stdout.split())


pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(not slurm_is_up(), reason="no Slurm answers here (start one: "
                                                           "bash scripts/slurm-local.sh start)")]


def submit(tmp_path, configs: list[str], overrides: list[str]) -> str:
    """`fsl slurm --submit` of `configs`: the array job's id."""
    result = subprocess.run([sys.executable, "-m", "fsl", "slurm", *configs, *overrides, "device=cpu",
                             f"work_dir={tmp_path / 'work'}", f"results_dir={tmp_path / 'results'}", "--gpus", "0",
                             "--cpus", "1", "--time", "00:20:00", "--submit"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return re.search(r"Submitted batch job (\d+)", result.stdout).group(1)


def wait_until_gone(job: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
            return
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} still in the queue after {timeout} s")


def logs(tmp_path) -> str:
    return "\n".join(p.read_text() for p in sorted((tmp_path / "work/slurm/logs").glob("*.out")))


def test_job_array_of_two_glyphs_cells_runs_both(tmp_path, glyphs_root):
    configs = [str(REPO / f"experiments/glyphs-conv4-{k}shot.yaml") for k in (1, 5)]
    job = submit(tmp_path, configs, [f"data.root={glyphs_root}", f"data.cache_dir={STORE_CACHE}", "data.workers=0",
                                     "train.tasks=16", "train.val_every=8", "train.val_episodes=4",
                                     "test.episodes=10", "train.log_every=8"])
    wait_until_gone(job, 600)
    summary = pd.read_csv(tmp_path / "results/summary.csv")
    assert sorted(summary.run) == ["glyphs-conv4-1shot", "glyphs-conv4-5shot"], logs(tmp_path)
    assert (summary.train_tasks == 16).all() and (summary.episodes == 10).all()


def test_requeue_mid_training_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """`scontrol requeue <array job>_<task>` (what preemption does): Slurm sends SIGTERM to the task's processes, the
    trainer stops after its step with latest.pth, the task runs again and resumes; the final weights equal those of
    the same run never interrupted."""
    config, tasks = str(REPO / "experiments/mini-imagenet-conv4-1shot.yaml"), 48
    settings = [f"data.root={fixture_root('mini-imagenet')}", MINI_84, "data.image_size=28", "data.workers=1",
                f"data.cache_dir={STORE_CACHE}", "train.meta_batch=2", "train.queries=2", "train.val_episodes=2",
                "train.log_every=2", f"train.tasks={tasks}", f"train.val_every={tasks}", "train.checkpoint_every=1000",
                "test.episodes=3", "train.tensorboard=false",
                "train.parallel_tasks=2"]  # not auto: a CPU times the groups, and the straight run may choose another
    job = submit(tmp_path, [config], settings)
    log = tmp_path / "work/mini-imagenet-conv4-1shot/log.csv"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.2)
    assert log.exists(), logs(tmp_path)
    subprocess.run(["scontrol", "requeue", f"{job}_0"], check=True, capture_output=True, text=True)
    wait_until_gone(job, 600)
    output = logs(tmp_path)
    stopped = re.search(r"stopped by signal 15 at task (\d+)", output)
    assert stopped and f"at task {stopped.group(1)}" in output.split("resuming from")[1], output
    straight = subprocess.run([sys.executable, "-m", "fsl", "train", config, *settings, "device=cpu",
                               f"work_dir={tmp_path / 'straight'}", f"results_dir={tmp_path / 'r2'}"], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    a = torch.load(tmp_path / "work/mini-imagenet-conv4-1shot/latest.pth", weights_only=False)
    b = torch.load(tmp_path / "straight/mini-imagenet-conv4-1shot/latest.pth", weights_only=False)
    assert a["tasks_done"] == b["tasks_done"] == tasks
    assert all(torch.equal(value, b["model"][name]) for name, value in a["model"].items())
    assert pd.read_csv(tmp_path / "results/summary.csv").run.tolist() == ["mini-imagenet-conv4-1shot"]
