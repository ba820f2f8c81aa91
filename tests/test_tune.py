"""`fsl tune` (#50): the search space as config data, trials that are ordinary resumable runs, a study that reads no
test episode, resumes without counting a trial twice, and is shared by two processes through a journal file."""
from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, STORE_CACHE

from fsl.config import ConfigError, load_config

optuna = pytest.importorskip("optuna", reason="fsl tune needs Optuna (requirements.txt; make setup installs it)")
from fsl.jobs import tune  # noqa: E402

GLYPHS = REPO / "experiments/glyphs-conv4-1shot.yaml"


def tiny(where: Path, root: Path, *extra: str) -> list[str]:
    """The glyphs cell, tiny: 16 tasks, 4 validation episodes."""
    return [f"data.root={root}", "device=cpu", "data.workers=0", f"data.cache_dir={STORE_CACHE}", "train.tasks=16",
            "train.val_episodes=4", "test.episodes=20", f"work_dir={where / 'work'}",
            f"results_dir={where / 'results'}", *extra]


def config_with(where: Path, tune_section: str) -> Path:
    """A cell file on the glyphs cell with its own tune: section."""
    path = where / "cell.yaml"
    path.write_text(f"base: {GLYPHS}\ntune:\n{tune_section}")
    return path


def test_the_search_space_is_the_configs_tune_section_over_its_bases():
    """The shared base tunes both learning rates within 0.5-2x of each cell's own (glyphs: inner 0.4, meta 0.004)."""
    space = {d.key: d for d in tune.search_space(GLYPHS, load_config(GLYPHS))}
    assert set(space) == {"maml.inner_lr", "train.meta_lr"}
    assert (space["maml.inner_lr"].low, space["maml.inner_lr"].high, space["maml.inner_lr"].log) == (0.2, 0.8, True)
    assert space["train.meta_lr"].low == pytest.approx(0.002) and space["train.meta_lr"].high == pytest.approx(0.008)


def test_a_cells_own_entries_are_checked_and_refused_with_the_fix(tmp_path):
    path = config_with(tmp_path, "  maml.inner_steps: {choices: [1, 2]}\n  train.meta_lr: {low: 0.001, high: 0.01}\n")
    space = {d.key: d for d in tune.search_space(path, load_config(path))}
    assert space["maml.inner_steps"].choices == (1, 2) and space["maml.inner_lr"].high == 0.8  # the base's entry
    assert (space["train.meta_lr"].low, space["train.meta_lr"].log) == (0.001, False)
    for entry, words in (("  maml.inner_rate: {low: 0.1, high: 1}\n", "not a config key"),
                         ("  train.tasks: {low: 100, high: 1000}\n", "not a setting of the trained model it can"),
                         ("  device: {choices: [cpu]}\n", "not a setting of the trained model it can"),
                         ("  maml.inner_lr: {low: 0.5, high: 0.1}\n", "is not two numbers, low < high"),
                         ("  maml.inner_lr: {low: 0, high: 0.1, log: true}\n", "log: true needs low > 0"),
                         ("  maml.inner_lr: 0.3\n", "is not a range; fix: e.g.")):
        bad = config_with(tmp_path, entry)
        with pytest.raises(ConfigError, match=words):
            tune.search_space(bad, load_config(bad))


