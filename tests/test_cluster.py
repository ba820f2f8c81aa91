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
from conftest import MINI_84, REPO, STORE_CACHE, fixture_root

TINY = ["data.image_size=28", "data.workers=0", "train.parallel_tasks=1", "test.parallel_episodes=1", f"data.cache_dir={STORE_CACHE}", "train.meta_batch=2",
        "train.queries=2", "train.val_episodes=2", "train.log_every=2", "train.val_every=2", "test.episodes=3"]


def tiny(tmp_path, tasks=4):
    return [f"data.root={fixture_root('mini-imagenet')}", MINI_84, f"train.tasks={tasks}", *TINY,
            f"work_dir={tmp_path / 'work'}", f"results_dir={tmp_path / 'results'}"]


def test_pyproject_pins_what_requirements_pin_and_the_command_works_anywhere(tmp_path):
    pins = sorted(line.strip().lower() for line in (REPO / "requirements.txt").read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert sorted(d.lower() for d in project["dependencies"]) == pins
    assert project["scripts"]["fsl"] == "fsl.__main__:main" and project["requires-python"] == ">=3.11"
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
                 "#SBATCH --time=12:00:00", "#SBATCH --gres=gpu:1", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --open-mode=append"):
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
    tasks = 60
    script = write_array(tmp_path, [str(REPO / "experiments/mini-imagenet-conv4-1shot.yaml")], tasks,
                         f"train.val_every={tasks}", "train.checkpoint_every=2")
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
    assert 0 < stopped < tasks
    resumed = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and f"resuming from {latest} at task {stopped}" in resumed.stdout
    assert torch.load(latest, weights_only=False)["tasks_done"] == tasks


def test_sigterm_to_the_process_group_loses_no_completed_step(tmp_path):
    """What Slurm's preemption and Ctrl-C send: SIGTERM to every process of the job, loader workers included. The
    workers ignore it, the trainer finishes its step and writes latest.pth at it; the rerun resumes there and ends
    with the weights of an uninterrupted run, bit for bit."""
    config = str(REPO / "experiments/mini-imagenet-conv4-1shot.yaml")
    settings = [f"data.root={fixture_root('mini-imagenet')}", MINI_84, "train.tasks=40", *TINY, "data.workers=1",
                "train.val_every=40", "train.checkpoint_every=1000", "train.tensorboard=false", "device=cpu"]
    interrupted = settings + [f"work_dir={tmp_path / 'a'}", f"results_dir={tmp_path / 'ra'}"]
    job = subprocess.Popen([sys.executable, "-m", "fsl", "train", config, *interrupted], cwd=REPO,
                           start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "a/mini-imagenet-conv4-1shot/log.csv"
    deadline = time.time() + 240
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.2)  # two logged windows: training is under way, with its loader worker
    os.killpg(job.pid, signal.SIGTERM)  # the whole process group, as Slurm and Ctrl-C do
    output, _ = job.communicate(timeout=240)
    assert job.returncode == 130 and "stopped by signal 15 at task" in output, output
    assert "worker" not in output.lower() or "killed" not in output.lower(), output
    stopped = int(output.split("stopped by signal 15 at task ")[1].split(";")[0])
    latest = tmp_path / "a/mini-imagenet-conv4-1shot/latest.pth"
    assert torch.load(latest, weights_only=False)["tasks_done"] == stopped  # every completed step is in it
    assert 4 <= stopped < 40 and max(pd.read_csv(log)["tasks"]) <= stopped
    resumed = subprocess.run([sys.executable, "-m", "fsl", "train", config, *interrupted], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and f"resuming from {latest} at task {stopped}" in resumed.stdout
    straight = subprocess.run([sys.executable, "-m", "fsl", "train", config, *settings,
                               f"work_dir={tmp_path / 'b'}", f"results_dir={tmp_path / 'rb'}"], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0
    a = torch.load(latest, weights_only=False)
    b = torch.load(tmp_path / "b/mini-imagenet-conv4-1shot/latest.pth", weights_only=False)
    assert a["tasks_done"] == b["tasks_done"] == 40
    assert all(torch.equal(value, b["model"][name]) for name, value in a["model"].items())


def test_a_second_trainer_on_the_same_run_directory_is_refused(tmp_path):
    from fsl.train.checkpoint import RunDirLock

    run_dir = tmp_path / "run"
    with RunDirLock(run_dir):
        other = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                                "from fsl.train.checkpoint import RunDirLock\n"
                                f"with RunDirLock(Path({str(run_dir)!r})): pass"],
                               cwd=REPO, capture_output=True, text=True)
        assert other.returncode != 0 and f"is being trained by another process (pid {os.getpid()})" in other.stderr
    with RunDirLock(run_dir):  # released: the next trainer may go on
        assert (run_dir / "train.lock").read_text() == str(os.getpid())


def test_sweep_refuses_the_same_run_twice(tmp_path):
    config = str(REPO / "experiments/mini-imagenet-conv4-1shot.yaml")
    result = subprocess.run([sys.executable, "-m", "fsl", "sweep", config, config, *tiny(tmp_path),
                             "--devices", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "are the same run (mini-imagenet-conv4-1shot" in result.stderr
