from pathlib import Path

import pytest

from fsl.config import ConfigError, all_keys, from_dict, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]
CELLS = sorted(p for p in (REPO / "experiments").glob("*.yaml") if not p.name.startswith("_"))


def test_twelve_paper_cells_plus_demo():
    names = {p.stem for p in CELLS}
    paper = {f"{d}-{a}-{k}shot" for d in ("cub", "mini-imagenet", "tiered-imagenet") for a in ("conv4", "resnet12")
             for k in (1, 5)}
    assert paper <= names
    assert names - paper == {"glyphs-conv4-1shot", "glyphs-conv4-5shot"}


@pytest.mark.parametrize("path", CELLS, ids=lambda p: p.stem)
def test_cell_id_matches_file_name_and_protocol(path):
    cfg = load_config(path)
    assert cfg.cell == path.stem
    if cfg.data.dataset != "glyphs":  # the protocol's values, from PROTOCOL.md
        assert (cfg.train.ways, cfg.train.shots, cfg.train.queries, cfg.train.meta_batch) == (5, 5, 16, 8)
        assert (cfg.maml.inner_lr, cfg.maml.inner_steps, cfg.maml.test_inner_steps) == (0.01, 2, 5)
        assert not cfg.maml.first_order
        assert (cfg.train.tasks, cfg.train.meta_lr, cfg.train.val_every, cfg.train.val_episodes) == \
            (100_000, 1e-3, 2000, 100)
        assert (cfg.test.queries, cfg.test.episodes, cfg.data.image_size, cfg.seed) == (15, 2000, 84, 0)


def test_overrides_named_in_the_issue_exist_and_apply():
    for key in ("data.root", "train.tasks", "train.val_every", "train.val_episodes", "test.episodes", "device",
                "work_dir", "seed"):
        assert key in all_keys()
    cfg = load_config(REPO / "experiments/cub-conv4-1shot.yaml",
                      ["train.tasks=16", "train.meta_lr=3e-4", "device=cpu", "data.root=/x", "maml.first_order=true"])
    assert (cfg.train.tasks, cfg.train.meta_lr, cfg.device, cfg.data.root, cfg.maml.first_order) == \
        (16, 3e-4, "cpu", "/x", True)


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'train.tasks'"):
        load_config(REPO / "experiments/cub-conv4-1shot.yaml", ["train.taks=5"])


def test_unknown_key_in_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("maml:\n  inner_lr: 0.01\n  inner_step: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'maml.inner_steps'"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("override,message", [
    ("train.tasks=many", "expects int"), ("maml.first_order=3", "expects bool"),
    ("data.dataset=imagenet", "not one of"), ("train.tasks=0", ">= 1"), ("train.tasks", "key=value")])
def test_bad_values_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "experiments/cub-conv4-1shot.yaml", [override])


def test_quick_caps_the_schedule_and_separates_outputs():
    cfg = load_config(REPO / "experiments/mini-imagenet-conv4-1shot.yaml", ["quick=true"])
    assert (cfg.train.tasks, cfg.test.episodes) == (400, 100)
    assert cfg.run_dir.name == "mini-imagenet-conv4-1shot-quick"


def test_precision_choices_and_the_older_tf32_key():
    path = REPO / "experiments/mini-imagenet-conv4-1shot.yaml"
    assert load_config(path).precision == "fp32"
    with pytest.raises(ConfigError, match="choose one of fp32, tf32, bf16"):
        load_config(path, ["precision=fp16"])
    old = to_dict(load_config(path))
    del old["precision"]
    assert from_dict({**old, "tf32": True}).precision == "tf32"  # checkpoints written before `precision`


def test_meta_lr_schedules():
    from fsl.train import meta_lr_at

    path = REPO / "experiments/mini-imagenet-conv4-1shot.yaml"
    constant = load_config(path, ["train.tasks=100", "train.meta_lr=0.004"])
    assert [meta_lr_at(constant, t) for t in (0, 50, 99)] == [0.004] * 3
    cosine = load_config(path, ["train.tasks=100", "train.meta_lr=0.004", "train.meta_lr_schedule=cosine"])
    assert [meta_lr_at(cosine, t) for t in (0, 25, 50, 100)] == pytest.approx([0.004, 0.004 * 0.8535534, 0.002, 0])
    with pytest.raises(ConfigError, match="choose constant or cosine"):
        meta_lr_at(load_config(path, ["train.meta_lr_schedule=step"]), 0)