def test_a_study_reads_no_test_episode_and_writes_what_it_learned(tmp_path, glyphs_root, monkeypatch):
    """Three trials of 16 tasks, two validations each: no test episode is drawn and no test-split store is opened
    (spies on the only two ways to them), trials.csv lists them as tuning trials, each an ordinary run that a
    rerun of the same command finds finished."""
    import fsl.data.episodes as episodes
    import fsl.data.store as store
    touched: list[str] = []
    real_dataset, real_store = episodes.EpisodeDataset.__init__, store.open_store

    def dataset_spy(self, *args, **kwargs):
        touched.append(f"episodes:{kwargs.get('stream', 'train')}")
        return real_dataset(self, *args, **kwargs)

    def store_spy(dataset, name, split, *args, **kwargs):
        touched.append(f"store:{split}")
        return real_store(dataset, name, split, *args, **kwargs)
    monkeypatch.setattr(episodes.EpisodeDataset, "__init__", dataset_spy)
    monkeypatch.setattr(store, "open_store", store_spy)
    import fsl.train.cell as cell
    monkeypatch.setattr(cell, "open_store", store_spy)
    finished = tune.run(GLYPHS, tiny(tmp_path, glyphs_root), trials=3, budget=16, reports=2, study="s")
    assert finished == 3
    assert touched and not [t for t in touched if t.endswith(":test")], touched
    assert {"episodes:val", "store:val"} <= set(touched)
    out = tmp_path / "results" / "tuning" / "s"
    table = pd.read_csv(out / "trials.csv")
    assert list(table["state"]) == ["COMPLETE"] * 3 and set(table["kind"]) == {"tuning trial"}
    assert not table["comparable"].any() and set(table["budget"]) == {16} and set(table["tasks"]) == {16}
    assert table["val_accuracy"].between(0, 100).all() and (out / "trials.png").stat().st_size > 0
    assert pd.read_csv(out / "importances.csv")["setting"].tolist() != []
    runs = sorted((tmp_path / "work" / "tune" / "s" / "runs").iterdir())
    assert [r.name for r in runs] == sorted(f"glyphs-conv4-1shot-{name}" for name in table["run"])
    assert not (tmp_path / "results" / "summary.csv").exists()  # trials are never tested
    assert tune.run(GLYPHS, tiny(tmp_path, glyphs_root), trials=3, budget=16, reports=2, study="s") == 3


def test_a_trial_left_running_by_a_stopped_process_is_rerun_not_counted_twice(tmp_path, glyphs_root):
    """A study killed mid-trial: its trial stays RUNNING in the storage. The same command marks it failed, runs its
    settings again (the run directory, named by them, resumes) and counts finished trials only."""
    settings = tiny(tmp_path, glyphs_root)
    tune.run(GLYPHS, settings, trials=1, budget=16, reports=2, study="s")
    storage = f"sqlite:///{tmp_path / 'work' / 'tune' / 's' / 'study.db'}"
    study = optuna.load_study(study_name="s", storage=storage)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = study.ask({"maml.inner_lr": optuna.distributions.FloatDistribution(0.2, 0.8, log=True),
                        "train.meta_lr": optuna.distributions.FloatDistribution(0.002, 0.008, log=True)})
    killed.set_user_attr("worker", f"{tune.socket.gethostname()}:{dead.stdout.strip()}")
    assert tune.run(GLYPHS, settings, trials=2, budget=16, reports=2, study="s") == 2
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == killed.params and trials[2].user_attrs["retry_of"] == killed.number


