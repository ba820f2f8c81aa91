"""Which settings define a result, and whether a result is the reference's protocol.

Every config key falls in one of three groups:
    RUN_KEYS   where and how fast a run happens, never what it computes (device, paths, workers, log cadence);
    TEST_KEYS  what the meta-test does with a trained model (test.*, maml.test_inner_steps, test-time precision);
    the rest   what defines the trained model: data, model, inner loop, training schedule, seed, precision.
A test takes the model-defining settings from the checkpoint; a resume must not change them (`train.tasks` may grow
under a constant meta learning rate); a result is comparable to the reference only if it is the protocol's cell
config trained for all its tasks and tested on its 2,000 episodes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fsl.config import Config, ConfigError, all_keys, flat_dict, load_config, set_key, settings_sha, variant_label
from fsl.maml import schedule
from fsl.results.reference import reference

REPO = Path(__file__).resolve().parents[2]  # fsl/results/provenance.py -> the checkout
RUN_KEYS = ("device", "name", "work_dir", "results_dir", "data.root", "data.workers", "data.cache_dir",
            "train.log_every", "train.checkpoint_every", "train.tensorboard", "cudnn_benchmark", "train.parallel_tasks",
            "test.parallel_episodes", "train.stop_at", "data.prefetch", "deterministic")
TEST_KEYS = tuple(k for k in all_keys() if k.startswith("test.")) + ("maml.test_inner_steps", "precision")
SHARED_KEYS = ("test.ways", "test.shots", "test.queries", "test.seed", "maml.test_inner_steps", "precision")
# validation and training use these too: they define the trained (validation-selected) model, and a test may still
# set them differently


def model_keys(cfg: Config | None = None) -> list[str]:
    """Keys that define the trained model (validation settings included); for `cfg`'s dataset: a folder dataset's
    data.root is its data, so for `folder` it counts too (elsewhere it is only where the same data is stored)."""
    keys = [k for k in all_keys() if k not in RUN_KEYS and (k not in TEST_KEYS or k in SHARED_KEYS)]
    return keys + (["data.root"] if cfg is not None and cfg.data.dataset == "folder" else [])


def meta_test_keys() -> list[str]:
    """Keys that define the meta-test of a trained model."""
    return [k for k in all_keys() if k in TEST_KEYS]


def train_sha(cfg: Config) -> str:
    return settings_sha(cfg, model_keys(cfg))


NAMED_KEYS = ("seed", "quick", "maml.variant")  # model keys the run's name carries (Config.run_tag)


def train_tag(trained: Config, config_path: str | Path | None) -> str:
    """How a run's training settings differ from its config file's, as 'key=value ...' ('train.tasks=2000'), beside
    what its name already says (seed, variant, quick); '' for the file's own run, or when no file is named. A
    summary row is keyed by run, train_tag and test_tag, and per-run files carry the tags (fsl.results), so that
    another run of a cell never replaces the file's own row."""
    if config_path is None:
        return ""
    own = load_config(config_path)
    named = [f"{key}={value}" for key, value in flat_dict(trained).items()
             if key in NAMED_KEYS and flat_dict(own)[key] != value]
    if named:
        own = load_config(config_path, named)
    keys = [k for k in model_keys(trained) if k not in NAMED_KEYS]
    return " ".join(f"{key}={b}" for key, _, b in differences(own, trained, keys))


def meta_test_sha(cfg: Config) -> str:
    return settings_sha(cfg, meta_test_keys())


def test_tag(trained: Config, tested: Config) -> str:
    """How a test's settings differ from the run's own (those the run was trained with, its `test.*` included), as
    'key=value ...'; '' for the run's own test. Run settings (device, paths, test.parallel_episodes) do not count."""
    keys = [k for k in meta_test_keys() if k not in RUN_KEYS]
    return " ".join(f"{key}={b}" for key, _, b in differences(trained, tested, keys))


def differences(a: Config, b: Config, keys: list[str]) -> list[tuple[str, Any, Any]]:
    """(key, a's value, b's value) for every key in `keys` where they differ."""
    flat_a, flat_b = flat_dict(a), flat_dict(b)
    return [(k, flat_a[k], flat_b[k]) for k in keys if flat_a[k] != flat_b[k]]


def _listing(diffs: list[tuple[str, Any, Any]], first: str, second: str) -> str:
    return "\n".join(f"  {key}: {first} {a!r}, {second} {b!r}" for key, a, b in diffs)


def meta_test_config(trained: Config, requested: Config, checkpoint: str | Path) -> Config:
    """The config a test runs with: the checkpoint's settings, with the requested test-time and run settings.

    Any other difference between what was trained and what the command asks for is refused, naming each key."""
    allowed = (set(RUN_KEYS) | set(TEST_KEYS)) - {k for k in model_keys(trained) if k in RUN_KEYS}  # a folder's
    # data.root is its data
    diffs = differences(trained, requested, [k for k in all_keys() if k not in allowed])
    if diffs:
        overrides = " ".join(f"{key}={a}" for key, a, _ in diffs)
        raise ConfigError(f"{checkpoint} was trained with other settings than this command asks for:\n"
                          f"{_listing(diffs, 'trained with', 'requested')}\n"
                          f"  only test-time settings (test.*, maml.test_inner_steps, precision) and run settings "
                          f"({', '.join(k for k in RUN_KEYS if k in allowed)}) may differ at test"
                          + (" (a folder dataset's data.root is its data)" if "data.root" not in allowed else "")
                          + ".\n"
                          f"  fix: test with the config and overrides it was trained with (e.g. add `{overrides}`), "
                          f"or train a model with the new settings")
    effective = Config()
    flat_trained, flat_requested = flat_dict(trained), flat_dict(requested)
    for key in all_keys():
        set_key(effective, key, flat_requested[key] if key in allowed else flat_trained[key])
    return effective


