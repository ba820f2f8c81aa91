"""Omniglot, the MAML paper's own benchmark (#29): the reader in both forms, its split, `fsl data check` and
`prepare`, the class rotations against learn2learn's, Finn et al.'s network and inner loop against a plain float64
reference, and a tiny Omniglot cell trained and tested through `make`."""
from __future__ import annotations

import io
import random
import subprocess
import sys
import urllib.request
import zipfile

import learn2learn as l2l
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from conftest import REPO, STORE_CACHE, fixture_root
from PIL import Image

from fsl.config import load_config
from fsl.data import load_split
from fsl.data.base import DatasetError
from fsl.data.episodes import (
    EpisodeDataset,
    EpisodeMaker,
    SplitLabels,
    build_taskset,
    collate_specs,
    items_to_arrays,
    seeded,
)
from fsl.data.store import open_store
from fsl.maml import InnerLoop, adapted_mask, build_learner, meta_train_step
from fsl.models import TaskBatchNorm2d, TaskConv2d
from fsl.results import read_summary, report, row_file
from fsl.results.reference import OMNIGLOT, reference

CELL = REPO / "experiments" / "omniglot-conv4-1shot.yaml"


@pytest.fixture(scope="module")
def root():
    return fixture_root("omniglot")


@pytest.fixture(scope="module")
def test_split(root):
    return load_split("omniglot", root, "test")


