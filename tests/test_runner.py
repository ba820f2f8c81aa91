"""End to end: train then test on the mini-ImageNet-lite fixture with tiny settings; resume; result files."""
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import MINI_84, REPO, STORE_CACHE, fixture_root

from fsl.config import ConfigError, load_config
from fsl.results import ci95, row_file
from fsl.train import meta_test as evaluate
from fsl.train import meta_train as train
from fsl.train.run_log import RunLog

CONFIG = REPO / "experiments/mini-imagenet-conv4-1shot.yaml"


def tiny(root, tmp_path, *extra):
    """Tiny but real: 28x28 images, 2 queries, 2 tasks per outer step."""
    return [f"data.root={root}", MINI_84, "data.image_size=28", "data.workers=0", "train.parallel_tasks=1", "test.parallel_episodes=1", f"data.cache_dir={STORE_CACHE}",
            "device=cpu", "train.meta_batch=2", "train.queries=2", "train.val_episodes=2", "train.log_every=2",
            "test.episodes=5", f"work_dir={tmp_path / 'work'}", f"results_dir={tmp_path / 'results'}", *extra]


def test_train_then_test_writes_every_file(tmp_path):
    root = fixture_root("mini-imagenet")
    run = [sys.executable, "-m", "fsl"]
    schedule = ["train.tasks=4", "train.val_every=2"]
    subprocess.run(run + ["train", str(CONFIG)] + schedule + tiny(root, tmp_path), cwd=REPO, check=True,
                   capture_output=True)
    run_dir = tmp_path / "work" / "mini-imagenet-conv4-1shot"
    assert {"config.yaml", "log.csv", "latest.pth", "best_accuracy_mean.pth"} <= {p.name for p in run_dir.iterdir()}
    log = pd.read_csv(run_dir / "log.csv")
    assert list(log[log.split == "val"].tasks) == [2, 4] and list(log[log.split == "train"].tasks) == [2, 4]
    out = subprocess.run(run + ["test", str(CONFIG), str(run_dir / "best_accuracy_mean.pth")] + schedule
                         + tiny(root, tmp_path), cwd=REPO, check=True, capture_output=True, text=True).stdout
    summary = pd.read_csv(tmp_path / "results/summary.csv", keep_default_na=False)
    # a run with other training settings than its config file's: its files carry its train_tag (#31)
    assert {"train.tasks=4", "data.image_size=28", "train.meta_batch=2"} <= set(summary.train_tag.iloc[0].split())
    episodes = pd.read_csv(row_file(tmp_path / "results", summary.iloc[0], "test_episodes"))
    assert len(episodes) == 5 and list(episodes.episode) == list(range(5))
    row = summary.iloc[0]
    # summary row against a hand computation of mean and 95% CI from the per-episode file
    accuracies = episodes.accuracy.to_numpy()
    mean = sum(accuracies) / 5
    half_width = 1.96 * math.sqrt(sum((a - mean) ** 2 for a in accuracies) / 5) / math.sqrt(5)
    assert row["mean_acc"] == pytest.approx(mean, abs=1e-4) and row["ci95"] == pytest.approx(half_width, abs=1e-4)
    assert f"{mean:.2f} ± {half_width:.2f}" in out
    assert (row.cell, row.dataset, row.arch, row.ways, row.shots, row.episodes) == \
        ("mini-imagenet-conv4-1shot", "mini-imagenet", "conv4", 5, 1, 5)
    assert (row.reference_mean, row.reference_ci95, bool(row.quick), bool(row.comparable)) == \
        (46.76, 0.42, False, False)
    for column in ("run", "train_tasks", "best_val_tasks", "checkpoint", "seed", "commit", "device", "finished_at",
                   "train_config_sha", "test_config_sha", "precision", "tasks_per_s"):
        assert not pd.isna(row[column]), column
    # re-testing replaces the row instead of adding one
    subprocess.run(run + ["test", str(CONFIG)] + schedule + tiny(root, tmp_path), cwd=REPO, check=True,
                   capture_output=True)
    assert len(pd.read_csv(tmp_path / "results/summary.csv")) == 1


def test_ci95_formula():
    accuracies = np.array([20.0, 40.0, 60.0, 80.0])
    assert ci95(accuracies) == pytest.approx(1.96 * np.sqrt(500.0) / 2)


