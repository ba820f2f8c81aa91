"""`fsl tune CONFIG [key=value ...] --trials N [--budget TASKS]`: an Optuna study of a cell's settings, chosen on
validation only (#50; docs/tuning.md).

MMFewShot's MAML README invites it ("the hyper-parameters in configs are roughly set ... try different learning rate").
The search space is plain data in the config, a `tune:` section (fsl.config.read_tune_space; the shared base tunes
the inner and outer learning rates within 0.5-2x of each cell's own). A seeded TPE sampler proposes settings; each
trial is an ordinary fsl run, `<cell>-tune-<hash of its settings>` under `<work_dir>/tune/<study>/runs/`, trained to
`--budget` tasks in `--reports` chunks (`train.stop_at`, so every chunk resumes the last): after each chunk's
validation the trial reports the mean validation accuracy (the protocol's selection metric) and a median pruner may
stop it. A trial's value is its best validation mean. No trial builds a test episode or reads a test image (training
runs with `test_split=False`; tests/test_tune.py proves it).

Storage: one process, a SQLite file in the study's folder (`study.db`; a second process on it is refused: Optuna
advises against SQLite for parallel workers); several processes on one machine, Optuna's journal file
(`--storage journal`, or `--jobs N`, which starts N worker processes on it); many machines (a Slurm array), an RDB URL
(`--storage postgresql://...`), with Optuna's heartbeat. A study stopped at any point resumes with the same command: a
trial whose process is gone is re-run with its settings (its run directory, named by them, resumes), and marked
failed, so it is never counted twice; `--trials N` counts finished (complete or pruned) trials.

Outputs under `<results_dir>/tuning/<study>/`, after every trial: trials.csv (each trial's settings, validation
accuracy, where it was pruned; `kind` tuning trial, never comparable), importances.csv and trials.png. `--best` writes
the best settings as a config file beside the cell's (experiments/tuned/<cell>[-<study>].yaml, run name
<cell>-tuned), trains it at the cell's full budget, tests it on the fixed test episodes and writes the paired
difference, tuned minus default, on the same episodes (fsl.results.compare) to tuned-vs-default.md.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from fsl.config import Config, ConfigError, all_keys, flat_dict, load_config, read_tune_space
from fsl.results import provenance
from fsl.results.files import write_atomic, write_text_atomic

BUDGET_KEYS = ("train.tasks", "train.val_every", "train.checkpoint_every", "train.log_every", "train.stop_at",
               "seed", "quick", "maml.variant")  # set by the study itself, or naming the run: not searched
OPTUNA_FIX = "pip install optuna==5.1.0 (the pin of requirements.txt; `make setup` installs it)"


def optuna_module():
    """Optuna, or a one-line error with the install command."""
    try:
        import optuna
    except ImportError:
        raise ConfigError(f"fsl tune needs Optuna, which this Python lacks; fix: {OPTUNA_FIX}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass(frozen=True)
class Dimension:
    """One searched setting: a config key, its range [low, high] (log-uniform if `log`; whole numbers where the
    key's value is an int) or its `choices`."""
    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None
    integer: bool = False

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)


def search_space(config_path: str | Path, cfg: Config) -> list[Dimension]:
    """The config's `tune:` entries as Dimensions, each checked: a setting that defines the trained model (not the
    study's own budget keys), and a range `{low, high}` or `{factor: [a, b]}` (times the cell's own value) with
    optional `log`, or `{choices: [...]}`."""
    space, values = read_tune_space(config_path), flat_dict(cfg)
    searchable = set(provenance.model_keys(cfg)) - set(BUDGET_KEYS)
    if not space:
        raise ConfigError(f"{config_path} (and its base) has no tune: section; fix: add one, e.g. `tune:` then "
                          f"`  maml.inner_lr: {{factor: [0.5, 2.0], log: true}}` (docs/tuning.md)")
    dimensions = []
    for key, spec in space.items():
        where = f"{config_path}: tune: {key}"
        if key not in all_keys() or key not in searchable:
            why = "not a config key" if key not in all_keys() else "not a setting of the trained model it can search"
            raise ConfigError(f"{where}: {why}; fix: a key of fsl/config.py that defines the model (e.g. "
                              f"maml.inner_lr, train.meta_lr), not {', '.join(BUDGET_KEYS)}")
        dimensions.append(dimension(where, key, spec, values[key]))
    return dimensions


