"""Experiment configuration: a dataclass tree loaded from YAML, with dotted `key=value` overrides.

A cell's YAML names at most one base file (`base: _base.yaml`, relative to the cell's file) and overrides some of
its values. Unknown keys and values of the wrong type are errors that name the nearest valid key. Defaults below
are the protocol's (../shared/reference/PROTOCOL.md); the cell id `{dataset}-{arch}-{shots}shot` is derived.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the valid choices."""


@dataclass
class DataConfig:
    dataset: str = "mini-imagenet"  # cub | mini-imagenet | tiered-imagenet | glyphs
    root: str = ""                  # dataset folder; empty: data/<dataset>
    image_size: int = 84            # square input size in pixels
    train_augment: bool = True      # protocol's RandomResizedCrop+flip+ColorJitter on training episodes
    bbox_crop: bool = False         # CUB only: crop images to bounding_boxes.txt
    workers: int = -1               # DataLoader processes that describe training episodes; -1: the CPU cores but
                                    # one, at most 4 (fsl.episodes.default_workers)
    cache_dir: str = "data/cache"   # decoded-image stores (fsl.data.store), built once per split and image size


@dataclass
class ModelConfig:
    arch: str = "conv4"             # conv4 | resnet12


@dataclass
class MAMLConfig:
    inner_lr: float = 0.01          # SGD step size of the inner loop (train and test)
    inner_steps: int = 2            # inner SGD steps during meta-training
    test_inner_steps: int = 5       # inner SGD steps at validation and test
    first_order: bool = False       # first-order MAML (no back-propagation through the inner loop)
    zero_head: bool = False         # zeroing trick (Kao et al., ICLR 2022): the linear head is zero at the start of
                                    # every adaptation and is not meta-learned; false: the protocol's learned head


@dataclass
class TrainConfig:
    tasks: int = 100_000            # meta-training tasks in all (outer steps = tasks / meta_batch)
    meta_batch: int = 8             # tasks per outer step (query losses averaged)
    meta_lr: float = 1e-3           # Adam learning rate of the outer loop
    meta_lr_schedule: str = "constant"  # constant (protocol) | cosine: meta_lr * (1 + cos(pi * tasks_done / tasks)) / 2
    ways: int = 5                   # classes per training episode
    shots: int = 5                  # support images per class in training episodes (also for 1-shot cells)
    queries: int = 16               # query images per class in training episodes
    val_every: int = 2_000          # validate every this many tasks
    val_episodes: int = 100         # fixed validation episodes (ways/shots/queries of `test`)
    checkpoint_every: int = 4_000   # write latest.pth every this many tasks (also at validation and on SIGINT)
    log_every: int = 200            # write a training row to log.csv every this many tasks
    parallel_tasks: int = 1         # tasks of a meta-batch adapted together in one batched forward (fsl.maml): more
                                    # is faster on a GPU and costs memory (each group's graph lives until its
                                    # backward); 1 = task by task. Same meta-gradient up to float rounding


@dataclass
class TestConfig:
    ways: int = 5                   # classes per validation/test episode
    shots: int = 1                  # support images per class: the cell's K
    queries: int = 15               # query images per class
    episodes: int = 2_000           # fixed test episodes
    seed: int = 0                   # seed of the fixed validation and test episodes (same for every model)
    parallel_episodes: int = 1      # validation/test episodes adapted together in one batched forward


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    maml: MAMLConfig = field(default_factory=MAMLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)
    seed: int = 0                   # seed of initialisation and training episodes
    device: str = "auto"            # auto (cuda if available) | cpu | cuda | cuda:N
    precision: str = "fp32"         # fp32 (IEEE float32 everywhere) | tf32 (CUDA Ampere+: TF32 convolutions and
                                    # matmuls) | bf16 (autocast to bfloat16); see fsl.precision
    cudnn_benchmark: bool = False   # let cuDNN autotune convolution algorithms (faster, not bit-reproducible)
    work_dir: str = "work_dirs"     # checkpoints and logs go to <work_dir>/<cell>
    results_dir: str = "results"    # test CSVs and summary.csv
    quick: bool = False             # short sanity run: few hundred tasks, 100 test episodes; rows marked quick

    @property
    def cell(self) -> str:
        return f"{self.data.dataset}-{self.model.arch}-{self.test.shots}shot"

    @property
    def run_name(self) -> str:
        """The run's id: work-dir name and summary.csv key, `cell` plus `run_tag`."""
        return self.cell + self.run_tag

    @property
    def run_tag(self) -> str:
        """What sets this run apart from the cell's default run: '-quick' for quick runs, else ''."""
        return "-quick" if self.quick else ""

    @property
    def run_dir(self) -> Path:
        return Path(self.work_dir) / self.run_name

    @property
    def data_root(self) -> Path:
        return Path(self.data.root or Path("data") / self.data.dataset)


