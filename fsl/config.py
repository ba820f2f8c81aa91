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
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the valid choices."""


IntOrAuto = int | str  # a count, or "auto": chosen at run time (see the key's comment)


@dataclass
class DataConfig:
    dataset: str = "mini-imagenet"  # cub | mini-imagenet | tiered-imagenet | omniglot | glyphs | folder
    root: str = ""                  # dataset folder; empty: data/<dataset>
    image_size: int = 84            # square input size in pixels
    train_augment: bool = True      # protocol's RandomResizedCrop+flip+ColorJitter on training episodes
    bbox_crop: bool = False         # CUB only: crop images to bounding_boxes.txt
    class_rotations: bool = False   # turn every class of every episode (train, val and test) by a random multiple of
                                    # 90 degrees, all its images alike (learn2learn's RandomClassRotation; Finn et
                                    # al.'s Omniglot tasks, data_generator.py)
    omniglot_images: str = "binary"  # Omniglot only: binary: the archives' 1-bit images resized by PIL as they are
                                    # (PIL resizes mode "1" with NEAREST whatever filter is asked: cbfinn's
                                    # resize_images.py, the inputs behind the paper's numbers; values 0 and 255) |
                                    # greyscale: converted to greyscale first, then LANCZOS (learn2learn's benchmark;
                                    # fsl's rows before #36)
    mini_imagenet_images: str = "full"  # mini-ImageNet only: full: the full-size ImageNet JPEGs through the split CSVs,
                                    # as MMFewShot reads them (the seed's cells) | 84x84: the pre-shrunk release (or
                                    # learn2learn's cache), never comparable; a root holding the other form is refused
                                    # (fsl/data/mini_imagenet.py, docs/datasets.md)
    workers: int = -1               # DataLoader processes that describe training episodes; -1: the CPU cores but
                                    # one, at most 4 (fsl.data.episodes.default_workers)
    cache_dir: str = "data/cache"   # decoded-image stores (fsl.data.store), built once per split and image size
    prefetch: str = "auto"          # where the next batch of episodes is built while a step runs: thread (a
                                    # producer thread, on a side stream on CUDA) | inline (in the training thread,
                                    # when asked for) | auto: thread on CUDA, inline on a CPU (fsl.data.episodes.EpisodeStream)


@dataclass
class ModelConfig:
    arch: str = "conv4"             # conv4 | resnet12
    # conv4's details; the defaults are the protocol's (MMFewShot), the Omniglot cells set Finn et al.'s code
    # (cbfinn/maml, maml.py and utils.py; see experiments/omniglot-*.yaml)
    downsample: str = "maxpool"     # maxpool: conv (stride 1) -> BN -> ReLU -> MaxPool 2 | stride: conv with stride 2,
                                    # no pooling (cbfinn's Omniglot network, FLAGS.max_pool=False)
    head_input: str = "flatten"     # flatten: the last feature map, flattened | mean: its spatial mean (cbfinn's
                                    # Omniglot network, tf.reduce_mean over height and width)
    bn_scale: bool = True           # BatchNorm learns a scale; false: an offset only (cbfinn: tf.contrib.layers.
                                    # batch_norm's default scale=False)
    bn_eps: float = 1e-5            # BatchNorm's epsilon (cbfinn: 1e-3, tf.contrib.layers.batch_norm's default)
    init: str = "kaiming"           # kaiming: the protocol's (convs kaiming-normal fan_out, BN 1/0, PyTorch's default
                                    # head) | xavier: cbfinn's (convs glorot-uniform, zero biases, head weights N(0, 1),
                                    # zero head bias)


@dataclass
class MAMLConfig:
    variant: str = "maml"           # a named setting of the keys below (VARIANTS): maml | fomaml | anil | metasgd |
                                    # maml++; it sets its keys, tags the run's name, and is recorded in results
    inner_lr: float = 0.01          # SGD step size of the inner loop (train and test; the initial value of learned
                                    # rates)
    inner_steps: int = 2            # inner SGD steps during meta-training
    test_inner_steps: int = 5       # inner SGD steps at validation and test
    first_order: bool = False       # first-order MAML, FOMAML (no back-propagation through the inner gradients)
    zero_head: bool = False         # zeroing trick (Kao et al., ICLR 2022): the linear head is zero at the start of
                                    # every adaptation and is not meta-learned; false: the protocol's learned head
    adapt: str = "all"              # what the inner loop adapts: all (MAML) | head (ANIL, Raghu et al., ICLR 2020:
                                    # the body is meta-learned through the head's adaptation, never adapted)
    learned_lr: str = "none"        # none: maml.inner_lr | per_element (Meta-SGD, Li et al. 2017: a learned rate per
                                    # weight) | per_layer_per_step (MAML++ LSLR: a learned rate per parameter tensor
                                    # and inner step); learned rates start at maml.inner_lr and are meta-learned
    multi_step_loss: bool = False   # MAML++ MSL: the outer loss is a weighted sum of the query losses after every
                                    # inner step, annealed towards the last step's alone
    msl_fraction: float = 0.15      # share of the training tasks over which MSL anneals (MAML++ code: 15 of 100
                                    # epochs); after it, the last step's query loss alone
    per_step_bn: bool = False       # MAML++ BNWB: a BatchNorm weight and bias per inner step, meta-learned and not
                                    # adapted (needs test_inner_steps <= inner_steps)
    first_order_fraction: float = 0.0  # MAML++ derivative-order annealing: first order for this share of the
                                       # training tasks, second order after
    adapt_bn: bool = True           # the inner loop adapts BatchNorm's parameters too; false: they are meta-learned
                                    # only (cbfinn: its BatchNorm variables are not among the adapted `weights`)
    inner_loss: str = "mean"        # the support loss the inner loop descends: mean (the mean cross-entropy) |
                                    # class_sum (the sum over classes of each class's mean, i.e. ways x the mean:
                                    # cbfinn's utils.xent divides each image's loss by the shots, and tf.gradients
                                    # sums them)


VARIANTS: dict[str, dict[str, object]] = {
    "maml": {},
    "fomaml": {"maml.first_order": True},
    "anil": {"maml.adapt": "head"},
    "metasgd": {"maml.learned_lr": "per_element"},
    # MAML++ (Antoniou et al., ICLR 2019): LSLR, MSL, BNWB, derivative-order annealing (the paper: first order for
    # the first 50 of 150 epochs; its released template uses 80 of 150, its released configs none) and cosine
    # annealing of the meta learning rate (to 0 here; the paper's code anneals to 1e-5 of 1e-3)
    "maml++": {"maml.learned_lr": "per_layer_per_step", "maml.multi_step_loss": True, "maml.per_step_bn": True,
               "maml.first_order_fraction": 1 / 3, "train.meta_lr_schedule": "cosine"},
}


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
    stop_at: int = 0                # stop after this many tasks, as an interruption would (latest.pth written; a
                                    # rerun without it resumes towards train.tasks); 0: train all train.tasks
    log_every: int = 200            # write a training row to log.csv every this many tasks
    tensorboard: bool = True        # also write log.csv's numbers as TensorBoard scalars to <run dir>/tb
    parallel_tasks: IntOrAuto = "auto"  # tasks of a meta-batch adapted together in one batched forward (fsl.maml):
                                    # more is faster on a GPU and costs memory (each group's graph lives until its
                                    # backward); 1 = task by task; auto: 1 on a CPU, on a GPU the largest group that
                                    # fits its free memory (fsl.maml.batching). Same meta-gradient up to float rounding


@dataclass
class TestConfig:
    ways: int = 5                   # classes per validation/test episode
    shots: int = 1                  # support images per class: the cell's K
    queries: int = 15               # query images per class
    episodes: int = 2_000           # fixed test episodes
    seed: int = 0                   # seed of the fixed validation and test episodes (same for every model)
    weights: str = "best"           # which weights `fsl test` tests: best (the protocol's best_accuracy_mean.pth,
                                    # selected on validation) | final (latest.pth after all train.tasks: the MAML
                                    # paper's Omniglot test; validation still runs and is logged)
    parallel_episodes: IntOrAuto = "auto"  # validation/test episodes adapted together in one batched forward; auto
                                    # as train.parallel_tasks (at most 16 on a GPU)


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
                                    # matmuls) | bf16 (autocast to bfloat16); see fsl.device.precision
    cudnn_benchmark: bool = False   # let cuDNN autotune convolution algorithms (faster, not bit-reproducible)
    deterministic: bool = False     # deterministic kernels (torch.use_deterministic_algorithms, cudnn.deterministic,
                                    # CUBLAS_WORKSPACE_CONFIG): on CUDA, what a resumed run needs to end bit for bit
                                    # as an uninterrupted one; slower. Recorded in the summary row (precision)
    name: str = ""                  # the run's tag within its cell (work dir and summary row <cell>-<name>);
                                    # default: maml.variant, if not maml
    work_dir: str = "work_dirs"     # checkpoints and logs go to <work_dir>/<cell>[-<name>][-seed<N>][-quick]
    results_dir: str = "results"    # test CSVs and summary.csv
    quick: bool = False             # short sanity run: few hundred tasks, 100 test episodes; rows marked quick

    @property
    def cell(self) -> str:
        """`{dataset}-{arch}-{K}shot`, with `-{N}way` before the shots when the episodes are not 5-way (the 12 cells
        are all 5-way): e.g. omniglot-conv4-20way-1shot."""
        ways = f"{self.test.ways}way-" if self.test.ways != 5 else ""
        return f"{self.data.dataset}-{self.model.arch}-{ways}{self.test.shots}shot"

    @property
    def run_name(self) -> str:
        """The run's id: work-dir name and summary.csv key, `cell` plus `run_tag`."""
        return self.cell + self.run_tag

    @property
    def run_tag(self) -> str:
        """What sets this run apart from the cell's protocol run: '-<name>' (`name`, or a named variant other than
        maml), '-seed<N>' for seeds other than 0, '-quick' for quick runs; '' for the protocol run."""
        name = self.name or (self.maml.variant if self.maml.variant != "maml" else "")
        return (f"-{name}" if name else "") + (f"-seed{self.seed}" if self.seed != 0 else "") \
            + ("-quick" if self.quick else "")

    @property
    def run_dir(self) -> Path:
        return Path(self.work_dir) / self.run_name

    @property
    def data_root(self) -> Path:
        return Path(self.data.root or Path("data") / self.data.dataset)

    @property
    def images_form(self) -> str:
        """Which form of the dataset's images the run reads, where it has two: mini-ImageNet's
        data.mini_imagenet_images, Omniglot's data.omniglot_images; '' for the others."""
        return {"mini-imagenet": self.data.mini_imagenet_images,
                "omniglot": self.data.omniglot_images}.get(self.data.dataset, "")

    @property
    def episode_images(self) -> dict[str, int]:
        """Images per class an episode of each split takes: train.shots + train.queries in training, test.shots +
        test.queries in validation and test."""
        test = self.test.shots + self.test.queries
        return {"train": self.train.shots + self.train.queries, "val": test, "test": test}


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
    if kind == IntOrAuto:
        if isinstance(value, str) and value.strip() == "auto":
            return "auto"
        try:
            return _coerce(key, value, int)
        except ConfigError:
            raise ConfigError(f"config key '{key}' expects a count or auto, got {value!r}") from None
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
    if kind is str and isinstance(value, bool):  # YAML 1.1 reads yes/no/on/off/true/false as booleans
        raise ConfigError(f"config key '{key}' expects str, got {value!r}: YAML read the unquoted word as a boolean "
                          f"(yes, no, on, off, true and false are booleans in YAML); fix: quote it, e.g. "
                          f"{key.split('.')[-1]}: \"yes\"")
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


