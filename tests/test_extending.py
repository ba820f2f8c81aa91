"""docs/extending.md's worked examples (docs/examples/): a dataset, a backbone and an inner-loop variant, each built
and checked here, then run as a tiny cell through the example's own command line, as the page says to."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, STORE_CACHE

from fsl import config
from fsl.config import load_config
from fsl.data import READERS
from fsl.maml import InnerLoop, adapt, adapted_mask, build_learner
from fsl.maml.loop import ADAPT_RULES
from fsl.models import BACKBONES, build_model

EXAMPLES = REPO / "docs" / "examples"
GLYPHS = str(REPO / "experiments/glyphs-conv4-1shot.yaml")


@pytest.fixture
def example():
    """Import docs/examples/<name>.py (which registers its extension), and undo the registration afterwards."""
    saved = [list(config.DATASETS), list(config.ARCHS), list(config.GREYSCALE), list(config.ADAPT),
             dict(READERS), dict(BACKBONES), dict(ADAPT_RULES)]

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    yield load
    for target, before in zip((config.DATASETS, config.ARCHS, config.GREYSCALE, config.ADAPT, READERS, BACKBONES,
                               ADAPT_RULES), saved):
        target.clear()
        target.extend(before) if isinstance(target, list) else target.update(before)


def tiny_cell(script: str, tmp_path, *settings: str) -> pd.Series:
    """`python docs/examples/<script> train|test <glyphs cell> ...` with tiny settings; the summary row."""
    args = [GLYPHS, "device=cpu", "data.workers=0", f"data.cache_dir={STORE_CACHE}", "train.tasks=16",
            "train.val_every=16", "train.val_episodes=4", "train.log_every=8", "test.episodes=20",
            f"work_dir={tmp_path / 'work'}", f"results_dir={tmp_path / 'results'}", *settings]
    for command in ("train", "test"):
        done = subprocess.run([sys.executable, str(EXAMPLES / script), command, *args], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    return pd.read_csv(tmp_path / "results" / "summary.csv", keep_default_na=False).iloc[0]


def write_arrays(root, classes: dict[str, int], per_class: int = 20, size: int = 20) -> None:
    """ROOT/{split}.npz of coloured 4x4 block patterns, one per class (learnable from one shot), with pixel noise."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    first = 0
    for split, count in classes.items():
        patterns = rng.integers(0, 256, (count, 4, 4, 3)).repeat(size // 4, 1).repeat(size // 4, 2)
        images = patterns.repeat(per_class, 0) + rng.normal(0, 20, (count * per_class, size, size, 3))
        labels = np.arange(first, first + count).repeat(per_class)  # ids need not start at 0 in each split
        np.savez(root / f"{split}.npz", images=images.clip(0, 255).astype(np.uint8), labels=labels)
        first += count


def test_a_dataset_reader_registered_reads_its_splits(example, tmp_path):
    write_arrays(tmp_path / "arrays", {"train": 12, "val": 6, "test": 6})
    module = example("npz_dataset")
    assert READERS["npz"] is module.NpzDataset and "npz" in config.DATASETS
    split = READERS["npz"](tmp_path / "arrays", "val")
    assert (split.num_classes, len(split), split.labels[:21]) == (6, 120, [0] * 20 + [1])
    assert split.class_names[0] == "12" and split.load_image(20).size == (20, 20)
    assert load_config(GLYPHS, ["data.dataset=npz"]).cell == "npz-conv4-1shot"
    np.savez(tmp_path / "arrays/test.npz", images=np.zeros((2, 20, 20), np.uint8), labels=np.zeros(2))
    with pytest.raises(Exception, match=r"test.npz: images are uint8 \(2, 20, 20\); fix: uint8 \(N, H, W, 3\)"):
        READERS["npz"](tmp_path / "arrays", "test")


def test_the_dataset_example_runs_a_cell(tmp_path):
    write_arrays(tmp_path / "arrays", {"train": 12, "val": 6, "test": 6})
    check = subprocess.run([sys.executable, str(EXAMPLES / "npz_dataset.py"), "data", "check", "npz", "--root",
                            str(tmp_path / "arrays"), "--shots", "1", "--queries", "5"], cwd=REPO,
                           capture_output=True, text=True)
    assert check.returncode == 0 and "test" in check.stdout and "6 classes" in check.stdout, check.stdout
    row = tiny_cell("npz_dataset.py", tmp_path, "data.dataset=npz", f"data.root={tmp_path / 'arrays'}")
    assert (row.run, row.dataset, row.episodes, row.train_tasks) == ("npz-conv4-1shot", "npz", 20, 16)
    assert row.mean_acc > 60  # one shot of a distinct pattern per class, zero head: near-prototype accuracy


def test_a_backbone_registered_keeps_each_tasks_features_its_own(example):
    example("conv6_backbone")
    assert "conv6" in config.ARCHS
    torch.manual_seed(0)
    model = build_model("conv6", ways=5, image_size=20)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 6 and model.feature_dim == 64
    x = torch.randn(3, 10, 3, 20, 20)  # 3 tasks of 10 images
    together = model(x)
    assert together.shape == (3, 10, 5)
    for task in range(3):  # a task alone gives what it gave beside the others
        torch.testing.assert_close(model(x[task]), together[task], rtol=1e-5, atol=1e-5)


def test_the_backbone_example_runs_a_cell(glyphs_root, tmp_path):
    row = tiny_cell("conv6_backbone.py", tmp_path, "model.arch=conv6", f"data.root={glyphs_root}")
    assert (row.run, row.arch, row.episodes) == ("glyphs-conv6-1shot", "conv6", 20) and row.mean_acc > 20


def test_an_adapt_rule_registered_adapts_only_what_it_says(example):
    example("boil_variant")
    cfg = load_config(GLYPHS, ["maml.adapt=body", "maml.zero_head=false", "maml.inner_steps=2", "device=cpu"])
    torch.manual_seed(0)
    model, rates = build_learner(cfg)
    loop = InnerLoop.training(cfg)
    mask = adapted_mask(model, loop)
    names = [name for name, _ in model.named_parameters()]
    assert [n for n, m in zip(names, mask) if not m] == ["classifier.weight", "classifier.bias"]
    x, y = torch.randn(1, 5, 3, 20, 20), torch.arange(5).unsqueeze(0)
    adapted = adapt(model, x, y, loop, rates)
    fast = dict(zip(names, adapted.fast_params))
    assert torch.equal(fast["classifier.weight"][0], model.classifier.weight)  # (tasks, ...) fast weights
    assert not torch.equal(fast["features.0.weight"][0], model.features[0].weight)
    adapted(x).logsumexp(-1).sum().backward()  # the head is meta-learned through the adapted body
    assert model.classifier.weight.grad.abs().sum() > 0 and model.features[0].weight.grad.abs().sum() > 0
    zero = InnerLoop.training(load_config(GLYPHS, ["maml.adapt=body"]))
    with pytest.raises(config.ConfigError, match="maml.zero_head=true with maml.adapt=body, which never adapts"):
        adapted_mask(model, zero)


def test_the_variant_example_runs_a_cell(glyphs_root, tmp_path):
    row = tiny_cell("boil_variant.py", tmp_path, "maml.adapt=body", "maml.zero_head=false", "name=boil",
                    f"data.root={glyphs_root}")
    assert (row.run, row.episodes) == ("glyphs-conv4-1shot-boil", 20) and row.mean_acc > 20


def test_plain_fsl_refuses_what_only_an_example_registers(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fsl", "train", GLYPHS, "maml.adapt=body", "device=cpu"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "maml.adapt='body'; choose one of all, head" in done.stderr
