"""fsl beside MMFewShot 0.1.0's own MAML: the same weights and episodes, float64, step by step (issue #35).

Runs in the side environment that `make fidelity` installs (scripts/install_mmfewshot.sh: MMFewShot 0.1.0, mmcls
0.18.0, mmcv 1.4.0 without ops, on fsl's torch):

    .venv-mmfewshot/bin/python benchmarks/fidelity_mmfewshot.py [--out benchmarks/results/fidelity-mmfewshot.md]

For conv4 (84x84, 2 tasks) and resnet12 (16x16, 1 task; its head pools to 640 features at any size):
  1. MMFewShot's classifier is built from its v0.1.0 config (`MMFEWSHOT_MODELS`, transcribed from
     configs/classification/maml/mini_imagenet/maml_{conv4,resnet12}_1xb105_mini-imagenet_5way-1shot.py, with the
     meta-test's support steps and the optimizer of the same files) by its own `build_classifier`; fsl's model from
     its cell config (experiments/mini-imagenet-{arch}-1shot.yaml), whose inner and outer settings are first checked
     equal to MMFewShot's.
  2. fsl's model takes MMFewShot's initial weights (convert_maml_module's PyTorch defaults), with the BatchNorm
     affine parameters and the biases perturbed so that none is at its trivial value.
  3. Training: MMFewShot's `MAML.train_step` on each task (its own label shuffle, seeded; the loss / T backward,
     as its GradientCumulativeOptimizerHook does), then torch's Adam (mmcv builds torch.optim.Adam); fsl's
     `task_meta_gradient` for the query losses and `meta_train_step` with its fused Adam for the meta-gradient and
     the update, on the same T tasks.
  4. Test: MMFewShot's meta-test sequence (mmfewshot/classification/apis/test.py: before_meta_test,
     before_forward_support, forward(mode='support'), before_forward_query, forward(mode='query')) against fsl's
     `adapt` then the adapted model's query softmax, 5-way 1-shot and 5-shot, 5 steps.
Prints and writes a table of maximum relative differences (per tensor: max |a - b| / max |b|, worst tensor) and
exits 1 past `TOLERANCES`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import platform
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fsl.config import load_config  # noqa: E402
from fsl.data.episodes import Episode  # noqa: E402
from fsl.maml import InnerLoop, adapt, build_learner, meta_optimizer, meta_train_step, task_meta_gradient  # noqa: E402

# MMFewShot v0.1.0's MAML configs (configs/classification/maml/mini_imagenet/maml_*_1xb105_mini-imagenet_5way-*.py)
MMFEWSHOT_MODELS = {
    "conv4": dict(type="MAML", num_inner_steps=2, inner_lr=0.01, first_order=False, backbone=dict(type="Conv4"),
                  head=dict(type="LinearHead", num_classes=5, in_channels=1600)),
    "resnet12": dict(type="MAML", num_inner_steps=2, inner_lr=0.01, first_order=False,
                     backbone=dict(type="ResNet12"), head=dict(type="LinearHead", num_classes=5, in_channels=640)),
}
MMFEWSHOT_TEST_STEPS = 5        # val/test meta_test_cfg: support=dict(batch_size=5, num_inner_steps=5)
MMFEWSHOT_OPTIMIZER = dict(type="Adam", lr=0.001)
MMFEWSHOT_CUMULATIVE_ITERS = 8  # optimizer_config: GradientCumulativeOptimizerHook(cumulative_iters=8): 8 tasks a step
CASES = {"conv4": dict(size=84, tasks=2), "resnet12": dict(size=16, tasks=1)}
TOLERANCES = {"query loss": 1e-12, "meta-gradient": 1e-10, "Adam update": 1e-6, "test softmax": 1e-10}
# checks named "<check>, <detail>" take <check>'s tolerance
QUERIES = 16  # the training episodes' queries per class (num_queries=16)


def import_mmfewshot():
    """MMFewShot's classification code, with two import shims and no file patched: a bare `mmfewshot` package (its
    __init__ imports mmdet and mmcv's compiled ops and asserts versions; mmfewshot.classification needs neither),
    and matplotlib.blocking_input.BlockingInput (mmcls's image viewer imports it; matplotlib 3.6 removed it)."""
    spec = importlib.util.find_spec("mmfewshot")
    if spec is None:
        sys.exit("error: mmfewshot is not importable; fix: run this with the side environment's Python "
                 "(`make fidelity` installs .venv-mmfewshot)")
    package = types.ModuleType("mmfewshot")
    package.__path__ = [str(Path(spec.origin).parent)]
    sys.modules["mmfewshot"] = package
    try:
        import matplotlib.blocking_input  # noqa: F401
    except ImportError:
        stub = types.ModuleType("matplotlib.blocking_input")
        stub.BlockingInput = type("BlockingInput", (), {})
        sys.modules["matplotlib.blocking_input"] = stub
    from mmfewshot.classification.models import build_classifier
    return build_classifier


def check_settings(cfg, arch: str) -> None:
    """fsl's cell config sets what MMFewShot's config sets."""
    model = MMFEWSHOT_MODELS[arch]
    ours = {"inner steps": cfg.maml.inner_steps, "inner lr": cfg.maml.inner_lr, "first order": cfg.maml.first_order,
            "test steps": cfg.maml.test_inner_steps, "meta lr": cfg.train.meta_lr, "meta-batch": cfg.train.meta_batch,
            "ways": cfg.train.ways, "queries": cfg.train.queries}
    theirs = {"inner steps": model["num_inner_steps"], "inner lr": model["inner_lr"],
              "first order": model["first_order"], "test steps": MMFEWSHOT_TEST_STEPS,
              "meta lr": MMFEWSHOT_OPTIMIZER["lr"], "meta-batch": MMFEWSHOT_CUMULATIVE_ITERS,
              "ways": model["head"]["num_classes"], "queries": QUERIES}
    if ours != theirs:
        sys.exit(f"error: fsl's {arch} cell differs from MMFewShot's config: fsl {ours}, MMFewShot {theirs}")


def perturbed(mm: torch.nn.Module, seed: int) -> None:
    """BatchNorm scales near 1 and every bias off 0, so that no parameter sits at its initial trivial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mm.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def load_into_fsl(mm: torch.nn.Module, fsl_model: torch.nn.Module) -> list[str]:
    """Copy MMFewShot's parameters into fsl's model, in module order (shapes checked); returns fsl's names."""
    theirs, ours = list(mm.named_parameters()), list(fsl_model.named_parameters())
    shapes = [(a, tuple(p.shape), b, tuple(q.shape)) for (a, p), (b, q) in zip(theirs, ours) if p.shape != q.shape]
    if len(theirs) != len(ours) or shapes:
        sys.exit(f"error: parameter lists differ: MMFewShot {len(theirs)}, fsl {len(ours)}; first mismatches {shapes[:3]}")
    with torch.no_grad():
        for (_, p), (_, q) in zip(theirs, ours):
            q.copy_(p)
    return [name for name, _ in ours]


@contextlib.contextmanager
def mmfewshot_dtype():
    """float64 as the default dtype while MMFewShot's code runs: its BatchNorm makes its running buffers with
    torch.zeros in the default dtype at every forward (fsl's code runs in float32's default, as it always does)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def episode(ways: int, shots: int, queries: int, size: int, seed: int, class_ids: list[int]):
    """Images N(0, 1) (float64) and dataset class ids, class-major: support (ways*shots), query (ways*queries)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(class_ids)
    images = lambda n: torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)  # noqa: E731
    return images(ways * shots), ids.repeat_interleave(shots), images(ways * queries), ids.repeat_interleave(queries)