SECTIONS = ("data", "model", "maml", "train", "test")  # the config's sections (mappings of keys)


def _flatten(tree: dict, prefix: str = "", path: Path | None = None) -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}.", path))
        elif not prefix and key in SECTIONS:  # `data:` with nothing under it, or `data: 5`
            where = f"{path}: " if path else ""
            raise ConfigError(f"{where}section '{key}' must be a mapping of keys (e.g. `{key}:` then indented "
                              f"`dataset: cub` lines), got {value!r}; fix: indent its keys under it, or remove the "
                              f"empty `{key}:` line")
        else:
            flat[prefix + str(key)] = value
    return flat


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, line: int, first: int):
        super().__init__(f"key '{key}' is written twice (lines {first} and {line}), and YAML would keep the last")
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1, seen[key])
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a config file; fix: name a cell's YAML file, e.g. "
                          f"experiments/mini-imagenet-conv4-1shot.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); fix: a config is a YAML "
                          f"text file, e.g. experiments/mini-imagenet-conv4-1shot.yaml") from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as error:
        raise ConfigError(f"{path}:{error.line}: {error}; fix: keep one of the two") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}\n  fix: correct that line (YAML wants "
                          f"`key: value`, two-space indentation, no tabs)") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(tree).__name__}")
    return tree