def test_sqlite_is_for_one_process_and_two_share_a_journal(tmp_path, glyphs_root):
    """A second process on a SQLite study is refused with the alternative; `--jobs 2` runs two worker processes on
    one journal-file study, which together finish the trials asked for."""
    folder = tmp_path / "work" / "tune" / "s"
    folder.mkdir(parents=True)
    with open(folder / "study.db.lock", "w") as held:  # another process holds the study
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another process is running this study on SQLite.*--storage journal"):
            tune.run(GLYPHS, tiny(tmp_path, glyphs_root), trials=1, budget=16, reports=2, study="s")
    with pytest.raises(ConfigError, match="SQLite is for one process .*fix: --storage journal"):
        tune.run(GLYPHS, tiny(tmp_path, glyphs_root), trials=1, budget=16, study="s", storage="sqlite", jobs=2)
    done = subprocess.run([sys.executable, "-m", "fsl", "tune", str(GLYPHS), *tiny(tmp_path, glyphs_root),
                           "--trials", "4", "--budget", "16", "--reports", "2", "--study", "j", "--jobs", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="j", storage=tune.storage_for(tmp_path / "work" / "tune" / "j",
                                                                        "journal", 2))
    finished = [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) >= 4 and len({t.user_attrs["worker"] for t in finished}) == 2


def postgres(tmp_path: Path) -> tuple[list[str], Path]:
    """A throwaway PostgreSQL server's data folder and socket folder; (the command prefix that runs its tools as a
    user it accepts, socket folder). PostgreSQL refuses to run as root: as root, its tools run as `postgres`."""
    import os
    for tool in ("initdb", "pg_ctl"):
        if shutil.which(tool) is None:
            pytest.skip(f"no PostgreSQL server binaries ({tool}) on PATH: the RDB URL path of many machines is "
                        f"untested here")
    pytest.importorskip("psycopg2", reason="no PostgreSQL driver (psycopg2-binary, requirements-dev.txt)")
    prefix = []
    if os.geteuid() == 0:
        import pwd
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres user: PostgreSQL refuses to start as root")
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: PostgreSQL refuses to start as root")
        prefix = ["runuser", "-u", "postgres", "--"]
        shutil.chown(tmp_path, "postgres")
        os.chmod(tmp_path, 0o755)
    return prefix, tmp_path / "sock"


@pytest.mark.filterwarnings("error::FutureWarning")  # Optuna's deprecations (failed_trial_callback, removed in 6)
def test_an_rdb_url_study_on_a_real_postgresql(tmp_path, glyphs_root):
    """Many machines share a study through an RDB URL: here a real PostgreSQL server, started for the test (in a
    folder of its own under /tmp: pytest's are closed to other users, and the socket path must be short), with the
    heartbeat's retry of a stale trial as Optuna 5 names it (no deprecated argument)."""
    import tempfile
    server = Path(tempfile.mkdtemp(prefix="fsl-pg-"))
    prefix, sock = postgres(server)
    data = server / "pg"
    run = lambda *a: subprocess.run([*prefix, *a], capture_output=True, text=True)  # noqa: E731
    if run("mkdir", str(sock)).returncode or run("initdb", "-D", str(data), "-U", "fsl", "--auth=trust").returncode:
        pytest.skip("initdb could not make a database cluster here")
    # the server's output to a log file, pg_ctl's to nowhere: a daemon holding the test's pipes would hang it
    started = subprocess.run([*prefix, "pg_ctl", "-D", str(data), "-l", str(server / "log"), "-o",
                              f"-k {sock} -p 54329 -c listen_addresses=''", "-w", "-t", "60", "start"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if started.returncode:
        log = (server / "log").read_text()[-300:] if (server / "log").exists() else ""
        pytest.skip(f"PostgreSQL did not start ({log})")
    try:
        url = f"postgresql+psycopg2://fsl@/postgres?host={sock}&port=54329"
        work = tmp_path / "study"
        assert tune.run(GLYPHS, tiny(work, glyphs_root), trials=2, budget=16, reports=2, study="pg",
                        storage=url) == 2
        assert len(pd.read_csv(work / "results" / "tuning" / "pg" / "trials.csv")) == 2
        assert not (work / "work" / "tune" / "pg" / "study.db").exists()  # the server holds the study
    finally:
        run("pg_ctl", "-D", str(data), "-w", "stop")
        shutil.rmtree(server, ignore_errors=True)


def test_best_needs_the_cells_own_row_and_optuna_names_its_install(tmp_path, glyphs_root, monkeypatch):
    with pytest.raises(ConfigError, match="has none; fix: train and test the cell first"):
        tune.run(GLYPHS, tiny(tmp_path, glyphs_root), trials=1, budget=16, study="s", best=True)
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ConfigError, match=r"fsl tune needs Optuna.*pip install optuna==5.1.0"):
        tune.optuna_module()
