"""Submit the runs that are not done as one Slurm job array: `fsl slurm [CONFIG...] --partition P --time 12:00:00`.

Writes <work_dir>/slurm/fsl-array.sbatch, a plain bash script with #SBATCH lines: array task i trains then tests
run i (`python -m fsl train/test CONFIG overrides`, under torchrun with --gpus > 1). A run resumes from its
latest.pth whenever it starts again, so the script only has to get restarted: `--requeue` lets Slurm requeue a
preempted task (the trainer checkpoints on the SIGTERM that preemption sends), and `--signal=B:USR1@<s>` warns the
script before the time limit: it stops the trainer with SIGTERM (checkpoint), then requeues its own task with
`scontrol requeue`. `--submit` runs sbatch on it; without, it prints the command. The script runs without Slurm too
(`SLURM_ARRAY_TASK_ID=0 bash fsl-array.sbatch`), which is how the tests check it.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from fsl.config import load_config
from fsl.jobs.sweep import cost
from fsl.results import is_done
from fsl.results.provenance import REPO


def script(configs: list[Path], overrides: list[str], time_limit: str, gpus: int, cpus: int,
           partition: str | None, account: str | None, logs: Path, warn_s: int = 300) -> str:
    """The sbatch script for `configs` (one array task each)."""
    python = shlex.quote(sys.executable)
    launcher = f"{python} -m torch.distributed.run --standalone --nproc_per_node {gpus}" if gpus > 1 else python
    options = ["--job-name=fsl", f"--array=0-{len(configs) - 1}", f"--time={time_limit}",
               f"--cpus-per-task={cpus}", "--requeue", f"--signal=B:USR1@{warn_s}",
               f"--output={logs}/%A_%a.out", "--open-mode=append"]  # a requeued task appends to its log
    options += [f"--gres=gpu:{gpus}"] if gpus else []
    options += [f"--partition={partition}"] if partition else []
    options += [f"--account={account}"] if account else []
    lines = ["#!/usr/bin/env bash",
             f"# fsl job array, written by `fsl slurm` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: array task "
             f"i trains then tests run i;", "# a run resumes from its latest.pth whenever it starts again."]
    lines += [f"#SBATCH {option}" for option in options]
    lines += [
        "set -uo pipefail",
        f"cd {shlex.quote(str(REPO))}",
        "CONFIGS=(" + " ".join(shlex.quote(str(c)) for c in configs) + ")",
        "OVERRIDES=(" + " ".join(shlex.quote(o) for o in overrides) + ")",
        'config=${CONFIGS[${SLURM_ARRAY_TASK_ID:?not run as an array task}]}',
        'task_id="${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}_${SLURM_ARRAY_TASK_ID}"',
        "child=",
        "requeue() {  # the time limit is near (--signal): checkpoint, then put this task back in the queue",
        '  echo "fsl: time limit near; stopping $config with a checkpoint and requeueing $task_id"',
        '  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null && wait "$child"',
        '  scontrol requeue "$task_id"',
        "  exit 0",
        "}",
        "trap requeue USR1",
        "for step in train test; do",
        f'  {launcher} -m fsl "$step" "$config" "${{OVERRIDES[@]}}" &',
        '  child=$!',
        '  wait "$child"; status=$?',
        '  [ "$status" -eq 0 ] || { echo "fsl: $step of $config failed (exit $status)"; exit "$status"; }',
        "done",
    ]
    return "\n".join(lines) + "\n"


def run(configs: list[str | Path], overrides: list[str], time_limit: str = "24:00:00", gpus: int = 1, cpus: int = 8,
        partition: str | None = None, account: str | None = None, submit: bool = False,
        out: Path | None = None) -> Path | None:
    """Write (and with `submit`, sbatch) the array of the runs of `configs` that are not done, longest first.
    Returns the script's path, or None when every run is done."""
    cfgs = {Path(c): load_config(c, overrides) for c in configs}
    pending = sorted((c for c, cfg in cfgs.items() if not is_done(cfg, c)), key=lambda c: -cost(cfgs[c]))
    for config, cfg in cfgs.items():
        if config not in pending:
            print(f"skip {cfg.run_name}: result exists for this config")
    if not pending:
        print("nothing to submit: every run is done")
        return None
    folder = out or Path(next(iter(cfgs.values())).work_dir) / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fsl-array.sbatch"
    path.write_text(script([c.resolve() for c in pending], overrides, time_limit, gpus, cpus, partition, account,
                           (folder / "logs").resolve()))
    (folder / "logs").mkdir(exist_ok=True)
    print(f"{path}: {len(pending)} array task(s): " + ", ".join(cfgs[c].run_name for c in pending))
    if submit:
        subprocess.run(["sbatch", str(path)], check=True)
    else:
        print(f"submit with: sbatch {path}")
    return path