_SAID_TWICE: set[tuple[str, str, str]] = set()  # keys given twice that parse_overrides has named in this process


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """key=value overrides -> {key: value}, the last of a key given twice winning, as scripts and make's ARGS rely on
    (a setting appended after a shared list); one given twice with different values is named on stderr, once."""
    parsed = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.tasks=1000)")
        key, value = item.split("=", 1)
        key = key.strip()
        if key in parsed and parsed[key] != value and (key, parsed[key], value) not in _SAID_TWICE:
            _SAID_TWICE.add((key, parsed[key], value))
            print(f"fsl: {key} is given twice on the command line ({key}={parsed[key]}, then {key}={value}): the "
                  f"last, {key}={value}, is used", file=sys.stderr, flush=True)
        parsed[key] = value
    return parsed


def _read_chain(path: Path, depth: int = 0) -> dict[str, tuple[Any, int]]:
    """Flat values of a config file and of its bases (`base:`, relative to the file), each with the depth of the
    file that set it (0: `path` itself): a cell names the shared base, a variant file may name a cell; no deeper."""
    tree = _read_yaml(path)
    base = tree.pop("base", None)
    tree.pop("tune", None)  # fsl tune's search space, not a setting of the run (`read_tune_space`)
    values = {}
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: base: {base!r} is not a file name; fix: `base: _base.yaml` (a YAML file, relative "
                          f"to {path.name}), or remove the line")
    if base is not None:
        if depth == 1 and "base" in _read_yaml(path.parent / base):
            raise ConfigError(f"{path}: its base {base} names another base; at most two levels (a variant file on a "
                              f"cell file on the shared base)")
        values.update(_read_chain(path.parent / base, depth + 1))
    values.update({key: (value, depth) for key, value in _flatten(tree, path=path).items()})
    return values