def test_resume_gives_bit_identical_weights(tmp_path):
    root = fixture_root("mini-imagenet")
    straight = load_config(CONFIG, tiny(root, tmp_path / "a", "train.tasks=8", "train.val_every=4"))
    train.run(straight)
    first_half = load_config(CONFIG, tiny(root, tmp_path / "b", "train.tasks=4", "train.val_every=4"))
    train.run(first_half)
    resumed = load_config(CONFIG, tiny(root, tmp_path / "b", "train.tasks=8", "train.val_every=4"))
    train.run(resumed)
    a = torch.load(straight.run_dir / "latest.pth", weights_only=False)
    b = torch.load(resumed.run_dir / "latest.pth", weights_only=False)
    assert a["tasks_done"] == b["tasks_done"] == 8
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    log_a = pd.read_csv(straight.run_dir / "log.csv")
    log_b = pd.read_csv(resumed.run_dir / "log.csv")
    assert list(log_a.tasks) == list(log_b.tasks)


def test_best_checkpoint_keeps_the_best_validation(tmp_path, monkeypatch):
    scores = iter([50.0, 70.0, 60.0])
    monkeypatch.setattr(train, "evaluate_fitting", lambda *a, parallel=1, **k: (np.array([next(scores)]), parallel))
    cfg = load_config(CONFIG, tiny(fixture_root("mini-imagenet"), tmp_path, "train.tasks=6", "train.val_every=2"))
    train.run(cfg)
    best = torch.load(cfg.run_dir / "best_accuracy_mean.pth", weights_only=False)
    latest = torch.load(cfg.run_dir / "latest.pth", weights_only=False)
    assert (best["tasks_done"], best["best_val_mean"]) == (4, 70.0)
    assert (latest["tasks_done"], latest["best_val_tasks"]) == (6, 4)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The skip is made on the device in fsl.maml (tests/test_maml.py); here: the run reads the flag at the next
    boundary, stops with the task range and the fix, and latest.pth stays the last good one."""
    root = fixture_root("mini-imagenet")
    cfg = load_config(CONFIG, tiny(root, tmp_path, "train.tasks=4", "train.val_every=2"))
    real_step, finite = train.meta_train_step, iter([True, False])

    def diverging(*args, **kwargs):
        stats = real_step(*args, **kwargs)
        return stats if next(finite) else torch.tensor([float("nan"), 0.0, 1.0])
    monkeypatch.setattr(train, "meta_train_step", diverging)
    with pytest.raises(train.TrainingError, match=r"at tasks 3-4.*last good checkpoint.*Fix: lower train.meta_lr"):
        train.run(cfg)
    assert torch.load(cfg.run_dir / "latest.pth", weights_only=False)["tasks_done"] == 2


def test_missing_dataset_root_is_a_clear_cli_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fsl", "train", str(CONFIG), f"data.root={tmp_path / 'none'}",
                             f"work_dir={tmp_path}", "device=cpu"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "mini-ImageNet root folder not found" in result.stderr and "fsl data prepare" in result.stderr


def test_unknown_key_is_a_clear_cli_error():
    result = subprocess.run([sys.executable, "-m", "fsl", "train", str(CONFIG), "train.meta_bach=4"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "did you mean 'train.meta_batch'" in result.stderr


def test_checkpoint_for_another_arch_is_refused(tmp_path):
    cfg = load_config(CONFIG, tiny(fixture_root("mini-imagenet"), tmp_path, "train.tasks=2", "train.val_every=2"))
    train.run(cfg)
    other = load_config(REPO / "experiments/mini-imagenet-resnet12-1shot.yaml", tiny(fixture_root("mini-imagenet"),
                                                                                  tmp_path, "train.tasks=2",
                                                                                  "train.val_every=2"))
    with pytest.raises(ConfigError, match="model.arch: trained with 'conv4', requested 'resnet12'"):
        evaluate.run(other, cfg.run_dir / "best_accuracy_mean.pth")


def test_zero_head_training_keeps_the_head_at_zero_and_testing_must_agree(tmp_path):
    cfg = load_config(CONFIG, tiny(fixture_root("mini-imagenet"), tmp_path, "train.tasks=4", "train.val_every=4",
                                   "maml.zero_head=true", "maml.inner_steps=1"))
    checkpoint = torch.load(train.run(cfg), map_location="cpu", weights_only=False)["model"]
    assert checkpoint["classifier.weight"].abs().max() == 0 and checkpoint["classifier.bias"].abs().max() == 0
    assert evaluate.run(cfg, cfg.run_dir / "best_accuracy_mean.pth")["episodes"] == 5
    protocol = load_config(CONFIG, tiny(fixture_root("mini-imagenet"), tmp_path, "train.tasks=4", "train.val_every=4",
                                        "maml.inner_steps=1"))
    with pytest.raises(ConfigError, match="maml.zero_head: trained with True, requested False"):
        evaluate.run(protocol, cfg.run_dir / "best_accuracy_mean.pth")


def test_tensorboard_holds_the_numbers_of_log_csv(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(CONFIG, tiny(fixture_root("mini-imagenet"), tmp_path, "train.tasks=8", "train.val_every=4"))
    train.run(cfg)
    log = pd.read_csv(cfg.run_dir / "log.csv")
    events = EventAccumulator(str(cfg.run_dir / "tb"))
    events.Reload()
    for split, names in RunLog.SCALARS.items():
        rows = log[log.split == split]
        for name in names:
            scalars = events.Scalars(f"{split}/{name}")
            assert [s.step for s in scalars] == list(rows.tasks), (split, name)
            assert [s.value for s in scalars] == pytest.approx(list(rows[name]), rel=1e-6), (split, name)
    assert len(log[log.split == "train"]) == 4 and len(log[log.split == "val"]) == 2


def test_a_test_with_other_settings_never_replaces_the_runs_own_result(tmp_path):
    """`fsl test` of a finished run with test.episodes=10 adds a row and a CSV beside the run's own (keyed by run and
    test settings); the run's own row and per-episode CSV survive, and the tables use them."""
    from fsl.results import read_summary, report

    cfg = load_config(CONFIG, tiny(fixture_root("mini-imagenet"), tmp_path, "train.tasks=2", "train.val_every=2"))
    best = train.run(cfg)
    own = evaluate.run(cfg, best)
    own_csv = tmp_path / "results/mini-imagenet-conv4-1shot/test_episodes.csv"
    before = own_csv.read_bytes()
    other = evaluate.run(load_config(CONFIG, tiny(fixture_root("mini-imagenet"), tmp_path, "train.tasks=2",
                                                  "train.val_every=2", "test.episodes=10")), best)
    assert (own["test_tag"], other["test_tag"]) == ("", "test.episodes=10") and other["episodes"] == 10
    summary = read_summary(tmp_path / "results")
    assert len(summary) == 2 and set(summary["episodes"]) == {5, 10}
    assert summary[summary["test_tag"] == ""]["mean_acc"].item() == pytest.approx(own["mean_acc"])
    assert own_csv.read_bytes() == before
    assert len(list(own_csv.parent.glob("test_episodes__test-*.csv"))) == 1
    report.run(tmp_path / "results")
    assert "test.episodes=10" in (tmp_path / "results/tables/other_tests.md").read_text()
    assert "| 5 |" in (tmp_path / "results/tables/mini-imagenet.md").read_text()


