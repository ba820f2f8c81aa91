"""Provenance: what a test takes from the checkpoint, what resume refuses, which rows are the reference's protocol."""
import pandas as pd
import pytest
import torch
from conftest import MINI_84, REPO, STORE_CACHE, fixture_root

from fsl.config import ConfigError, load_config
from fsl.results import is_done
from fsl.results.provenance import check_resume, comparability, meta_test_config, meta_test_sha, train_sha
from fsl.train import meta_test as evaluate
from fsl.train import meta_train as train

CONFIG = REPO / "experiments/mini-imagenet-conv4-1shot.yaml"


def cfg(*overrides):
    return load_config(CONFIG, list(overrides))


def test_hashes_separate_model_test_and_run_settings():
    base = cfg()
    assert train_sha(cfg("device=cpu", "data.root=/x", "work_dir=/w", "data.workers=0", "test.episodes=5")) == \
        train_sha(base)
    assert train_sha(cfg("train.tasks=10")) != train_sha(base)
    assert train_sha(cfg("test.shots=5")) != train_sha(base)  # validation episodes are 5-shot then
    assert meta_test_sha(cfg("test.episodes=5")) != meta_test_sha(base)
    assert meta_test_sha(cfg("train.tasks=10", "device=cpu")) == meta_test_sha(base)


def test_test_takes_the_checkpoint_settings_and_refuses_others():
    trained = cfg("train.tasks=2000", "maml.inner_lr=0.02")
    effective = meta_test_config(trained, cfg("train.tasks=2000", "maml.inner_lr=0.02", "test.episodes=10",
                                         "device=cpu", "precision=bf16"), "run/best.pth")
    assert (effective.train.tasks, effective.maml.inner_lr, effective.test.episodes, effective.device,
            effective.precision) == (2000, 0.02, 10, "cpu", "bf16")
    with pytest.raises(ConfigError) as error:
        meta_test_config(trained, cfg(), "run/best.pth")
    message = str(error.value)
    assert "train.tasks: trained with 2000, requested 100000" in message
    assert "maml.inner_lr: trained with 0.02, requested 0.01" in message
    assert "fix: test with the config and overrides it was trained with (e.g. add `maml.inner_lr=0.02 " \
           "train.tasks=2000`)" in message


def test_resume_refuses_a_changed_experiment():
    stored = cfg("train.tasks=400")
    check_resume(stored, cfg("train.tasks=400", "device=cpu", "data.workers=0", "train.log_every=8",
                             "test.episodes=3"), "w/latest.pth", 200)
    check_resume(stored, cfg("train.tasks=800"), "w/latest.pth", 200)  # longer, constant meta lr: allowed
    with pytest.raises(ConfigError, match=r"maml.inner_lr: checkpoint 0.01, now 0.02(.|\n)*fix: restore the "
                                          r"checkpoint's values to resume \(`maml.inner_lr=0.01`\), or start a new "
                                          r"experiment in another folder \(work_dir=...\)"):
        check_resume(stored, cfg("train.tasks=400", "maml.inner_lr=0.02"), "w/latest.pth", 200)
    cosine = cfg("train.tasks=400", "train.meta_lr_schedule=cosine")
    with pytest.raises(ConfigError, match="train.meta_lr_schedule=cosine would change from the next step on"):
        check_resume(cosine, cfg("train.tasks=800", "train.meta_lr_schedule=cosine"), "w/latest.pth", 200)
    # MAML++'s derivative-order annealing and multi-step loss are laid out over train.tasks too, under a constant lr
    annealed = ["maml.multi_step_loss=true", "maml.first_order_fraction=0.3"]
    with pytest.raises(ConfigError, match=r"maml.first_order_fraction=0.3, maml.multi_step_loss \(maml.msl_fraction="
                                          r"0.15\) would change"):
        check_resume(cfg("train.tasks=1000", *annealed), cfg("train.tasks=100000", *annealed), "w/latest.pth", 800)
    with pytest.raises(ConfigError, match="train.tasks: checkpoint 400, now 100"):
        check_resume(stored, cfg("train.tasks=100"), "w/latest.pth", 200)


def test_comparability_names_every_reason():
    protocol = cfg()
    assert comparability(protocol, protocol, 100_000, 96_000, 96_000) == (True, "")
    assert comparability(protocol, cfg("device=cpu", "precision=tf32"), 100_000, 96_000, 96_000)[0]
    assert comparability(protocol, cfg("device=cpu", "precision=bf16"), 100_000, 96_000, 96_000) == \
        (False, "test in precision=bf16 (comparable: fp32, tf32)")
    assert comparability(cfg("precision=bf16"), protocol, 100_000, 96_000, 96_000) == \
        (False, "training in precision=bf16 (comparable: fp32, tf32)")
    short = cfg("train.tasks=2000")
    ok, why = comparability(short, short, 2000, 2000, 2000)
    assert not ok and why == "settings differ from the protocol: train.tasks=2000 (protocol 100000)"
    ok, why = comparability(protocol, cfg("test.episodes=100"), 60_000, 40_000, 40_000)
    assert why == ("settings differ from the protocol: test.episodes=100 (protocol 2000); training stopped at 60000 "
                   "of 100000 tasks")
    assert comparability(protocol, protocol, 100_000, 100_000, 96_000)[1] == \
        "tested weights of task 100000, not the validation-selected ones (task 96000)"
    quick = cfg("quick=true")
    assert comparability(quick, quick, 400, 400, 400) == (False, "quick sanity run")
    glyphs = load_config(REPO / "experiments/glyphs-conv4-1shot.yaml")
    assert comparability(glyphs, glyphs, 9600, 9600, 9600) == \
        (False, "no reference number for this cell and variant (maml+zero_head+cosine)")
    mini_fomaml = load_config(REPO / "experiments/variants/mini-imagenet-conv4-1shot-fomaml.yaml")
    assert comparability(mini_fomaml, mini_fomaml, 100_000, 96_000, 96_000) == \
        (False, "no reference number for this cell and variant (fomaml)")