def dimension(where: str, key: str, spec: Any, value: Any) -> Dimension:
    """One `tune:` entry as a Dimension, or a ConfigError naming it."""
    example = "{factor: [0.5, 2.0], log: true}, {low: 0.001, high: 0.1, log: true} or {choices: [1, 2]}"
    if not isinstance(spec, dict) or not ({"factor", "low", "choices"} & set(spec)):
        raise ConfigError(f"{where}: {spec!r} is not a range; fix: e.g. {example}")
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise ConfigError(f"{where}: choices must be a non-empty list; fix: e.g. {example}")
        return Dimension(key, choices=tuple(spec["choices"]))
    low, high = ((value * spec["factor"][0], value * spec["factor"][1]) if "factor" in spec
                 else (spec.get("low"), spec.get("high")))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
        raise ConfigError(f"{where}: the range {low!r} .. {high!r} is not two numbers, low < high; fix: e.g. "
                          f"{example}")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{where}: log: true needs low > 0 (got {low}); fix: log: false, or a positive range")
    integer = isinstance(value, int) and not isinstance(value, bool)
    return Dimension(key, float(low), float(high), log, None, integer)


# ---- the study ---------------------------------------------------------------------------------------------------

def storage_for(folder: Path, storage: str | None, jobs: int):
    """Optuna storage of the study in `folder`: 'sqlite' (default for one process), 'journal' (default for several;
    a journal file), or a URL (sqlite:///..., postgresql://...)."""
    optuna = optuna_module()
    storage = storage or ("journal" if jobs > 1 else "sqlite")
    if storage in ("sqlite", "journal"):
        folder.mkdir(parents=True, exist_ok=True)
    if storage == "sqlite" or storage.startswith("sqlite:"):
        if jobs > 1:
            raise ConfigError(f"--storage {storage} with --jobs {jobs}: SQLite is for one process (Optuna's FAQ "
                              f"advises against it for parallel workers); fix: --storage journal (one machine) or an "
                              f"RDB URL such as postgresql://... (several)")
        return f"sqlite:///{folder / 'study.db'}" if storage == "sqlite" else storage
    if storage == "journal":
        from optuna.storages.journal import JournalFileBackend
        return optuna.storages.JournalStorage(JournalFileBackend(str(folder / "journal.log")))
    return optuna.storages.RDBStorage(storage, heartbeat_interval=60, grace_period=600,
                                      heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                                          max_retry=2))


@contextlib.contextmanager
def sqlite_lock(folder: Path, storage: Any) -> Iterator[None]:
    """Hold the study folder's SQLite file for this process: a second process on it is refused, naming the fix."""
    if not (isinstance(storage, str) and storage.startswith("sqlite:")):
        yield
        return
    with open(folder / "study.db.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{folder / 'study.db'}: another process is running this study on SQLite, which is "
                              f"for one process; fix: stop it, or run every process with --storage journal (one "
                              f"machine) or an RDB URL (several)") from None
        yield


def this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def gone(worker: str | None) -> bool:
    """Whether the process `worker` (host:pid) of this host has ended (another host's cannot be told: False)."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


def reclaim(study) -> int:
    """Trials left running by a process of this host that has ended: each is marked failed (never counted) and its
    settings queued again, so the next trial re-runs them and its run directory, named by them, resumes."""
    optuna = optuna_module()
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if gone(trial.user_attrs.get("worker")):
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)  # no public API
            count += 1
    return count


def finished(study) -> int:
    optuna = optuna_module()
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                        optuna.trial.TrialState.PRUNED)))


# ---- one trial ---------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What every trial of a study shares: the cell's config and overrides, the space, the budget in tasks and the
    number of validations it reports, and the study's folder (its runs go under runs/)."""
    config: Path
    overrides: list[str]
    space: list[Dimension]
    budget: int
    every: int
    folder: Path