def read_tune_space(path: str | Path) -> dict[str, dict]:
    """The `tune:` section of a config file over its base's (a key's entry in the file replaces its base's): `fsl
    tune`'s search space, {config key: {low, high[, log]} | {factor: [low, high][, log]} | {choices: [...]}}
    (fsl.jobs.tune checks the entries)."""
    path = Path(path)
    tree = _read_yaml(path)
    space = read_tune_space(path.parent / tree["base"]) if isinstance(tree.get("base"), str) else {}
    own = tree.get("tune") or {}
    if not isinstance(own, dict):
        raise ConfigError(f"{path}: tune: is {own!r}, not a mapping of config keys to ranges; fix: e.g. `tune:` then "
                          f"`  maml.inner_lr: {{factor: [0.5, 2.0], log: true}}` (docs/tuning.md)")
    return {**space, **own}


COMMAND_LINE = -1  # the depth of a command-line override: more specific than any file


# what `maml.variant=maml`, written, means: none of the other variants' inner-loop switches
PLAIN_MAML = {"maml.first_order": False, "maml.adapt": "all", "maml.learned_lr": "none", "maml.multi_step_loss": False,
              "maml.per_step_bn": False, "maml.first_order_fraction": 0.0}


def apply_variant(cfg: Config, written: dict[str, tuple[Any, int]], path: Path) -> None:
    """Set the keys of `maml.variant` (VARIANTS; maml, when it is written: PLAIN_MAML). A key that contradicts the
    variant and is written where the variant is, or more specifically (a file based on it, the command line), is
    refused; a base file's value is simply overridden by the variant."""
    if cfg.maml.variant not in VARIANTS:
        raise ConfigError(f"maml.variant={cfg.maml.variant!r} is not one of {', '.join(VARIANTS)}")
    variant_depth = written.get("maml.variant", (None, 10**6))[1]
    implied = PLAIN_MAML if cfg.maml.variant == "maml" and "maml.variant" in written else VARIANTS[cfg.maml.variant]
    for key, value in implied.items():
        if key in written and written[key][1] <= variant_depth:
            probe = Config()
            set_key(probe, key, written[key][0])
            if flat_dict(probe)[key] != value:
                where = "the command" if written[key][1] == COMMAND_LINE else f"{path} (or its base)"
                raise ConfigError(f"maml.variant={cfg.maml.variant} means {key}={value}, but {where} says "
                                  f"{key}={written[key][0]}; fix: drop one of the two (without maml.variant, set the "
                                  f"keys you want one by one)")
        set_key(cfg, key, value)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a config file (and its bases), apply `key=value` overrides, the variant's keys, then `quick` limits."""
    values = _read_chain(Path(path))
    values.update({key: (value, COMMAND_LINE) for key, value in parse_overrides(overrides or []).items()})
    cfg = Config()
    for key, (value, _) in values.items():
        set_key(cfg, key, value)
    apply_variant(cfg, values, Path(path))
    if cfg.data.dataset == "folder":  # your own images: the folder is the data, named absolutely (fsl.results.provenance)
        cfg.data.root = str(cfg.data_root.resolve())
    if cfg.quick:
        for key, limit in QUICK_LIMITS.items():
            section, name = key.split(".")
            node = getattr(cfg, section)
            setattr(node, name, min(getattr(node, name), limit))
    validate(cfg)
    return cfg