def test_reader_counts_the_release_and_splits_characters(root):
    splits = {split: load_split("omniglot", root, split) for split in ("train", "val", "test")}
    assert {s: (d.num_classes, len(d)) for s, d in splits.items()} == \
        {"train": (1100, 22000), "val": (100, 2000), "test": (423, 8460)}
    names = [set(d.class_names) for d in splits.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    everything = set().union(*names)
    assert len(everything) == 1623
    alphabets = set().union(*(d.groups()["alphabets"] for d in splits.values()))
    assert len(alphabets) == 50
    assert sum(a.startswith("images_background/") for a in alphabets) == 30
    assert sum(name.startswith("images_background/") for name in everything) == 964
    # characters, not alphabets, are split: most alphabets have characters in train and in test
    shared = splits["train"].groups()["alphabets"] & splits["test"].groups()["alphabets"]
    assert len(shared) >= 45
    # the split is fixed (SPLIT_SEED): a regression guard on its first characters
    assert splits["train"].class_names[0] == "images_background/Malay_(Jawi_-_Arabic)/character15"
    assert splits["test"].class_names[0] == "images_background/Tifinagh/character09"
    assert all(n == 20 for n in splits["val"].images_per_class().values())


def test_extracted_folders_read_as_the_archives(root, tmp_path):
    for name in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(root / f"{name}.zip") as archive:
            archive.extractall(tmp_path)
    zipped, extracted = load_split("omniglot", root, "val"), load_split("omniglot", tmp_path, "val")
    assert zipped.class_names == extracted.class_names and zipped.labels == extracted.labels
    assert zipped.paths == extracted.paths
    for index in (0, 777, len(zipped) - 1):
        assert np.array_equal(np.asarray(zipped.load_image(index)), np.asarray(extracted.load_image(index)))
    assert extracted.source(0).startswith(str(tmp_path)) and ".zip:" in zipped.source(0)


def test_a_missing_archive_names_the_prepare_command(tmp_path):
    with pytest.raises(DatasetError, match="fsl data prepare omniglot"):
        load_split("omniglot", tmp_path, "train")


def test_binary_images_are_pils_resize_of_the_1bit_archive_images_and_ink_is_one(root, test_split):
    """The default input form (data.omniglot_images=binary) is cbfinn's resize_images.py: PIL's resize of the mode
    "1" archive image (NEAREST, whatever filter is asked), values 0 and 255 only."""
    assert test_split.images == "binary"
    store = open_store(test_split, "omniglot", "test", "eval", 28, STORE_CACHE, progress=False)
    for index in (0, 5, 4000, 8459):
        with Image.open(io.BytesIO(test_split.read(index))) as original:
            assert original.mode == "1" and original.size == (105, 105)
            expected = np.asarray(original.resize((28, 28), resample=Image.LANCZOS).convert("L"))  # as cbfinn
        assert np.array_equal(store.pixels[index][..., 0], expected), index
    assert set(np.unique(store.pixels[:200])) == {0, 255}
    episodes = EpisodeDataset(test_split, 5, 1, 1, seed=0, count=1)
    x = EpisodeMaker(store, 5, 1, 1, 28, torch.device("cpu"), normalisation=test_split.normalisation)(
        collate_specs([episodes[0]])).support_x
    assert x.shape == (1, 5, 1, 28, 28)
    assert torch.allclose(x, 1 - torch.from_numpy(store.pixels[episodes[0].indices[::2]][..., :1]).permute(0, 3, 1, 2)
                          .float().unsqueeze(0) / 255, atol=1e-6)  # 1 - p / 255: ink exactly 1, paper 0
    assert x.mean() < 0.3  # mostly paper (0); the strokes are 1


def test_greyscale_images_are_lanczos_resized_greyscale(root):
    greyscale = load_split("omniglot", root, "test", images="greyscale")
    store = open_store(greyscale, "omniglot", "test", "eval", 28, STORE_CACHE, progress=False)
    original = greyscale.load_image(5)
    assert original.size == (105, 105)
    expected = np.asarray(original.convert("L").resize((28, 28), Image.LANCZOS))
    assert np.array_equal(store.pixels[5][..., 0], expected)
    assert len(np.unique(store.pixels[:200])) > 50  # smooth edges: many grey levels
    binary = open_store(load_split("omniglot", root, "test"), "omniglot", "test", "eval", 28, STORE_CACHE,
                        progress=False)
    assert binary.path != store.path  # each form has its own store
    with pytest.raises(DatasetError, match="images='grey'.*binary, greyscale"):
        load_split("omniglot", root, "test", images="grey")


def test_episode_i_of_each_split_comes_from_its_own_stream(root):
    """Training, validation and test episode i are drawn from streams of (seed, split): their class rotations (a
    5-vector of quarter turns) coincide about as often as independent draws do (1 in 4**5). When every split drew
    episode i from (seed, i), 86 % of validation and test episodes had the same rotation vector."""
    from fsl.train.cell import FixedEpisodes
    cfg = load_config(CELL, ["device=cpu", f"data.root={root}", f"data.cache_dir={STORE_CACHE}"])
    count = 300
    val, test = FixedEpisodes(cfg, "val", count), FixedEpisodes(cfg, "test", count)
    train = EpisodeDataset(load_split("omniglot", root, "train"), 5, 1, 1, seed=cfg.seed, count=count,
                           rotations=True, stream="train")

    def vectors(specs):
        return np.stack([spec.turns[::2] for spec in specs])  # each class's turns, (count, 5)
    train_turns, val_turns, test_turns = vectors(train[i] for i in range(count)), vectors(val.specs), \
        vectors(test.specs)
    for a, b in ((val_turns, test_turns), (train_turns, test_turns), (train_turns, val_turns)):
        assert (a == b).all(1).mean() < 0.02
        assert (a == b).mean() < 0.35  # single classes: 1 in 4 by chance
    assert cfg.seed == cfg.test.seed == 0  # the same seeds: the streams alone keep them apart


def test_a_checkpoint_of_the_shared_streams_is_refused_for_resuming(tmp_path):
    """A checkpoint written before #36 carries no episode_streams: it was trained on the shared streams, and a resume
    on today's per-split streams would mix two task sequences. It is refused, naming both and the fix."""
    from fsl.train.checkpoint import CheckpointError, check_streams
    check_streams({"episode_streams": "per-split"}, tmp_path / "latest.pth")
    for old in ({}, {"episode_streams": "shared"}):
        with pytest.raises(CheckpointError, match=r"trained on the 'shared' episode streams .* this fsl draws "
                                                  r"'per-split' streams.*Fix: test it as it is"):
            check_streams(old, tmp_path / "latest.pth")


def test_data_check_prints_the_characters_and_the_split(root):
    out = subprocess.run([sys.executable, "-m", "fsl", "data", "check", "omniglot", "--root", str(root), "--no-decode"],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "omniglot all  : 1,623 classes  32,460 images, 50 alphabets" in out
    assert "omniglot split of the classes (train / val / test): 1,100 / 100 / 423" in out
    assert out.strip().endswith(": OK")


def test_prepare_downloads_the_official_archives_and_checks_their_md5(tmp_path, monkeypatch):
    from fsl.data import prepare

    requested = []

    class Archive(io.BytesIO):
        headers = {"Content-Type": "application/zip"}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def serve(url, timeout):
        requested.append(url)
        return Archive(b"PK\x03\x04 not the release")
    monkeypatch.setattr(urllib.request, "urlopen", serve)
    with pytest.raises(DatasetError, match=r"md5 \w+ != published 68d2efa1b9178cc56df9314c21c6e718"):
        prepare.prepare("omniglot", tmp_path)
    assert requested == ["https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip"]
    assert not list(tmp_path.glob("*.zip*"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetError, match="manual steps") as error:
        prepare.prepare("omniglot", tmp_path)
    assert "6b91aef0f799c5bb55b94e3f2daec811" in str(error.value) and "images_evaluation.zip" in str(error.value)


class AngleRecorder(torch.nn.Module):
    """Stands in for torchvision's RandomRotation inside learn2learn's RandomClassRotation: records each angle."""
    angles: list[float] = []

    def __init__(self, degrees):
        super().__init__()
        self.angle = degrees[0]
        AngleRecorder.angles.append(degrees[0])

    def forward(self, x):
        return TF.rotate(x, self.angle)


def test_class_rotations_draw_learn2learn_angles_and_turn_pixels_as_torchvision(test_split, monkeypatch):
    """ClassRotations draws what learn2learn's RandomClassRotation draws (same calls, same order), and np.rot90 of a
    stored image is torchvision's rotation by the same angle."""
    monkeypatch.setattr(l2l.vision.transforms.transforms, "RandomRotation", AngleRecorder)
    ours = build_taskset(test_split, 5, 1, 1, rotations=True)
    meta = l2l.data.MetaDataset(SplitLabels(test_split.labels), indices_to_labels=test_split.indices_to_labels())
    theirs = l2l.data.Taskset(meta, task_collate=items_to_arrays, task_transforms=[
        l2l.data.transforms.NWays(meta, n=5), l2l.data.transforms.KShots(meta, k=2),
        l2l.data.transforms.LoadData(meta), l2l.data.transforms.RemapLabels(meta, shuffle=True),
        l2l.data.transforms.ConsecutiveLabels(meta),
        l2l.vision.transforms.RandomClassRotation(meta, [0.0, 90.0, 180.0, 270.0])])
    for episode in range(50):
        AngleRecorder.angles = []
        with seeded(7, episode):
            indices, labels, turns = ours.get_task(ours.sample_task_description())
        with seeded(7, episode):
            their_indices = theirs.sample_task_description()
        assert [d.index for d in their_indices] == indices.tolist()
        assert (turns.reshape(5, 2) == turns.reshape(5, 2)[:, :1]).all()  # one angle per class
        assert turns.reshape(5, 2)[:, 0].tolist() == [int(a) // 90 for a in AngleRecorder.angles]
    store = open_store(test_split, "omniglot", "test", "eval", 28, STORE_CACHE, progress=False)
    image = np.array(store.pixels[3])
    for k in range(4):
        turned = torch.from_numpy(np.ascontiguousarray(np.rot90(image, k, axes=(0, 1)))).permute(2, 0, 1)
        by_torchvision = TF.rotate(torch.from_numpy(image).permute(2, 0, 1), 90.0 * k)
        assert torch.equal(turned, by_torchvision), k


def test_learn2learn_random_class_rotation_turns_every_class_alike():
    """Why fsl has its own ClassRotations: in learn2learn 0.2.0 each image's lambda reads the loop variable
    `rotation` after the loop, so every image of a task gets the last class's angle."""
    class Marked(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            x = torch.zeros(1, 8, 8)
            x[0, 0] = 1  # the top row lit: its orientation tells the rotation
            return x, i // 4
    meta = l2l.data.MetaDataset(Marked())
    taskset = l2l.data.Taskset(meta, task_transforms=[
        l2l.data.transforms.NWays(meta, 5), l2l.data.transforms.KShots(meta, 2), l2l.data.transforms.LoadData(meta),
        l2l.data.transforms.ConsecutiveLabels(meta), l2l.vision.transforms.RandomClassRotation(meta, [0.0, 90.0,
                                                                                                     180.0, 270.0])])
    random.seed(0)
    alike = 0
    for _ in range(100):
        x, _ = taskset.sample()
        lit = [int(torch.stack([img[0, 0].sum(), img[0, :, 0].sum(), img[0, -1].sum(), img[0, :, -1].sum()]).argmax())
               for img in x]
        alike += len(set(lit)) == 1
    assert alike == 100  # with one angle per class, all five alike in 1 task of 256


def test_class_rotations_are_uniform_per_class_and_independent(test_split):
    episodes = EpisodeDataset(test_split, 5, 1, 1, seed=0, count=800, rotations=True)
    turns = np.stack([episodes[i].turns.reshape(5, 2) for i in range(len(episodes))])  # (episode, class, image)
    assert (turns[:, :, 0] == turns[:, :, 1]).all()
    per_class = turns[:, :, 0]
    counts = np.bincount(per_class.ravel(), minlength=4)
    assert np.abs(counts - 1000).max() < 4 * np.sqrt(1000 * 0.75)  # 4000 draws, uniform over 4 turns
    same = (per_class == per_class[:, :1]).all(1).mean()
    assert same < 0.02  # independent classes: 1 / 256 of the episodes
    first_two = np.bincount(per_class[:, 0] * 4 + per_class[:, 1], minlength=16)
    assert np.abs(first_two - 50).max() < 5 * np.sqrt(50)  # joint of two classes: uniform over 16


def test_episode_images_are_the_store_images_turned(test_split):
    store = open_store(test_split, "omniglot", "test", "eval", 28, STORE_CACHE, progress=False)
    spec = EpisodeDataset(test_split, 5, 1, 1, seed=3, count=1, rotations=True)[0]
    episode = EpisodeMaker(store, 5, 1, 1, 28, torch.device("cpu"), normalisation=test_split.normalisation)(
        collate_specs([spec]))
    images = torch.cat([episode.support_x[0], episode.query_x[0]])  # support of each class, then queries
    order = np.concatenate([np.arange(0, 10, 2), np.arange(1, 10, 2)])
    for image, index, turns in zip(images, spec.indices[order], spec.turns[order]):
        expected = 1 - np.rot90(store.pixels[index][..., 0], turns).astype(np.float32) / 255
        assert torch.allclose(image[0], torch.from_numpy(expected.copy()), atol=1e-6)


def test_the_network_is_finn_et_al_omniglot_network():
    cfg = load_config(CELL, ["device=cpu"])
    torch.manual_seed(0)
    model, rates = build_learner(cfg)
    assert rates is None and model.feature_dim == 64
    convs = [m for m in model.modules() if isinstance(m, TaskConv2d)]
    norms = [m for m in model.modules() if isinstance(m, TaskBatchNorm2d)]
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert [(c.in_channels, c.stride, c.padding) for c in convs] == [(1, (2, 2), (1, 1))] + [(64, (2, 2), (1, 1))] * 3
    assert all(n.weight is None and n.eps == 1e-3 and not n.track_running_stats for n in norms)
    x = torch.zeros(1, 10, 1, 28, 28)
    sizes = []
    hook = lambda module, inputs, output: sizes.append(output.shape[-1])  # noqa: E731
    for conv in convs:
        conv.register_forward_hook(hook)
    assert model(x).shape == (1, 10, 5) and sizes == [14, 7, 4, 2]
    for conv in convs:  # glorot-uniform, zero bias
        bound = np.sqrt(6 / ((conv.in_channels + conv.out_channels) * 9))
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
        assert not conv.bias.any()
    assert 0.85 < model.classifier.weight.std() < 1.15 and not model.classifier.bias.any()  # N(0, 1), zero bias
    names = [name for name, _ in model.named_parameters()]
    mask = adapted_mask(model, InnerLoop.training(cfg))
    assert [name for name, adapts in zip(names, mask) if not adapts] == [f"features.{i}.bias" for i in (1, 4, 7, 10)]
    assert InnerLoop.training(cfg).loss_scale == 5.0 and InnerLoop.testing(cfg).steps == 3


def reference_meta_gradient(params: list[torch.Tensor], episodes, ways: int, lr: float, steps: int,
                            eps: float) -> list[torch.Tensor]:
    """Finn et al.'s MAML for the Omniglot network, written out with torch.nn.functional: per task, `steps` SGD
    steps on (ways x the mean support cross-entropy) over the convolutions and the head only (BatchNorm's offsets
    are meta-learned, never adapted), then the mean query loss; the meta-gradient of the mean over tasks."""
    def forward(weights, x):
        for layer in range(4):
            x = F.conv2d(x, weights[3 * layer], weights[3 * layer + 1], stride=2, padding=1)
            x = F.relu(F.batch_norm(x, None, None, torch.ones_like(weights[3 * layer + 2]), weights[3 * layer + 2],
                                    True, 0.0, eps))
        return F.linear(x.mean((2, 3)), weights[12], weights[13])
    adapted = [i for i in range(14) if i not in (2, 5, 8, 11)]
    total = 0.0
    for t in range(len(episodes.query_y)):
        weights = list(params)
        for _ in range(steps):
            loss = F.cross_entropy(forward(weights, episodes.support_x[t]), episodes.support_y[t]) * ways
            grads = torch.autograd.grad(loss, [weights[i] for i in adapted], create_graph=True)
            for i, g in zip(adapted, grads):
                weights[i] = weights[i] - lr * g
        total = total + F.cross_entropy(forward(weights, episodes.query_x[t]), episodes.query_y[t])
    return list(torch.autograd.grad(total / len(episodes.query_y), params))


@pytest.mark.parametrize("cell", ["omniglot-conv4-1shot", "omniglot-conv4-20way-1shot"])
def test_meta_gradient_matches_a_plain_reference_in_float64(cell):
    cfg = load_config(REPO / "experiments" / f"{cell}.yaml", ["device=cpu", "maml.inner_steps=2"])
    ways = cfg.train.ways
    torch.manual_seed(1)
    model, _ = build_learner(cfg)
    model = model.double()
    labels = torch.arange(ways).repeat(3, 1)
    from fsl.data.episodes import Episode
    episodes = Episode(torch.rand(3, ways, 1, 28, 28, dtype=torch.float64), labels,
                       torch.rand(3, ways, 1, 28, 28, dtype=torch.float64), labels)
    expected = reference_meta_gradient(list(model.parameters()), episodes, ways, cfg.maml.inner_lr, 2,
                                       cfg.model.bn_eps)
    for parallel in (1, 3):
        meta_train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), episodes, InnerLoop.training(cfg),
                        parallel_tasks=parallel)
        for (name, p), g in zip(model.named_parameters(), expected):
            assert torch.allclose(p.grad, g, rtol=1e-10, atol=1e-12), (parallel, name)


def test_reference_numbers_are_the_papers():
    assert reference("omniglot", "conv4", 5, 1) == (98.7, 0.4) and reference("omniglot", "conv4", 20, 5) == (98.9, 0.2)
    assert reference("omniglot", "conv4", 20, 1, "fomaml") == (89.4, 0.5) and len(OMNIGLOT) == 8
    assert reference("omniglot", "resnet12", 5, 1) is None and reference("mini-imagenet", "conv4", 5, 1, "fomaml") is None


def test_tiny_omniglot_cell_trains_and_tests_through_make(root, tmp_path):
    """`make omniglot-conv4-1shot` with a budget of 64 tasks: it stops there (train.stop_at), tests the final
    weights on the test tasks, and its row says it is short of the protocol's 1,920,000 tasks."""
    args = [f"data.root={root}", f"data.cache_dir={STORE_CACHE}", "device=cpu", "data.workers=0",
            "train.stop_at=64", "train.val_every=32", "train.val_episodes=10", "train.log_every=32",
            "test.episodes=20", "train.parallel_tasks=8", "test.parallel_episodes=4", f"work_dir={tmp_path / 'work'}",
            f"results_dir={tmp_path / 'results'}"]
    done = subprocess.run(["make", "omniglot-conv4-1shot", f"ARGS={' '.join(args)}"], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stopped at train.stop_at=64" in done.stdout
    assert "omniglot-conv4-1shot: 64/64 task (100%)" in done.stderr  # the bar ends where the run stops
    row = pd.read_csv(tmp_path / "results" / "summary.csv").iloc[0]
    assert (row.run, row.ways, row.shots, row.episodes, row.train_tasks, row.planned_tasks) == \
        ("omniglot-conv4-1shot", 5, 1, 20, 64, 1_920_000)
    assert row.checkpoint.endswith("omniglot-conv4-1shot/latest.pth") and not row.comparable
    assert row.not_comparable_why.endswith("training stopped at 64 of 1920000 tasks")
    assert (row.reference_mean, row.reference_ci95) == (98.7, 0.4)
    log = pd.read_csv(tmp_path / "work" / "omniglot-conv4-1shot" / "log.csv")
    assert list(log[log.split == "val"].tasks) == [32, 64]
    episodes = pd.read_csv(row_file(tmp_path / "results", pd.read_csv(tmp_path / "results" / "summary.csv",
                                                                      keep_default_na=False).iloc[0], "test_episodes"))
    assert len(episodes) == 20 and set(episodes.accuracy.round(3)) <= {0.0, 20.0, 40.0, 60.0, 80.0, 100.0}  # 5 queries
    subprocess.run([sys.executable, "-m", "fsl", "tables", "--results", str(tmp_path / "results")], cwd=REPO,
                   check=True, capture_output=True)
    # validation every 32 tasks on 10 episodes is not the config file's training: another run of the cell,
    # listed apart, never in the cell's table (#31)
    others = (tmp_path / "results" / "tables" / "other_tests.md").read_text()
    assert "| omniglot-conv4-1shot | train.val_every=32 train.val_episodes=10 | its own | " in others
    assert not (tmp_path / "results" / "tables" / "omniglot.md").exists()
    own = read_summary(tmp_path / "results").assign(train_tag="", test_tag="")  # as the config file's own run
    table = report.tables(own)["omniglot.md"]
    assert "| 5-way 1-shot | maml | " in table and "| 98.70 ± 0.40 | Finn et al. 2017, Table 1 |" in table
    assert "| 64 of 1,920,000 (0.0033%) | no |" in table
    report.plot_omniglot(own, tmp_path / "omniglot_vs_paper.png")
    assert (tmp_path / "omniglot_vs_paper.png").stat().st_size > 10_000


def test_adapt_reads_omniglot_images_as_its_test_episodes_do(root, tmp_path):
    """`fsl adapt` on an Omniglot checkpoint: greyscale, LANCZOS-resized, ink 1, one channel (not the protocol's
    RGB crop), then 5-way classification of the queries."""
    from dataclasses import asdict

    from fsl.data.omniglot import Omniglot
    from fsl.jobs import adapt
    from fsl.maml import meta_optimizer
    from fsl.train.checkpoint import TrainState, save_checkpoint

    test = load_split("omniglot", root, "test")
    for label in range(5):
        items = [i for i, c in enumerate(test.labels) if c == label][:2]
        for folder, index in zip(("support", "query"), items):
            path = tmp_path / folder / f"class{label}" / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(test.read(index))
    image = tmp_path / "support" / "class0" / next((tmp_path / "support" / "class0").iterdir()).name
    x = adapt.read_images([image], 28, Omniglot)
    expected = np.asarray(Image.open(image).convert("L").resize((28, 28), Image.LANCZOS), np.float32)
    assert x.shape == (1, 1, 28, 28) and torch.allclose(x[0, 0], torch.from_numpy(1 - expected / 255), atol=1e-6)
    cfg = load_config(CELL, ["device=cpu"])
    model, _ = build_learner(cfg)
    checkpoint = tmp_path / "latest.pth"
    save_checkpoint(checkpoint, model, None, meta_optimizer(list(model.parameters()), 1e-3), cfg,
                    asdict(TrainState()))
    result = adapt.run(checkpoint, tmp_path / "support", [str(tmp_path / "query")], device="cpu")
    assert len(result["predictions"]) == 5 and result["accuracy"] is not None