def test_omniglot_comparability_tests_the_final_weights_and_its_fomaml_has_a_reference():
    omniglot = load_config(REPO / "experiments/omniglot-conv4-1shot.yaml")
    assert comparability(omniglot, omniglot, 1_920_000, 1_920_000, 16_000) == (True, "")
    assert comparability(omniglot, omniglot, 1_920_000, 16_000, 16_000) == \
        (False, "tested weights of task 16000, not the final ones (task 1920000)")
    stopped = load_config(REPO / "experiments/omniglot-conv4-1shot.yaml", ["train.stop_at=64000"])
    assert comparability(stopped, stopped, 64_000, 64_000, 48_000) == \
        (False, "training stopped at 64000 of 1920000 tasks")
    fomaml = load_config(REPO / "experiments/variants/omniglot-conv4-20way-5shot-fomaml.yaml")
    assert comparability(fomaml, fomaml, 960_000, 960_000, 8_000) == (True, "")


def tiny(tmp_path, *extra):
    return [f"data.root={fixture_root('mini-imagenet')}", MINI_84, "data.image_size=28", "data.workers=0", "train.parallel_tasks=1", "test.parallel_episodes=1",
            f"data.cache_dir={STORE_CACHE}", "device=cpu", "train.meta_batch=2", "train.queries=2",
            "train.val_episodes=2", "train.log_every=2", "test.episodes=5", f"work_dir={tmp_path / 'work'}",
            f"results_dir={tmp_path / 'results'}", *extra]


def test_short_run_is_recorded_as_such_and_not_done(tmp_path):
    """The issue's case: a short training run tested is recorded with its own tasks and hashes, never counted as
    the protocol's result, and testing it under the protocol's train.tasks is refused."""
    trained = load_config(CONFIG, tiny(tmp_path, "train.tasks=4", "train.val_every=2"))
    best = train.run(trained)
    with pytest.raises(ConfigError, match="train.tasks: trained with 4, requested 100000"):
        evaluate.run(load_config(CONFIG, tiny(tmp_path)), best)
    row = evaluate.run(load_config(CONFIG, tiny(tmp_path, "train.tasks=4", "train.val_every=2", "test.episodes=3")),
                       best)
    assert (row["train_tasks"], row["episodes"], row["comparable"], row["precision"]) == (4, 3, False, "fp32")
    assert row["best_val_tasks"] in (2, 4) and row["train_config_sha"] == train_sha(trained)
    assert "train.tasks=4 (protocol 100000)" in row["not_comparable_why"]
    assert row["tasks_per_s"] > 0 and pd.isna(row["peak_memory_mb"])  # no GPU memory on the CPU
    assert not is_done(trained, CONFIG)
    summary = pd.read_csv(tmp_path / "results/summary.csv")
    assert list(summary["run"]) == ["mini-imagenet-conv4-1shot"] and not summary["comparable"][0]


def test_resume_with_another_inner_lr_is_refused_and_leaves_the_checkpoint(tmp_path):
    first = load_config(CONFIG, tiny(tmp_path, "train.tasks=2", "train.val_every=2"))
    train.run(first)
    before = torch.load(first.run_dir / "latest.pth", weights_only=False)
    changed = load_config(CONFIG, tiny(tmp_path, "train.tasks=4", "train.val_every=2", "maml.inner_lr=0.5"))
    with pytest.raises(ConfigError, match="maml.inner_lr: checkpoint 0.01, now 0.5"):
        train.run(changed)
    after = torch.load(first.run_dir / "latest.pth", weights_only=False)
    assert after["tasks_done"] == 2 and all(torch.equal(v, after["model"][k]) for k, v in before["model"].items())


def test_a_row_names_a_clean_commit_beside_uncommitted_results(tmp_path, monkeypatch):
    """Rows written into results/ (or benchmarks/results/) are outputs: a test run after another row was written
    still names the clean code commit; a change to code makes it '+dirty'."""
    import subprocess

    from fsl.results.files import git_commit
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.csv").write_text("run\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "code")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "summary.csv").write_text("run\na\n")
    (tmp_path / "results" / "new.csv").write_text("episode\n")
    assert not git_commit().endswith("+dirty") and len(git_commit()) == 40
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit().endswith("+dirty")


def test_a_folder_runs_other_data_root_is_refused_without_listing_data_root_as_free():
    """#49 UNCLEAR: testing a folder-trained checkpoint with another data.root was refused, while the message listed
    data.root among the settings that may differ at test."""
    from fsl.config import ConfigError, load_config
    from fsl.results.provenance import meta_test_config
    folder = REPO / "experiments/folder-conv4-5shot.yaml"
    trained, requested = (load_config(folder, [f"data.root=/data/{name}"]) for name in ("birds", "cars"))
    with pytest.raises(ConfigError) as refused:
        meta_test_config(trained, requested, "w/best.pth")
    message = str(refused.value)
    assert "data.root: trained with '/data/birds', requested '/data/cars'" in message
    assert "(a folder dataset's data.root is its data)" in message
    assert "data.root," not in message.split("may differ at test")[0].split("run settings")[1]