def make_plan(config: str | Path, overrides: list[str], budget: int | None, reports: int, folder: Path) -> Plan:
    """The study's plan; the budget defaults to the cell's train.tasks, validations every budget / reports tasks
    (a whole number of meta-batches)."""
    cfg = load_config(config, overrides)
    budget = budget or cfg.train.tasks
    batch = cfg.train.meta_batch
    if budget < batch:
        raise ConfigError(f"--budget {budget}: less than one meta-batch (train.meta_batch={batch}); fix: --budget "
                          f"{batch * reports} or more")
    budget -= budget % batch
    every = max(batch, budget // max(reports, 1) // batch * batch)
    return Plan(Path(config), list(overrides), search_space(config, cfg), budget, every, folder)


def run_name(params: dict, plan: Plan) -> str:
    """A trial's run name (`name=`), from its settings and the study's budget: the same trial is the same run,
    which resumes; another budget (a study rerun with another --budget) is another run."""
    text = " ".join(f"{k}={params[k]!r}" for k in sorted(params)) + f" budget={plan.budget} every={plan.every}"
    return "tune-" + hashlib.sha256(text.encode()).hexdigest()[:10]


def trial_settings(plan: Plan, params: dict, stop: int) -> list[str]:
    return [*plan.overrides, *(f"{k}={v}" for k, v in params.items()), f"name={run_name(params, plan)}",
            f"work_dir={plan.folder / 'runs'}", f"train.tasks={plan.budget}", f"train.val_every={plan.every}",
            f"train.checkpoint_every={plan.every}", f"train.stop_at={stop}", "train.tensorboard=false"]


def validations(log: Path) -> pd.DataFrame:
    """The run's validation rows (tasks, accuracy), from its log.csv."""
    from fsl.results import read_train_log
    rows = read_train_log(log)
    return rows[rows["split"] == "val"][["tasks", "accuracy"]]


def objective(plan: Plan):
    """The study's objective: train the trial's run chunk by chunk, report each validation, prune; its value is the
    run's best validation mean."""
    optuna = optuna_module()
    from fsl.train import meta_train

    def trial_value(trial) -> float:
        params = {d.key: d.suggest(trial) for d in plan.space}
        trial.set_user_attr("worker", this_worker())
        trial.set_user_attr("run", run_name(params, plan))
        for stop in range(plan.every, plan.budget + 1, plan.every):
            cfg = load_config(plan.config, trial_settings(plan, params, stop))
            meta_train.run(cfg, test_split=False)
            seen = validations(cfg.run_dir / "log.csv")
            trial.report(float(seen["accuracy"].iloc[-1]), step=stop)
            trial.set_user_attr("tasks", stop)
            if trial.should_prune():
                trial.set_user_attr("pruned_at", stop)
                raise optuna.TrialPruned()
        return float(seen["accuracy"].max())
    return trial_value


# ---- what the study learned --------------------------------------------------------------------------------------

def trials_table(study, plan: Plan) -> pd.DataFrame:
    """One row per trial: number, state, settings, value (best validation mean, %), tasks trained, pruned_at,
    run, budget; kind 'tuning trial', never comparable."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append({"trial": trial.number, "state": trial.state.name, **trial.params,
                     "val_accuracy": trial.value, "tasks": trial.user_attrs.get("tasks"),
                     "pruned_at": trial.user_attrs.get("pruned_at"), "run": trial.user_attrs.get("run"),
                     "retry_of": trial.user_attrs.get("retry_of"), "budget": plan.budget, "kind": "tuning trial",
                     "comparable": False})
    return pd.DataFrame(rows)


def write_outputs(study, plan: Plan, out: Path) -> None:
    """trials.csv, importances.csv (with 2 or more complete trials) and trials.png under `out`, atomically."""
    optuna = optuna_module()
    table = trials_table(study, plan)
    write_atomic(out / "trials.csv", lambda tmp: table.to_csv(tmp, index=False))
    complete = table[table["state"] == "COMPLETE"]
    if len(complete) >= 2 and len(plan.space) > 1:
        importances = optuna.importance.get_param_importances(study)
        frame = pd.DataFrame({"setting": list(importances), "importance": list(importances.values())})
        write_atomic(out / "importances.csv", lambda tmp: frame.to_csv(tmp, index=False))
    plot_trials(table, out / "trials.png")


def plot_trials(table: pd.DataFrame, path: Path) -> None:
    """Each complete trial's best validation accuracy in trial order, each pruned trial's last report (x), and the
    best so far."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    complete = table[(table["state"] == "COMPLETE") & table["val_accuracy"].notna()]
    pruned = table[(table["state"] == "PRUNED") & table["val_accuracy"].notna()]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(complete["trial"], complete["val_accuracy"], "o", label=f"complete ({len(complete)})")
    axis.plot(pruned["trial"], pruned["val_accuracy"], "x", label=f"pruned, at its last report ({len(pruned)})")
    axis.step(complete["trial"], complete["val_accuracy"].cummax(), where="post", label="best so far")
    axis.set_xlabel("trial")
    axis.set_ylabel("best validation accuracy, %")
    axis.legend(loc="lower right")
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


# ---- the command -------------------------------------------------------------------------------------------------

def study_folders(config: str | Path, overrides: list[str], study: str | None) -> tuple[str, Path, Path]:
    """(study name, its folder under work_dir/tune, its results folder under results_dir/tuning)."""
    cfg = load_config(config, overrides)
    name = study or cfg.run_name
    if "/" in name or not name:
        raise ConfigError(f"--study {name!r}: a name, not a path; fix: e.g. --study lr-search")
    return name, Path(cfg.work_dir) / "tune" / name, Path(cfg.results_dir) / "tuning" / name


def run(config: str | Path, overrides: list[str], trials: int, budget: int | None = None, reports: int = 4,
        study: str | None = None, storage: str | None = None, jobs: int = 1, seed: int = 0,
        best: bool = False) -> int:
    """`fsl tune`: run the study to `trials` finished trials (with `jobs` worker processes), then with `best` train
    and test its best settings at the cell's full budget. Returns the number of finished trials."""
    optuna = optuna_module()
    name, folder, out = study_folders(config, overrides, study)
    plan = make_plan(config, overrides, budget, reports, folder)
    if best:
        check_default_row(config, overrides)
    chosen = storage_for(folder, storage, jobs)
    if jobs > 1:
        start_workers(config, overrides, trials, plan, name, storage or "journal", jobs, seed, reports)
    else:
        with sqlite_lock(folder, chosen):
            optimise(optuna, chosen, name, plan, trials, seed, out)
    loaded = optuna.load_study(study_name=name, storage=chosen)
    write_outputs(loaded, plan, out)
    if best:
        train_best(loaded, plan, name, out)
    return finished(loaded)


def optimise(optuna, storage, name: str, plan: Plan, trials: int, seed: int, out: Path) -> None:
    """This process's share of the study: trials until `trials` are finished (by any worker)."""
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=plan.every))
    reclaimed = reclaim(study)
    print(f"study {name}: {finished(study)} of {trials} trials finished"
          + (f"; {reclaimed} left running by a stopped process, re-run" if reclaimed else "")
          + f"; budget {plan.budget} tasks a trial, validated every {plan.every}", flush=True)
    if finished(study) >= trials:
        return
    done = optuna.study.MaxTrialsCallback(trials, states=(optuna.trial.TrialState.COMPLETE,
                                                          optuna.trial.TrialState.PRUNED))
    study.optimize(objective(plan), callbacks=[done, lambda s, _: write_outputs(s, plan, out)],
                   catch=(), gc_after_trial=True)


