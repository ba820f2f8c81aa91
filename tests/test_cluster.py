"""#18: the installable package, several runs at once on one node (fsl sweep), Slurm job arrays (fsl slurm)."""
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pandas as pd
import torch

from conftest import REPO, STORE_CACHE, fixture_root

TINY = ["data.image_size=28", "data.workers=0", f"data.cache_dir={STORE_CACHE}", "train.meta_batch=2",
        "train.queries=2", "train.val_episodes=2", "train.log_every=2", "train.val_every=2", "test.episodes=3"]


def tiny(tmp_path, tasks=4):
    return [f"data.root={fixture_root('mini-imagenet')}", f"train.tasks={tasks}", *TINY,
            f"work_dir={tmp_path / 'work'}", f"results_dir={tmp_path / 'results'}"]


def test_pyproject_pins_what_requirements_pin_and_the_command_works_anywhere(tmp_path):
    pins = sorted(line.strip().lower() for line in (REPO / "requirements.txt").read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert sorted(d.lower() for d in project["dependencies"]) == pins
    assert project["scripts"]["fsl"] == "fsl.__main__:main" and project["requires-python"] == ">=3.11,<3.12"
    command = Path(sys.executable).parent / "fsl"
    if command.exists():  # `make setup` installs it; a bare checkout has only `python -m fsl`
        result = subprocess.run([str(command), "--help"], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0 and "sweep" in result.stdout and "slurm" in result.stdout


def test_sweep_runs_cells_concurrently_and_reports_a_failure(tmp_path):
    good = [str(REPO / "experiments/mini-imagenet-conv4-1shot.yaml"),
            str(REPO / "experiments/mini-imagenet-conv4-5shot.yaml")]
    failing = str(REPO / "experiments/cub-conv4-1shot.yaml")  # the mini-ImageNet root is no CUB folder
    result = subprocess.run([sys.executable, "-m", "fsl", "sweep", *good, failing, *tiny(tmp_path),
                             "--devices", "cpu,cpu"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode != 0
    summary = pd.read_csv(tmp_path / "results/summary.csv")
    assert sorted(summary.run) == ["mini-imagenet-conv4-1shot", "mini-imagenet-conv4-5shot"]
    log = tmp_path / "work/cub-conv4-1shot/sweep.log"
    assert f"error: cub-conv4-1shot failed; see {log}" in result.stderr
    assert "CUB images.txt not found" in log.read_text()  # the run's own error is in its log
    events = [line.split()[0] for line in result.stdout.splitlines() if line.split()[:1] in (["started"], ["done"],
                                                                                             ["FAILED"])]
    assert events[:2] == ["started", "started"]  # two slots: two runs at once
    assert (tmp_path / "results/tables/comparison.md").exists()  # tables once, at the end
    again = subprocess.run([sys.executable, "-m", "fsl", "sweep", *good, *tiny(tmp_path), "--devices", "cpu"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("skip ") == 2


def write_array(tmp_path, configs, tasks=4, *extra):
    subprocess.run([sys.executable, "-m", "fsl", "slurm", *configs, *tiny(tmp_path, tasks), "device=cpu", *extra,
                    "--partition", "gpu-long", "--account", "lab42", "--time", "12:00:00", "--gpus", "1"],
                   cwd=REPO, check=True, capture_output=True, text=True)
    return tmp_path / "work/slurm/fsl-array.sbatch"


def test_slurm_array_script_runs_each_cell(tmp_path):
    configs = [str(REPO / "experiments/mini-imagenet-conv4-1shot.yaml"),
               str(REPO / "experiments/mini-imagenet-conv4-5shot.yaml")]
    script = write_array(tmp_path, configs)
    text = script.read_text()
    for line in ("#SBATCH --array=0-1", "#SBATCH --partition=gpu-long", "#SBATCH --account=lab42",
                 "#SBATCH --time=12:00:00", "#SBATCH --gres=gpu:1", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300"):
        assert line in text, line
    for task in (0, 1):  # what Slurm would start, run with bash in place of sbatch
        subprocess.run(["bash", str(script)], env={**os.environ, "SLURM_ARRAY_TASK_ID": str(task)}, check=True,
                       capture_output=True, timeout=300)
    assert sorted(pd.read_csv(tmp_path / "results/summary.csv").run) == ["mini-imagenet-conv4-1shot",
                                                                          "mini-imagenet-conv4-5shot"]


def test_slurm_time_limit_checkpoints_requeues_and_resumes(tmp_path):
    """USR1 (Slurm's warning before the time limit) stops training with a checkpoint and requeues the task; the
    requeued task resumes from latest.pth."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text(f"#!/usr/bin/env bash\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    (stub / "scontrol").chmod(0o755)
    script = write_array(tmp_path, [str(REPO / "experiments/mini-imagenet-conv4-1shot.yaml")], 200,
                         "train.val_every=100", "train.checkpoint_every=2")
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_JOB_ID": "77", "PATH": f"{stub}:{os.environ['PATH']}"}
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = tmp_path / "work/mini-imagenet-conv4-1shot/latest.pth"
    deadline = time.time() + 240
    while not latest.exists() and time.time() < deadline:  # wait for training to be under way
        time.sleep(0.5)
    job.send_signal(signal.SIGUSR1)
    output, _ = job.communicate(timeout=240)
    assert job.returncode == 0, output
    assert "time limit near" in output and (tmp_path / "scontrol.args").read_text().strip() == "requeue 77_0"
    stopped = torch.load(latest, weights_only=False)["tasks_done"]
    assert 0 < stopped < 200
    resumed = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and f"resuming from {latest} at task {stopped}" in resumed.stdout
    assert torch.load(latest, weights_only=False)["tasks_done"] == 200