def check_resume(stored: Config, current: Config, checkpoint: str | Path, tasks_done: int) -> None:
    """Refuse to continue `checkpoint` (trained `tasks_done` tasks under `stored`) with a different experiment."""
    keys = [k for k in all_keys() if (k not in RUN_KEYS or k in model_keys(stored)) and k != "test.episodes"]
    scheduled = schedule.uses_total_tasks(current)  # another train.tasks would change these mid-run
    diffs = [d for d in differences(stored, current, keys)
             if not (d[0] == "train.tasks" and not scheduled and d[2] >= max(d[1], tasks_done))]
    if not diffs:
        return
    restore = " ".join(f"{key}={a}" for key, a, _ in diffs)
    note = ""
    if any(key == "train.tasks" for key, _, _ in diffs):
        note = ("\n  (train.tasks may only grow, and only when no schedule is laid out over it: "
                + (", ".join(scheduled) + " would change from the next step on)" if scheduled else
                   "it may not shrink below the tasks done)"))
    raise ConfigError(f"{checkpoint} holds a run of another experiment ({tasks_done} tasks done):\n"
                      f"{_listing(diffs, 'checkpoint', 'now')}{note}\n"
                      f"  fix: restore the checkpoint's values to resume (`{restore}`), or start a new experiment "
                      f"in another folder (work_dir=...)")


def protocol_file(cfg: Config) -> Path:
    """The committed config of `cfg`'s cell (experiments/<cell>.yaml) or, for a named variant, of that variant
    (experiments/variants/<cell>-<variant>.yaml: Omniglot's FOMAML has a published number of its own)."""
    variant = cfg.maml.variant
    return REPO / "experiments" / (f"{cfg.cell}.yaml" if variant == "maml" else f"variants/{cfg.cell}-{variant}.yaml")


def protocol_config(cfg: Config) -> Config | None:
    """The config of `protocol_file` (no overrides); None if there is none."""
    path = protocol_file(cfg)
    return load_config(path) if path.exists() else None


COMPARABLE_PRECISIONS = ("fp32", "tf32")


def comparability(trained: Config, tested: Config, train_tasks: int | None, checkpoint_tasks: int | None,
                  best_val_tasks: int | None) -> tuple[bool, str]:
    """Whether testing a model trained under `trained` with the effective test config `tested` is the reference's
    protocol: the cell's committed config for both, all its training tasks, the weights test.weights names (the
    validation-selected ones, or the final ones).
    Returns (comparable, the reasons it is not). Precision (fsl.device.precision): fp32 and tf32 are comparable (float32
    weights, gradients and accumulation; TF32 is PyTorch's own default for cuDNN convolutions, which the reference
    ran with); bf16, in training or in the test, is not (8-bit mantissas change the numbers beyond rounding)."""
    reasons = []
    for stage, precision in (("training", trained.precision), ("test", tested.precision)):
        if precision not in COMPARABLE_PRECISIONS:
            reasons.append(f"{stage} in precision={precision} (comparable: {', '.join(COMPARABLE_PRECISIONS)})")
    if reference(tested.data.dataset, tested.model.arch, tested.test.ways, tested.test.shots,
                 variant_label(trained)) is None:
        reasons.append(f"no reference number for this cell and variant ({variant_label(trained)})")
    protocol = protocol_config(tested)
    if tested.quick:
        reasons.append("quick sanity run")
    elif protocol is None:
        reasons.append(f"no committed config {protocol_file(tested).relative_to(REPO)} to compare with")
    else:
        compared = lambda keys: [k for k in keys if k not in ("precision", "quick")]  # noqa: E731
        diffs = differences(protocol, trained, compared(model_keys()))
        diffs += [d for d in differences(protocol, tested, compared(meta_test_keys())) if d not in diffs]
        if diffs:
            reasons.append("settings differ from the protocol: " + ", ".join(f"{k}={b} (protocol {a})"
                                                                              for k, a, b in diffs))
    if train_tasks is None or train_tasks < trained.train.tasks:
        reasons.append(f"training stopped at {train_tasks} of {trained.train.tasks} tasks")
    if tested.test.weights == "final":
        if checkpoint_tasks is not None and train_tasks is not None and checkpoint_tasks != train_tasks:
            reasons.append(f"tested weights of task {checkpoint_tasks}, not the final ones (task {train_tasks})")
    elif checkpoint_tasks is not None and best_val_tasks is not None and checkpoint_tasks != best_val_tasks:
        reasons.append(f"tested weights of task {checkpoint_tasks}, not the validation-selected ones "
                       f"(task {best_val_tasks})")
    return not reasons, "; ".join(reasons)