QUICK_LIMITS = {"train.tasks": 400, "train.val_every": 200, "train.val_episodes": 20, "test.episodes": 100,
                "train.log_every": 40}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree, e.g. 'train.tasks'."""
    keys = []
    for name, kind in _field_types(cls).items():
        if dataclasses.is_dataclass(kind):
            keys += all_keys(kind, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(all_keys())}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Convert `value` (from YAML or a command-line string) to `kind`, or raise a ConfigError naming the key."""
    if isinstance(value, str) and kind in (int, float):
        try:
            value = kind(value.replace("_", ""))  # "8", "1e-3", "100_000"
        except ValueError:
            pass
    elif isinstance(value, str) and kind is bool:
        value = {"true": True, "false": False}.get(value.strip().lower(), value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' expects {kind.__name__}, got {value!r}")
    return value


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set dotted `key` (e.g. 'train.tasks') to `value`, validating the key and the type."""
    node: Any = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        child_types = _field_types(type(node))
        if part not in child_types or not dataclasses.is_dataclass(child_types[part]):
            raise _unknown_key(key)
        node = getattr(node, part)
    types = _field_types(type(node))
    if parts[-1] not in types or dataclasses.is_dataclass(types[parts[-1]]):
        raise _unknown_key(key)
    setattr(node, parts[-1], _coerce(key, value, types[parts[-1]]))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + str(key)] = value
    return flat


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(tree).__name__}")
    return tree


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    parsed = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.tasks=1000)")
        key, value = item.split("=", 1)
        parsed[key.strip()] = value
    return parsed


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a cell's YAML (and its one base file), then apply `key=value` overrides, then `quick` limits."""
    path = Path(path)
    tree = _read_yaml(path)
    base = tree.pop("base", None)
    values = {}
    if base is not None:
        base_tree = _read_yaml(path.parent / base)
        if "base" in base_tree:
            raise ConfigError(f"{path.parent / base}: a base file cannot name another base (one level only)")
        values.update(_flatten(base_tree))
    values.update(_flatten(tree))
    values.update(parse_overrides(overrides or []))
    cfg = Config()
    for key, value in values.items():
        set_key(cfg, key, value)
    if cfg.quick:
        for key, limit in QUICK_LIMITS.items():
            section, name = key.split(".")
            node = getattr(cfg, section)
            setattr(node, name, min(getattr(node, name), limit))
    validate(cfg)
    return cfg


META_LR_SCHEDULES = ("constant", "cosine")  # see fsl.train.meta_lr_at
PRECISIONS = ("fp32", "tf32", "bf16")       # see fsl.precision


def validate(cfg: Config) -> None:
    from fsl.data import READERS  # local import: config stays importable without torch
    from fsl.models import BACKBONES

    if cfg.data.dataset not in READERS:
        raise ConfigError(f"data.dataset={cfg.data.dataset!r} is not one of {sorted(READERS)}")
    if cfg.model.arch not in BACKBONES:
        raise ConfigError(f"model.arch={cfg.model.arch!r} is not one of {sorted(BACKBONES)}")
    if cfg.data.workers < -1:
        raise ConfigError(f"data.workers={cfg.data.workers}; use -1 (automatic), 0 (in the training process) or "
                          f"a number of processes")
    for key in ("train.tasks", "train.meta_batch", "train.val_every", "train.val_episodes", "train.checkpoint_every",
                "train.log_every", "test.episodes", "train.ways", "test.ways", "test.shots", "train.queries",
                "test.queries", "train.parallel_tasks", "test.parallel_episodes"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(getattr(cfg, section), name)}")
    if cfg.train.meta_lr_schedule not in META_LR_SCHEDULES:
        raise ConfigError(f"train.meta_lr_schedule={cfg.train.meta_lr_schedule!r}; choose "
                          f"{' or '.join(META_LR_SCHEDULES)}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if cfg.train.ways != cfg.test.ways:
        raise ConfigError(f"train.ways={cfg.train.ways} and test.ways={cfg.test.ways} must match: "
                          f"the head has one row per way")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(tree: dict) -> Config:
    """The Config a checkpoint stored (`to_dict`); keys of older fsl versions are translated."""
    cfg = Config()
    for key, value in _flatten(tree).items():
        if key == "tf32":  # before `precision`: a bool
            key, value = "precision", "tf32" if value else "fp32"
        if key == "data.cache_images":  # before image stores: an in-memory cache, now always on disk
            continue
        set_key(cfg, key, value)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_files(config_path: str | Path) -> list[Path]:
    """A cell's YAML and its base file: their last commit identifies the config in summary.csv."""
    config_path = Path(config_path)
    base = (yaml.safe_load(config_path.read_text()) or {}).get("base")
    return [config_path] + ([config_path.parent / base] if base else [])


def flat_dict(cfg: Config) -> dict[str, Any]:
    """{dotted key: value} of every setting."""
    return _flatten(to_dict(cfg))


def settings_sha(cfg: Config, keys: list[str]) -> str:
    """12-hex-digit hash of the values of `keys` (a stable identity for a set of settings)."""
    flat = flat_dict(cfg)
    return hashlib.sha256(json.dumps({k: flat[k] for k in sorted(keys)}).encode()).hexdigest()[:12]