def start_workers(config, overrides, trials, plan, name, storage, jobs, seed, reports) -> None:
    """`jobs` processes of `fsl tune` on one journal (or RDB) study, each with its own sampler seed; waits for
    them."""
    command = [sys.executable, "-m", "fsl", "tune", str(config), *overrides, "--trials", str(trials), "--budget",
               str(plan.budget), "--reports", str(reports), "--study", name, "--storage", storage]
    workers = [subprocess.Popen([*command, "--seed", str(seed + k)]) for k in range(jobs)]
    failed = [k for k, worker in enumerate(workers) if worker.wait() != 0]
    if failed:
        raise RuntimeError(f"fsl tune: worker(s) {failed} of {jobs} failed (their output is above); fix: see it, "
                           f"then rerun the same command: the study resumes")


def check_default_row(config: str | Path, overrides: list[str]) -> None:
    """--best compares against the cell's own row: refuse before any work when there is none."""
    from fsl.results import ResultsError, compare, read_summary
    cfg = load_config(config, overrides)
    try:
        compare.own_row(read_summary(cfg.results_dir), cfg.run_name)
    except ResultsError:
        raise ConfigError(f"--best compares the tuned run with {cfg.run_name}'s own row, and "
                          f"{Path(cfg.results_dir) / 'summary.csv'} has none; fix: train and test the cell first, "
                          f"with the same settings (fsl train then fsl test)") from None