META_LR_SCHEDULES = ("constant", "cosine")  # see fsl.maml.schedule.meta_lr_at
CHOICES = {"model.downsample": ("maxpool", "stride"), "model.head_input": ("flatten", "mean"),
           "model.init": ("kaiming", "xavier"), "maml.inner_loss": ("mean", "class_sum"),
           "test.weights": ("best", "final"), "data.prefetch": ("auto", "thread", "inline"),
           "data.omniglot_images": ("binary", "greyscale"), "data.mini_imagenet_images": ("full", "84x84")}
MIN_IMAGE_SIZE = 16  # conv4 and resnet12 both halve the image four times (16 -> 1 pixel)
PRECISIONS = ("fp32", "tf32", "bf16")       # see fsl.device.precision
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # device= and fsl adapt --device (fsl.device.distributed.resolve_device)
DEVICE_CHOICES = "auto (cuda if available), cpu, cuda or cuda:N"


# the datasets (fsl.data.READERS) and backbones (fsl.models.BACKBONES), named here so that config imports neither
# (tests/test_config.py checks that the lists agree); greyscale datasets take no colour augmentation. Lists:
# fsl.data.register_dataset and fsl.models.register_backbone add to them (docs/extending.md)
DATASETS = ["cub", "mini-imagenet", "tiered-imagenet", "omniglot", "glyphs", "folder"]
ARCHS = ["conv4", "resnet12"]
GREYSCALE = ["omniglot"]


