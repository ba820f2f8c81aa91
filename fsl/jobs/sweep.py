"""Run many cells at once on one node: `fsl sweep CONFIG... [--gpus-per-cell K]` (`make all-tables GPUS_PER_CELL=K`).

The runs that are not done yet (fsl.results.is_done) are started longest first (ResNet-12 before conv4), each on
its own group of K visible GPUs (CUDA_VISIBLE_DEVICES per run: K=1 runs `python -m fsl train` then `test`, K>1 the
same under torchrun), as many at a time as there are groups; each run's output goes to <run dir>/sweep.log. A run
that fails is reported at the end with its log, without stopping the others; the tables are built once, at the end.
`--devices cpu,cpu` runs CPU slots instead of GPUs (what the tests use).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fsl.config import Config, load_config
from fsl.results import is_done
from fsl.results.provenance import REPO
from fsl.results.reference import REFERENCE


@dataclass
class Job:
    config: Path
    cfg: Config
    overrides: list[str]
    slot: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    started: float = 0.0

    @property
    def log(self) -> Path:
        return self.cfg.run_dir / "sweep.log"


def cost(cfg: Config) -> float:
    """Rough relative cost of a run, to start the longest first (ResNet-12 is ~10x conv4 per task)."""
    return cfg.train.tasks * (10 if cfg.model.arch == "resnet12" else 1) * cfg.maml.inner_steps


def visible_gpus() -> list[str]:
    """GPU ids this node lets us use: CUDA_VISIBLE_DEVICES if set, else every GPU torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def slots(devices: list[str], per_cell: int) -> list[list[str]]:
    """Disjoint groups of `per_cell` devices ('cpu' entries are single CPU slots)."""
    if devices and all(d == "cpu" for d in devices):
        return [["cpu"] for _ in devices]
    if len(devices) < per_cell:
        raise ValueError(f"--gpus-per-cell {per_cell} but {len(devices)} GPU(s) are visible ({devices}); fix: fewer "
                         f"GPUs per cell, or run on a node with more")
    return [devices[i:i + per_cell] for i in range(0, len(devices) - per_cell + 1, per_cell)]


def command(job: Job, step: str) -> list[str]:
    devices = len(job.slot)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(devices)] \
        if devices > 1 else [sys.executable]
    return launcher + ["-m", "fsl", step, str(job.config)] + job.overrides


def start(job: Job) -> None:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if job.slot != ["cpu"]:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(job.slot)
    train, test = (" ".join(f"'{part}'" for part in command(job, step)) for step in ("train", "test"))
    with open(job.log, "w") as log:
        job.process = subprocess.Popen(["bash", "-c", f"{train} && {test}"], stdout=log, stderr=subprocess.STDOUT,
                                       env=env)
    job.started = time.time()


def run(configs: list[str | Path], overrides: list[str], devices: list[str] | None = None, per_cell: int = 1,
        results_dir: str | None = None, poll_s: float = 2.0) -> int:
    """Run every config's cell that is not done, concurrently on the device groups; returns the number of failed
    runs (0: every run has its summary row)."""
    devices = devices or visible_gpus()
    if not devices:
        raise ValueError("no GPU is visible; fix: run on a GPU node, or pass --devices cpu,cpu for CPU slots")
    groups = slots(devices, per_cell)
    if devices[0] == "cpu":
        overrides = overrides + ["device=cpu"]
    jobs = [Job(Path(c), load_config(c, overrides), overrides) for c in configs]
    run_dirs: dict[Path, Path] = {}
    for job in jobs:  # two jobs on one run directory would train into each other's checkpoints and logs
        other = run_dirs.setdefault(job.cfg.run_dir.resolve(), job.config)
        if other is not job.config:
            raise ValueError(f"{other} and {job.config} are the same run ({job.cfg.run_name}, run directory "
                             f"{job.cfg.run_dir}); fix: list each config once (give variants their own `name`)")
    pending = sorted((job for job in jobs if not is_done(job.cfg, job.config)), key=lambda job: -cost(job.cfg))
    for job in jobs:
        if job not in pending:
            print(f"skip {job.cfg.run_name}: result exists for this config")
    print(f"{len(pending)} run(s) on {len(groups)} slot(s) of {per_cell} device(s): "
          f"{', '.join(job.cfg.run_name for job in pending)}", flush=True)
    running: list[Job] = []
    failed: list[Job] = []
    free = list(groups)
    while pending or running:
        while pending and free:
            job = pending.pop(0)
            job.slot = free.pop(0)
            start(job)
            running.append(job)
            print(f"started {job.cfg.run_name} on {','.join(job.slot)}; log: {job.log}", flush=True)
        time.sleep(poll_s)
        for job in [j for j in running if j.process.poll() is not None]:
            running.remove(job)
            free.append(job.slot)
            minutes = (time.time() - job.started) / 60
            if job.process.returncode:
                failed.append(job)
                print(f"FAILED {job.cfg.run_name} (exit {job.process.returncode}, {minutes:.1f} min); log: "
                      f"{job.log}", flush=True)
            else:
                print(f"done {job.cfg.run_name} ({minutes:.1f} min)", flush=True)
    from fsl.results import report
    try:
        report.run(results_dir or (jobs[0].cfg.results_dir if jobs else "results"))
    except report.ResultsError as error:
        print(f"tables not built: {error}")
    for job in failed:
        print(f"error: {job.cfg.run_name} failed; see {job.log}", file=sys.stderr)
    return len(failed)


def paper_cells() -> list[str]:
    """The 12 reference cells' configs, from the checkout's experiments/ folder."""
    return [str(REPO / "experiments" / f"{d}-{a}-{k}shot.yaml") for d, a, k in REFERENCE]