def test_test_settings_the_split_cannot_fill_are_named_before_the_checkpoint(tmp_path):
    """`fsl test ... test.shots=100`: the real problem (too few images per class), not a missing run directory."""
    result = subprocess.run([sys.executable, "-m", "fsl", "test", str(CONFIG), "test.shots=100",
                             f"data.root={fixture_root('mini-imagenet')}", MINI_84, f"work_dir={tmp_path}"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "fewer images than test.shots + test.queries = 100 + 15" in result.stderr
    assert "checkpoint not found" not in result.stderr


def test_a_redirected_training_log_is_plain_lines(tmp_path):
    """stderr to a file (Slurm, nohup, CI): no carriage-return frames, one progress line per interval and the last
    (here every 0 s would be every refresh: the interval is 30 s, so a short run writes its first and last lines)."""
    root = fixture_root("mini-imagenet")
    with open(tmp_path / "train.log", "w") as log:
        subprocess.run([sys.executable, "-m", "fsl", "train", str(CONFIG), "train.tasks=40", "train.val_every=20",
                        *tiny(root, tmp_path)], cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    text = (tmp_path / "train.log").read_text()
    assert "\r" not in text
    progress = [line for line in text.splitlines() if line.startswith("mini-imagenet-conv4-1shot: ")]
    assert 1 <= len(progress) <= 4, progress  # 40 tasks in seconds: the first line, then the final one
    assert progress[-1].startswith("mini-imagenet-conv4-1shot: 40/40 task (100%)") and "ETA" in progress[-1]
    assert "loss=" in progress[-1] and "acc=" in progress[-1]
    assert sum(line.startswith("task ") and ": validation " in line for line in text.splitlines()) == 2  # own lines


def test_progress_lines_come_at_most_once_per_interval(monkeypatch):
    import io

    from fsl.data import progress
    clock = iter(range(0, 10_000, 7))  # 7 s per refresh
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    bar = progress.progress_bar(interval=30, total=100, desc="x", unit="task", file=out, mininterval=0)
    for _ in range(100):
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and lines[-1].startswith("x: 100/100 task (100%)")
    assert 2 <= len(lines) <= 100 * 7 // 30 + 2