def validate(cfg: Config) -> None:
    """Refuse, naming the key and the fix, a config no run could honour: names, counts and ranges, then the
    combinations (`validate_combinations`, `validate_variant`)."""
    flat = flat_dict(cfg)
    for key, value, choices in (("data.dataset", cfg.data.dataset, DATASETS), ("model.arch", cfg.model.arch, ARCHS),
                                ("precision", cfg.precision, PRECISIONS),
                                ("train.meta_lr_schedule", cfg.train.meta_lr_schedule, META_LR_SCHEDULES),
                                *((key, flat[key], choices) for key, choices in CHOICES.items())):
        if value not in choices:
            raise ConfigError(f"{key}={value!r}; choose one of {', '.join(choices)}")
    if cfg.data.workers < -1:
        raise ConfigError(f"data.workers={cfg.data.workers}; use -1 (automatic), 0 (in the training process) or "
                          f"a number of processes")
    for key in ("train.tasks", "train.meta_batch", "train.val_every", "train.val_episodes", "train.checkpoint_every",
                "train.log_every", "test.episodes", "train.queries", "test.queries", "train.parallel_tasks",
                "test.parallel_episodes"):
        if flat[key] != "auto" and flat[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {flat[key]}")
    for key in ("seed", "test.seed"):  # numpy and torch take seeds in 0 .. 2**32 - 1
        if not 0 <= flat[key] < 2**32:
            raise ConfigError(f"{key}={flat[key]}: a seed is a whole number from 0 to {2**32 - 1}; fix: e.g. "
                              f"{key}=0, or {key}=1 for another run")
    for key in ("train.ways", "test.ways"):
        if flat[key] < 2:
            raise ConfigError(f"{key}={flat[key]}: an episode needs at least 2 classes (with one, every "
                              f"query is trivially right); fix: {key}=5, the protocol's")
    for key in ("train.shots", "test.shots"):
        if flat[key] < 1:
            raise ConfigError(f"{key}={flat[key]}: the inner loop adapts on the support set, which needs "
                              f"at least 1 image per class; fix: {key}=1 or more")
    for key, value in (("maml.inner_lr", cfg.maml.inner_lr), ("train.meta_lr", cfg.train.meta_lr)):
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{key}={value}: a learning rate must be a finite number > 0; fix: the protocol's "
                              f"{flat_dict(Config())[key]}")
    if not DEVICE.fullmatch(cfg.device):
        raise ConfigError(f"device={cfg.device!r}: choose {DEVICE_CHOICES}")
    if not re.fullmatch(r"[A-Za-z0-9_.+=-]*", cfg.name) or cfg.name.startswith("."):
        raise ConfigError(f"name={cfg.name!r}: the run's tag becomes a folder name (<work_dir>/<cell>-<name>); use "
                          f"letters, digits and _ . + = - only, e.g. name=lr01")
    if cfg.data.image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"data.image_size={cfg.data.image_size}: {cfg.model.arch} halves the image 4 times, so it "
                          f"needs at least {MIN_IMAGE_SIZE} pixels; fix: data.image_size=84, the protocol's")
    if not cfg.model.bn_eps > 0:
        raise ConfigError(f"model.bn_eps={cfg.model.bn_eps}: BatchNorm divides by sqrt(variance + eps), so eps must be "
                          f"> 0; fix: 1e-5 (PyTorch's) or 1e-3 (TensorFlow's, cbfinn's)")
    if cfg.train.stop_at < 0:
        raise ConfigError(f"train.stop_at={cfg.train.stop_at}: a task count (0: train all train.tasks)")
    validate_combinations(cfg)
    validate_variant(cfg)


def validate_combinations(cfg: Config) -> None:
    """Refuse settings that contradict each other, with the fix."""
    flat = flat_dict(cfg)
    conv4_only = [f"{k}={flat[k]}" for k in ("model.downsample", "model.head_input") if flat[k] != CHOICES[k][0]]
    if cfg.model.arch != "conv4" and conv4_only:
        raise ConfigError(f"{' and '.join(conv4_only)} describe conv4's blocks; model.arch={cfg.model.arch} has its "
                          f"own; fix: drop them or use model.arch=conv4")
    if cfg.data.train_augment and cfg.data.class_rotations:
        raise ConfigError("data.class_rotations turns the stored (un-augmented) images; with data.train_augment=true "
                          "the training images are crops; fix: data.train_augment=false, or data.class_rotations=false")
    if cfg.data.train_augment and cfg.data.dataset in GREYSCALE:
        raise ConfigError(f"data.train_augment=true: the protocol's augmentation (crops, colour jitter) is for RGB "
                          f"images, and {cfg.data.dataset} is greyscale; fix: data.train_augment=false")
    if cfg.deterministic and cfg.cudnn_benchmark:
        raise ConfigError("deterministic=true with cudnn_benchmark=true: cuDNN's autotuner picks convolution "
                          "algorithms by timing them, so two runs can pick differently; fix: one of the two")
    if cfg.train.ways != cfg.test.ways:
        raise ConfigError(f"train.ways={cfg.train.ways} and test.ways={cfg.test.ways} must match: "
                          f"the head has one row per way")


ADAPT = ["all", "head"]  # maml.adapt; fsl.maml.register_adapt_rule adds to it (docs/extending.md)
LEARNED_LR = ("none", "per_element", "per_layer_per_step")


