"""Meta-training cost of each MAML variant of a cell (#17): the variants table's tasks/s come from whole training runs,
which share the machine with whatever else ran; this times only the meta-training step, variant after variant in
the same rounds, on one quiet process.

For each config (default: the glyphs cells and their variants in experiments/variants/), the step the trainer takes
(fsl.train.meta_train: InnerLoop.training with the derivative-order annealing, MAML++'s multi-step loss weights, the learned
rates) runs on a fixed meta-batch of Gaussian-noise episodes of the cell's shape (the data does not change the
cost). Each timed step is taken at a training progress spread evenly over the run, so phases (MAML++'s first-order
third) count by their share. Rounds alternate between configs. No data loading, no validation.

    python benchmarks/variant_speed.py [--rounds 24] [--configs experiments/glyphs-conv4-1shot.yaml ...]

Writes benchmarks/results/variant-speed-<machine>.md (and prints it).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from meta_train_speed import WAYS, machine, random_batch  # noqa: E402  (this folder: the script's own path)

from fsl.config import load_config, variant_label  # noqa: E402
from fsl.maml import (  # noqa: E402
    InnerLoop,
    build_learner,
    meta_optimizer,
    meta_parameters,
    meta_train_step,
    schedule,  # noqa: E402
)

DEFAULT_CONFIGS = [ROOT / "experiments" / f"glyphs-conv4-{k}shot.yaml" for k in (1, 5)] + sorted(
    (ROOT / "experiments" / "variants").glob("glyphs-*.yaml"))


class Trainer:
    """The model, learned rates and Adam of one config, and its training step at a given share of the run."""

    def __init__(self, path: Path):
        self.cfg = load_config(path, ["device=cpu"])
        torch.manual_seed(0)
        self.model, self.rates = build_learner(self.cfg)
        params = meta_parameters(self.model, self.cfg.maml.zero_head)
        params += list(self.rates.parameters()) if self.rates is not None else []
        self.optimizer = meta_optimizer(params, self.cfg.train.meta_lr)
        assert self.cfg.train.ways == WAYS, f"{path}: the noise batch has {WAYS} ways"
        self.batch = random_batch(self.cfg.train.meta_batch, self.cfg.data.image_size, torch.device("cpu"),
                                  queries=self.cfg.train.queries, shots=self.cfg.train.shots)
        self.seconds: list[float] = []

    def step(self, progress: float) -> float:
        """One meta-training step at `progress` (share of the training tasks done); seconds it took."""
        settings = schedule.at(self.cfg, round(progress * self.cfg.train.tasks))
        loop = InnerLoop.training(self.cfg, first_order=settings.first_order)
        start = time.perf_counter()
        meta_train_step(self.model, self.optimizer, self.batch, loop, self.rates, settings.step_weights, 1)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", type=Path, default=DEFAULT_CONFIGS)
    parser.add_argument("--rounds", type=int, default=24, help="timed steps per config (after 2 warm-up steps)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    trainers = [Trainer(path) for path in args.configs]
    for trainer in trainers:
        for _ in range(2):
            trainer.step(0.5)
    for r in range(args.rounds):
        for trainer in trainers:
            trainer.seconds.append(trainer.step((r + 0.5) / args.rounds))

    name = f"cpu-x{torch.get_num_threads()}"
    lines = [f"# Meta-training step cost per variant: {name}", "",
             f"`python benchmarks/variant_speed.py --rounds {args.rounds}` on {machine(torch.device('cpu'))}. "
             "The trainer's step only (no data "
             "loading, no validation), on the cell's meta-batch of noise episodes; each config's steps are spread "
             "over the run's progress, rounds alternate between configs.", "",
             "| config | variant | meta-batch x (shots + queries) | tasks/s | ms per task | speed vs the cell's MAML |",
             "|---|---|---|---|---|---|"]
    base_ms: dict[tuple[str, int], float] = {}
    rows = []
    for path, trainer in zip(args.configs, trainers):
        cfg = trainer.cfg
        ms = 1000 * sum(trainer.seconds) / (len(trainer.seconds) * cfg.train.meta_batch)
        label = variant_label(cfg)
        if cfg.maml.variant == "maml" and not cfg.maml.zero_head:
            base_ms[(cfg.cell, cfg.train.shots)] = ms
        rows.append((path, cfg, label, ms))
    for path, cfg, label, ms in rows:
        base = base_ms.get((cfg.cell, cfg.train.shots))
        ratio = f"{base / ms:.2f}x" if base else ""
        lines.append(f"| {path.resolve().relative_to(ROOT)} | {label} | {cfg.train.meta_batch} x ({cfg.train.shots} + "
                     f"{cfg.train.queries}) x 5 | {1000 / ms:.1f} | {ms:.1f} | {ratio} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"variant-speed-{name}.md").write_text(text)


if __name__ == "__main__":
    main()
