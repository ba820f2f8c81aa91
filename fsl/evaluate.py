"""Meta-test (step 2 of the protocol): adapt the meta-learned model on fixed episodes and report mean ± ci95.

`evaluate` is shared by validation during training and by the final test.
"""
from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fsl import batching, distributed, provenance
from fsl.config import Config, config_files, from_dict, variant_label
from fsl.data import SplitDataset, load_split
from fsl.data.store import ImageStore, open_store
from fsl.episodes import Episode, EpisodeDataset, EpisodeMaker, build_taskset, collate_specs
from fsl.maml import InnerLoop, InnerRates, build_learner, evaluate_tasks
from fsl.precision import apply_precision, autocast, describe_precision
from fsl.reference import REFERENCE
from fsl.results import test_episodes_path, upsert_summary, write_test_episodes
from fsl.utils import git_commit


def ci95(accuracies: np.ndarray) -> float:
    """95% confidence half-width of the mean: 1.96 * std(ddof=0) / sqrt(n) (MMFewShot's "std" column)."""
    accuracies = np.asarray(accuracies, dtype=np.float64)
    return float(1.96 * accuracies.std(ddof=0) / math.sqrt(len(accuracies)))


def cell_split(cfg: Config, split: str) -> SplitDataset:
    """`split` of the cell's dataset under cfg.data_root, with the reader options the config sets."""
    return load_split(cfg.data.dataset, cfg.data_root, split, **({"bbox_crop": True} if cfg.data.bbox_crop else {}))


def cell_store(cfg: Config, dataset: SplitDataset, split: str, kind: str) -> ImageStore:
    """The split's image store of `kind` under data.cache_dir (built on first use; fsl.data.store)."""
    return open_store(dataset, cfg.data.dataset, split, kind, cfg.data.image_size, cfg.data.cache_dir,
                      progress=distributed.is_main())


def check_test_episodes(cfg: Config) -> None:
    """Refuse test settings the test split cannot fill (fewer classes than test.ways, classes with fewer images than
    test.shots + test.queries), reading only its labels; DatasetError with the fix."""
    build_taskset(cell_split(cfg, "test"), cfg.test.ways, cfg.test.shots, cfg.test.queries)


class FixedEpisodes:
    """The `count` fixed `split` episodes of the cell (test.ways/shots/queries, seeded by test.seed): their
    descriptions, drawn once, and the evaluation images they index (the store's eval kind)."""

    def __init__(self, cfg: Config, split: str, count: int):
        dataset = cell_split(cfg, split)
        self.store = cell_store(cfg, dataset, split, "eval")
        stream = EpisodeDataset(dataset, cfg.test.ways, cfg.test.shots, cfg.test.queries, seed=cfg.test.seed,
                                count=count)
        self.specs = [stream[i] for i in range(count)]
        self.shape = (cfg.test.ways, cfg.test.shots, cfg.test.queries, cfg.data.image_size)

    def __len__(self) -> int:
        return len(self.specs)

    def batches(self, indices: list[int], size: int, device: torch.device) -> Iterator[Episode]:
        """Episodes `indices`, `size` at a time, as tensors on `device`."""
        make = EpisodeMaker(self.store, *self.shape, device)
        for start in range(0, len(indices), size):
            yield make(collate_specs([self.specs[i] for i in indices[start:start + size]]))


def fixed_episodes(cfg: Config, split: str, count: int) -> FixedEpisodes:
    return FixedEpisodes(cfg, split, count)


def test_group(cfg: Config, model: nn.Module, rates: InnerRates | None, episodes: FixedEpisodes,
               device: torch.device) -> tuple[int, str]:
    """(test.parallel_episodes resolved for this device, why): `auto` probes one episode's adaptation
    (fsl.batching), at most 16 episodes at once."""
    def run_one() -> None:
        with autocast(cfg.precision, device):
            evaluate_tasks(model, next(episodes.batches([0], 1, device)), InnerLoop.testing(cfg), rates)
    return batching.resolve(cfg.test.parallel_episodes, len(episodes), device, run_one, cap=16)


def evaluate(model: nn.Module, episodes: FixedEpisodes, loop: InnerLoop, device: torch.device,
             rates: InnerRates | None = None, progress: str | None = None, precision: str = "fp32",
             parallel: int = 1) -> np.ndarray:
    """Per-episode query accuracy (%) of `model` adapted by `loop` (with learned `rates`, if any) on each episode, in
    episode order; `parallel` episodes are adapted together (fsl.maml.evaluate_tasks).

    Under torchrun the episodes are dealt out round-robin across the processes (all of them must call this) and
    every process gets the full array, identical to a single-process run's."""
    share = list(distributed.my_share(len(episodes)))
    accuracies = []
    with tqdm(total=len(share), desc=progress, unit="ep", leave=False,
              disable=progress is None or not distributed.is_main()) as bar:
        for batch in episodes.batches(share, parallel, device):
            with autocast(precision, device):
                accuracies += evaluate_tasks(model, batch, loop, rates).tolist()
            bar.update(len(batch.query_y))
    return np.asarray(distributed.gather_shares(accuracies, len(episodes)), dtype=np.float64)


def load_checkpoint(path: str | Path, device: torch.device) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}\n  fix: train first with "
                                f"`python -m fsl train <config>`, or pass the path of best_accuracy_mean.pth")
    return torch.load(path, map_location=device, weights_only=False)