def validate_variant(cfg: Config) -> None:
    """Refuse choices of the inner loop that fsl.maml cannot honour together, with the fix."""
    m = cfg.maml
    if m.variant not in VARIANTS:
        raise ConfigError(f"maml.variant={m.variant!r} is not one of {', '.join(VARIANTS)}")
    if m.adapt not in ADAPT:
        raise ConfigError(f"maml.adapt={m.adapt!r}; choose one of {', '.join(ADAPT)}")
    if m.learned_lr not in LEARNED_LR:
        raise ConfigError(f"maml.learned_lr={m.learned_lr!r}; choose one of {', '.join(LEARNED_LR)}")
    for key in ("msl_fraction", "first_order_fraction"):
        if not 0 <= getattr(m, key) <= 1:
            raise ConfigError(f"maml.{key}={getattr(m, key)} is a share of the training tasks: between 0 and 1")
    if m.inner_steps < 1 or m.test_inner_steps < 1:
        raise ConfigError(f"maml.inner_steps={m.inner_steps} and maml.test_inner_steps={m.test_inner_steps} must be "
                          f">= 1")
    if m.zero_head and m.learned_lr != "none":
        raise ConfigError(f"maml.zero_head with maml.learned_lr={m.learned_lr} is not supported (the zero-head step "
                          f"uses maml.inner_lr); fix: maml.zero_head=false or maml.learned_lr=none")
    if m.adapt == "head" and m.per_step_bn:
        raise ConfigError("maml.per_step_bn with maml.adapt=head: ANIL never runs the body per inner step; fix: "
                          "maml.per_step_bn=false")
    stepwise = [k for k, on in (("maml.per_step_bn", m.per_step_bn),
                                ("maml.learned_lr=per_layer_per_step", m.learned_lr == "per_layer_per_step")) if on]
    if stepwise and m.test_inner_steps > m.inner_steps:
        raise ConfigError(f"{' and '.join(stepwise)} learn one value per inner step of meta-training "
                          f"(maml.inner_steps={m.inner_steps}), so meta-test cannot take more steps "
                          f"(maml.test_inner_steps={m.test_inner_steps}); fix: maml.test_inner_steps="
                          f"{m.inner_steps}, or maml.inner_steps={m.test_inner_steps} as MAML++ does")
    if m.first_order and m.first_order_fraction > 0:
        raise ConfigError("maml.first_order_fraction anneals from first to second order, but maml.first_order=true "
                          "is first order throughout; fix: one of the two")


def variant_label(cfg: Config) -> str:
    """What the inner loop is, for tables: the named variant whose keys the config has, plus every other switch that
    differs from protocol MAML (e.g. 'maml+zero_head+cosine', 'anil', 'maml++')."""
    flat, default = flat_dict(cfg), flat_dict(Config())
    switches = ["maml.first_order", "maml.zero_head", "maml.adapt", "maml.learned_lr", "maml.multi_step_loss",
                "maml.per_step_bn", "maml.first_order_fraction", "train.meta_lr_schedule"]
    matching = [name for name, keys in VARIANTS.items() if all(flat[k] == v for k, v in keys.items())]
    name = max(matching, key=lambda n: len(VARIANTS[n]))
    extra = [k for k in switches if flat[k] != default[k] and k not in VARIANTS[name]]
    short = {"maml.zero_head": "zero_head", "train.meta_lr_schedule": flat["train.meta_lr_schedule"],
             "maml.first_order": "first_order", "maml.multi_step_loss": "msl", "maml.per_step_bn": "per_step_bn"}
    return "+".join([name] + [short.get(k, f"{k.split('.')[1]}={flat[k]}") for k in extra])


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
    """A config file and its whole base chain (a variant file, its cell, the shared base): their last commit
    identifies the config in summary.csv."""
    files = [Path(config_path)]
    while (base := (yaml.safe_load(files[-1].read_text()) or {}).get("base")) is not None:
        files.append(files[-1].parent / base)
    return files


def flat_dict(cfg: Config) -> dict[str, Any]:
    """{dotted key: value} of every setting."""
    return _flatten(to_dict(cfg))


# keys added after results were first hashed (fsl 0.2.0, issue #29): hashed only when set away from their default, so
# that a row written before them keeps its identity (fsl done, fsl.results.provenance)
NEWER_KEYS = ("data.class_rotations", "model.downsample", "model.head_input", "model.bn_scale", "model.bn_eps",
              "model.init", "maml.adapt_bn", "maml.inner_loss", "test.weights", "data.mini_imagenet_images")


def settings_sha(cfg: Config, keys: list[str]) -> str:
    """12-hex-digit hash of the values of `keys` (a stable identity for a set of settings); NEWER_KEYS count only
    away from their defaults."""
    flat, default = flat_dict(cfg), flat_dict(Config())
    chosen = {k: flat[k] for k in sorted(keys) if not (k in NEWER_KEYS and flat[k] == default[k])}
    return hashlib.sha256(json.dumps(chosen).encode()).hexdigest()[:12]