def best_config(study, plan: Plan, name: str) -> Path:
    """The best trial's settings as a config file based on the cell's: experiments/tuned/<cell>[-<study>].yaml."""
    trial, cell = study.best_trial, plan.config.stem
    path = plan.config.parent / "tuned" / (f"{cell}.yaml" if name == cell else f"{cell}-{name}.yaml")
    lines = [f"# fsl tune's best settings for {cell} (study {name}: trial {trial.number}, best validation "
             f"{trial.value:.2f} % at a budget of {plan.budget} tasks; docs/tuning.md)",
             f"base: ../{plan.config.name}", "name: tuned"]
    sections: dict[str, list[str]] = {}
    for key, value in trial.params.items():
        section, field = key.split(".", 1) if "." in key else ("", key)
        sections.setdefault(section, []).append(f"{field}: {value!r}")
    for section, fields in sections.items():
        lines += fields if not section else [f"{section}:", *(f"  {f}" for f in fields)]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def train_best(study, plan: Plan, name: str, out: Path) -> None:
    """Train and test the best settings at the cell's full budget; the paired difference, tuned minus default, on
    the same test episodes, into tuned-vs-default.md."""
    from fsl.results import compare
    from fsl.train import meta_test, meta_train
    from fsl.train.cell import check_test_episodes
    from fsl.train.checkpoint import tested_checkpoint
    path = best_config(study, plan, name)
    searched = {d.key for d in plan.space} | {"name"}  # the file's values; the command's other settings carry over
    carried = [o for o in plan.overrides if o.split("=", 1)[0].strip() not in searched]
    cfg = load_config(path, carried)
    meta_train.run(cfg)
    check_test_episodes(cfg)
    # its row's training settings are told against the cell's file (train_tag: the tuned values), so that the tables
    # list it beside the cell's own row, and a fresh clone retests it from the cell's file with them
    meta_test.run(cfg, tested_checkpoint(cfg), plan.config)
    default = load_config(plan.config, plan.overrides).run_name
    result = compare.compare_runs(cfg.results_dir, cfg.run_name, default)
    text = (f"# {cfg.run_name} against {default}\n\nThe best settings of study {name} "
            f"({', '.join(f'{k}={v!r}' for k, v in study.best_trial.params.items())}; {path}), trained at the cell's "
            f"full budget and tested on its fixed test episodes, minus the cell's own row, episode by episode "
            f"(`fsl compare {cfg.run_name} {default}`):\n\n"
            f"**{result['mean']:+.2f} ± {result['ci95']:.2f} %** (paired, {result['episodes']} episodes; "
            f"{result['a_better']} favour the tuned run, {result['b_better']} the default, {result['ties']} ties)\n")
    write_text_atomic(out / "tuned-vs-default.md", text)
    print(text, flush=True)