def load_checkpoint_model(path: str | Path, requested: Config | None,
                          device: torch.device) -> tuple[nn.Module, InnerRates | None, dict, Config]:
    """The model and learned rates of a checkpoint written by `fsl train`, its checkpoint dict, and the config to
    test it with: the checkpoint's own settings plus the test-time and run settings of `requested`
    (fsl.provenance.meta_test_config), or the checkpoint's own config alone if `requested` is None."""
    checkpoint = load_checkpoint(path, device)
    trained = from_dict(checkpoint["config"])
    cfg = trained if requested is None else provenance.meta_test_config(trained, requested, path)
    model, rates = build_learner(cfg, device)
    model.load_state_dict(checkpoint["model"])
    if rates is not None:
        rates.load_state_dict(checkpoint["rates"])
    return model, rates, checkpoint, cfg


def trained_tasks(checkpoint_path: Path, checkpoint: dict) -> int:
    """Tasks the run behind a checkpoint completed: latest.pth's count where it sits beside it (the best checkpoint
    is written mid-run), else the checkpoint's own."""
    latest = checkpoint_path.parent / "latest.pth"
    if latest.exists() and latest.resolve() != checkpoint_path.resolve():
        return int(torch.load(latest, map_location="cpu", weights_only=False)["tasks_done"])
    return int(checkpoint["tasks_done"])


def run(requested: Config, checkpoint_path: str | Path, config_path: str | Path | None = None,
        episodes: FixedEpisodes | None = None) -> dict:
    """Test `checkpoint_path` on the fixed test episodes; write the per-episode CSV and the summary row, which
    records where the result came from (fsl.provenance). Returns the summary row.

    The model-defining settings come from the checkpoint; `requested` may change only test-time and run settings.
    `episodes`: the test episodes if the caller has built them already (they must be `fixed_episodes(cfg, "test",
    cfg.test.episodes)`)."""
    device = distributed.setup(requested.device)
    checkpoint_path = Path(checkpoint_path)
    model, rates, checkpoint, cfg = load_checkpoint_model(checkpoint_path, requested, device)
    trained = from_dict(checkpoint["config"])
    apply_precision(cfg.precision, device, cfg.cudnn_benchmark)
    episodes = episodes or fixed_episodes(cfg, "test", cfg.test.episodes)
    parallel, why = test_group(cfg, model, rates, episodes, device)
    if distributed.is_main():
        print(f"test.parallel_episodes={parallel} ({why})", flush=True)
    start = time.time()
    accuracies = evaluate(model, episodes, InnerLoop.testing(cfg), device, rates=rates,
                          progress=f"test {cfg.run_name}", precision=cfg.precision, parallel=parallel)
    mean, half_width = float(accuracies.mean()), ci95(accuracies)
    train_tasks = trained_tasks(checkpoint_path, checkpoint)
    comparable, why = provenance.comparability(trained, cfg, train_tasks, checkpoint["tasks_done"],
                                               checkpoint["best_val_tasks"])
    reference = REFERENCE.get((cfg.data.dataset, cfg.model.arch, cfg.test.shots), (None, None))
    tag = provenance.test_tag(trained, cfg)
    row = {
        "run": cfg.run_name, "test_tag": tag, "cell": cfg.cell, "variant": variant_label(cfg), "dataset": cfg.data.dataset,
        "data_root": cfg.data_root.name,
        "arch": cfg.model.arch,
        "ways": cfg.test.ways, "shots": cfg.test.shots, "image_size": cfg.data.image_size,
        "train_batch": cfg.train.ways * (cfg.train.shots + cfg.train.queries),
        "mean_acc": round(mean, 4), "ci95": round(half_width, 4), "episodes": len(accuracies),
        "train_tasks": train_tasks, "best_val_tasks": checkpoint["best_val_tasks"], "quick": cfg.quick,
        "comparable": comparable, "not_comparable_why": why, "seed": cfg.seed,
        "precision": describe_precision(trained.precision, device, trained.cudnn_benchmark),
        "test_precision": describe_precision(cfg.precision, device, cfg.cudnn_benchmark),
        "train_config_sha": provenance.train_sha(trained), "test_config_sha": provenance.meta_test_sha(cfg),
        "tasks_per_s": checkpoint.get("tasks_per_s"), "peak_memory_mb": checkpoint.get("peak_memory_mb"),
        "parallel_tasks": checkpoint.get("parallel_tasks"), "parallel_episodes": parallel,
        "checkpoint": str(checkpoint_path), "commit": git_commit(),
        "config_commit": git_commit(*config_files(config_path)) if config_path else "unknown",
        "device": describe_device(device), "seconds": round(time.time() - start, 1),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reference_mean": reference[0], "reference_ci95": reference[1],
    }
    if not distributed.is_main():
        return row
    episodes_csv = write_test_episodes(test_episodes_path(cfg, tag), accuracies)
    upsert_summary(cfg.results_dir, row)
    print(f"{cfg.run_name}{f' ({tag})' if tag else ''}: {mean:.2f} ± {half_width:.2f} % over {len(accuracies)} test episodes"
          f"{'' if comparable else f' (not comparable to the reference: {why})'}\n  per-episode: {episodes_csv}\n"
          f"  summary: {Path(cfg.results_dir) / 'summary.csv'}")
    return row


def describe_device(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    return f"{distributed.world_size()} x {name}" if distributed.world_size() > 1 else name