def shuffled_class_ids(labels: torch.Tensor, seed: int) -> list[int]:
    """The class order MMFewShot's forward_train draws (np.random.shuffle of the sorted class ids) under `seed`."""
    ids = torch.unique(labels).tolist()
    np.random.seed(seed)
    np.random.shuffle(ids)
    return ids


def compare(arch: str, build_classifier) -> dict[str, float]:
    size, tasks = CASES[arch]["size"], CASES[arch]["tasks"]
    cfg = load_config(REPO / "experiments" / f"mini-imagenet-{arch}-1shot.yaml",
                      ["device=cpu", f"data.image_size={size}"])
    check_settings(cfg, arch)
    torch.manual_seed(0)
    with mmfewshot_dtype():
        mm = build_classifier(copy.deepcopy(MMFEWSHOT_MODELS[arch]))
    perturbed(mm, seed=1)
    ours, _ = build_learner(cfg)
    ours = ours.double()
    names = load_into_fsl(mm, ours)
    start = {name: p.detach().clone() for name, p in ours.named_parameters()}

    # ---- training: T tasks, 5-way 1-shot with 16 queries, one outer step
    ways, shots = cfg.train.ways, cfg.train.shots
    data, fsl_tasks = [], []
    for t in range(tasks):
        support_x, support_ids, query_x, query_ids = episode(ways, shots, QUERIES, size, 10 + t,
                                                            list(range(7 * t + 3, 7 * t + 3 + ways)))
        order = shuffled_class_ids(support_ids, seed=100 + t)
        relabel = lambda ids: torch.tensor([order.index(i) for i in ids.tolist()])  # noqa: E731
        data.append((100 + t, dict(support_data=dict(img=support_x, gt_label=support_ids),
                                   query_data=dict(img=query_x, gt_label=query_ids))))
        fsl_tasks.append(Episode(support_x, relabel(support_ids), query_x, relabel(query_ids)))
    batch = Episode(*(torch.stack(field) for field in zip(*fsl_tasks)))

    mm.train()
    optimizer = torch.optim.Adam(mm.parameters(), lr=MMFEWSHOT_OPTIMIZER["lr"])
    optimizer.zero_grad()
    mm_losses = []
    with mmfewshot_dtype():
        for seed, task in data:
            np.random.seed(seed)  # forward_train's np.random.shuffle of the class ids
            loss = mm.train_step(task, optimizer)["loss"]
            (loss / tasks).backward()  # GradientCumulativeOptimizerHook: loss / cumulative_iters, step after all
            mm_losses.append(loss.detach())
        mm_grads = [p.grad.detach().clone() for p in mm.parameters()]
        optimizer.step()
    mm_update = [p.detach() - start[name] for p, name in zip(mm.parameters(), names)]

    loop = InnerLoop.training(cfg)
    probe = copy.deepcopy(ours)
    fsl_losses, _ = task_meta_gradient(probe, batch, loop, scale=1 / tasks)
    fsl_adam = meta_optimizer(list(ours.parameters()), cfg.train.meta_lr)
    meta_train_step(ours, fsl_adam, batch, loop)
    fsl_grads = [p.grad.detach() for p in ours.parameters()]
    fsl_update = [p.detach() - start[name] for name, p in ours.named_parameters()]

    # a bias right before a training-mode BatchNorm has an exact meta-gradient of 0 (the normalisation removes it):
    # both codes get rounding noise there, which Adam's g / sqrt(v) turns into +-lr steps of either sign. Those
    # tensors are measured against the largest gradient of the model, and left out of the Adam comparison.
    largest = max(float(g.abs().max()) for g in mm_grads)
    zero = [i for i, g in enumerate(mm_grads) if float(g.abs().max()) < 1e-12 * largest]
    kept = [i for i in range(len(mm_grads)) if i not in zero]
    result = {"query loss": relative(fsl_losses, torch.stack(mm_losses)),
              "meta-gradient": max(relative(fsl_grads[i], mm_grads[i]) for i in kept),
              "meta-gradient, exactly-zero tensors / largest": max(
                  (float((fsl_grads[i] - mm_grads[i]).abs().max()) / largest for i in zero), default=0.0),
              "Adam update": max(relative(fsl_update[i], mm_update[i]) for i in kept)}
    print(f"{arch}: {len(zero)} tensor(s) with an exact meta-gradient of 0: {[names[i] for i in zero]}", flush=True)

    # ---- test-time adaptation from the (updated) meta-weights, 1-shot and 5-shot, 15 queries
    test_loop = InnerLoop.testing(cfg)
    for test_shots in (1, 5):
        support_x, support_y, query_x, _ = episode(ways, test_shots, 15, size, 50 + test_shots, list(range(ways)))
        with mmfewshot_dtype():
            mm.before_meta_test(dict(support=dict(num_inner_steps=MMFEWSHOT_TEST_STEPS)))
            mm.before_forward_support()
            mm(img=support_x, gt_label=support_y, mode="support")
            mm.before_forward_query()
            mm_probs = torch.from_numpy(np.stack(mm(img=query_x, mode="query")))
        fmodel = adapt(ours, support_x[None], support_y[None], test_loop)
        with torch.no_grad():
            fsl_probs = F.softmax(fmodel(query_x[None])[0], dim=1)
        result[f"test softmax, {test_shots}-shot"] = relative(fsl_probs, mm_probs)
    return result


def report(results: dict[str, dict[str, float]]) -> tuple[str, bool]:
    checks = list(next(iter(results.values())))
    tolerance = lambda check: TOLERANCES[check.split(",")[0]]  # noqa: E731
    passed = all(value <= tolerance(check) for r in results.values() for check, value in r.items())
    header = " | ".join(f"{arch}, {CASES[arch]['size']}x{CASES[arch]['size']}, {CASES[arch]['tasks']} task(s)"
                        for arch in results)
    lines = ["# fsl beside MMFewShot 0.1.0's MAML", "",
             f"`make fidelity` (`benchmarks/fidelity_mmfewshot.py`), float64 on a CPU ({platform.machine()}, "
             f"torch {torch.__version__}); MMFewShot 0.1.0, mmcls 0.18.0, mmcv 1.4.0 in `.venv-mmfewshot`. "
             "Maximum relative difference (per tensor: max |fsl - MMFewShot| / max |MMFewShot|, worst tensor) "
             "on the same weights and episodes; the Adam update is fsl's fused kernel against torch's plain one. "
             "conv4's convolution biases sit right before a training-mode BatchNorm, so their exact meta-gradient "
             "is 0: both codes get rounding noise there (measured against the model's largest gradient, and left "
             "out of the Adam comparison, since Adam turns noise into steps of +-lr in either code).", "",
             f"| check | {header} | tolerance |", "| --- |" + " --- |" * (len(results) + 1)]
    for check in checks:
        values = " | ".join(f"{results[arch][check]:.1e}" for arch in results)
        lines.append(f"| {check} | {values} | {tolerance(check):.0e} |")
    lines += ["", "all within tolerance" if passed else "FAILED: a difference is past its tolerance", ""]
    return "\n".join(lines), passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fidelity-mmfewshot.md")
    args = parser.parse_args()
    build_classifier = import_mmfewshot()
    results = {arch: compare(arch, build_classifier) for arch in CASES}
    text, passed = report(results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
