"""Meta-training speed and memory: fsl's step beside learn2learn's MAML and a plain autograd loop, in one run.

For each arch: 5-way episodes of 105 images (5 shots + 16 queries, 84x84), 2 inner steps, meta-batch 8, second
order (and first order). Before timing, the three implementations must produce the same meta-gradient on the same
batch; the script refuses to report speed otherwise. Timings alternate between implementations, round by round.
Also: seconds per 100 meta-test episodes (5 steps) and data-pipeline episodes/s with 0, 2 and 4 workers.

    python benchmarks/meta_train_speed.py [--quick] [--device cuda] [--data-root ../shared/data/mini-imagenet-lite]

Writes benchmarks/results/<device>.csv and .md.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import learn2learn as l2l  # noqa: E402

from fsl.episodes import Episode  # noqa: E402
from fsl.maml import evaluate_episode, meta_train_step  # noqa: E402
from fsl.models import build_model  # noqa: E402

WAYS, SHOTS, QUERIES, SIZE, STEPS, LR = 5, 5, 16, 84, 2, 0.01


def random_batch(tasks: int, device: torch.device) -> list[Episode]:
    g = torch.Generator().manual_seed(0)
    labels = lambda n: torch.arange(WAYS).repeat_interleave(n)  # noqa: E731
    return [Episode(torch.randn(WAYS * SHOTS, 3, SIZE, SIZE, generator=g), labels(SHOTS),
                    torch.randn(WAYS * QUERIES, 3, SIZE, SIZE, generator=g), labels(QUERIES)).to(device)
            for _ in range(tasks)]


def fsl_step(model, optimizer, batch, first_order):
    meta_train_step(model, optimizer, batch, STEPS, LR, first_order)


def l2l_step(model, optimizer, batch, first_order):
    maml = l2l.algorithms.MAML(model, lr=LR, first_order=first_order)
    optimizer.zero_grad(set_to_none=True)
    for episode in batch:
        learner = maml.clone()
        for _ in range(STEPS):
            learner.adapt(F.cross_entropy(learner(episode.support_x), episode.support_y))
        (F.cross_entropy(learner(episode.query_x), episode.query_y) / len(batch)).backward()
    optimizer.step()


def autograd_step(model, optimizer, batch, first_order):
    optimizer.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    for episode in batch:
        fast = params
        for _ in range(STEPS):
            loss = F.cross_entropy(functional_call(model, fast, (episode.support_x,)), episode.support_y)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: p - LR * g for (n, p), g in zip(fast.items(), grads)}
        if first_order:
            fast = {n: p.detach().requires_grad_() for n, p in fast.items()}
        loss = F.cross_entropy(functional_call(model, fast, (episode.query_x,)), episode.query_y) / len(batch)
        # second order: differentiate through the inner loop to the meta-parameters; first order: at the fast weights
        grads = torch.autograd.grad(loss, list((fast if first_order else params).values()))
        for p, g in zip(params.values(), grads):
            p.grad = g if p.grad is None else p.grad + g
    optimizer.step()


IMPLEMENTATIONS = {"fsl (higher)": fsl_step, "learn2learn MAML": l2l_step, "plain autograd": autograd_step}


class ZeroLR(torch.optim.SGD):
    """An optimizer whose step does nothing: keeps the weights fixed while gradients are compared."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)


def meta_gradients(step, model, batch, first_order) -> torch.Tensor:
    model = copy.deepcopy(model)
    step(model, ZeroLR(model.parameters()), batch, first_order)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def peak_rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(arch: str, device: torch.device, meta_batch: int, rounds: int, first_order: bool) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(arch, WAYS, SIZE).to(device)
    batch = random_batch(meta_batch, device)
    reference = meta_gradients(fsl_step, model, batch, first_order)
    rows = []
    for name, step in IMPLEMENTATIONS.items():
        other = meta_gradients(step, model, batch, first_order)
        difference = ((other - reference).abs().max() / reference.abs().max()).item()
        print(f"  {arch} {'first' if first_order else 'second'} order: {name} vs fsl max relative meta-gradient "
              f"difference {difference:.2e}")
        if difference > 1e-4:
            raise SystemExit(f"{name} computes a different meta-gradient ({difference:.2e}); refusing to time it")
        rows.append({"arch": arch, "order": "first" if first_order else "second", "implementation": name,
                     "grad_rel_diff": difference, "seconds": [], "peak_mb": 0.0})
    models = {name: copy.deepcopy(model) for name in IMPLEMENTATIONS}
    optimizers = {name: torch.optim.Adam(m.parameters(), 1e-3) for name, m in models.items()}
    for round_index in range(rounds + 1):  # round 0 warms up
        for row, (name, step) in zip(rows, IMPLEMENTATIONS.items()):
            peak_rss_reset()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            step(models[name], optimizers[name], batch, first_order)
            sync(device)
            if round_index:
                row["seconds"].append(time.perf_counter() - start)
                row["peak_mb"] = max(row["peak_mb"], peak_memory_mb(device))
    baseline = statistics.median(rows[1]["seconds"])
    for row in rows:
        seconds = row.pop("seconds")
        median = statistics.median(seconds)
        row.update({"meta_batch": meta_batch, "median_s": median, "min_s": min(seconds), "max_s": max(seconds),
                    "tasks_per_s": meta_batch / median, "speedup_vs_l2l": baseline / median})
    return rows


def time_meta_test(arch: str, device: torch.device, episodes: int) -> float:
    torch.manual_seed(0)
    model = build_model(arch, WAYS, SIZE).to(device)
    g = torch.Generator().manual_seed(1)
    episode = Episode(torch.randn(WAYS, 3, SIZE, SIZE, generator=g), torch.arange(WAYS),
                      torch.randn(WAYS * 15, 3, SIZE, SIZE, generator=g),
                      torch.arange(WAYS).repeat_interleave(15)).to(device)
    evaluate_episode(model, episode, 5, LR)
    sync(device)
    start = time.perf_counter()
    for _ in range(episodes):
        evaluate_episode(model, episode, 5, LR)
    sync(device)
    return (time.perf_counter() - start) / episodes * 100


def time_data(root: Path, workers: int, episodes: int) -> float:
    from fsl.data import load_split
    from fsl.data.transforms import train_transform
    from fsl.episodes import EpisodeDataset, episode_loader

    dataset = load_split("mini-imagenet", root, "train", train_transform(SIZE))
    loader = episode_loader(EpisodeDataset(dataset, WAYS, SHOTS, QUERIES, seed=0, count=episodes), 1, workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return episodes / (time.perf_counter() - start)


def machine(device: torch.device) -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return f"CPU {cpu} x{os.cpu_count()} (torch threads {torch.get_num_threads()}); GPU {gpu}; torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="conv4 only, meta-batch 2, 2 rounds: minutes on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared/data/mini-imagenet-lite"))
    args = parser.parse_args()
    device = torch.device(args.device)
    archs = ["conv4"] if args.quick else ["conv4", "resnet12"]
    meta_batch, rounds = (2, 2) if args.quick else (8, 5)
    print(machine(device))
    rows = []
    for arch in archs:
        for first_order in (False, True):
            rows += time_training(arch, device, meta_batch, rounds, first_order)
    test_rows = [{"arch": arch, "s_per_100_test_episodes": time_meta_test(arch, device, 5 if args.quick else 20)}
                 for arch in archs]
    data_rows = []
    if Path(args.data_root).exists():
        data_rows = [{"workers": w, "episodes_per_s": time_data(Path(args.data_root), w, 8 if args.quick else 40)}
                     for w in (0, 2, 4)]
    else:
        print(f"data pipeline not timed: {args.data_root} not found (pass --data-root)")
    write_results(device, rows, test_rows, data_rows, args.quick)


def write_results(device, rows, test_rows, data_rows, quick) -> None:
    import pandas as pd

    out = Path(__file__).resolve().parent / "results"
    name = (torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-x{os.cpu_count()}")
    name = name.replace(" ", "-").lower() + ("-quick" if quick else "")
    frame = pd.DataFrame(rows)
    out.mkdir(exist_ok=True)
    frame.to_csv(out / f"{name}.csv", index=False)
    lines = [f"# Meta-training speed: {name}", "", machine(device), "",
             f"5-way, 105-image episodes at {SIZE}x{SIZE}, {STEPS} inner steps; median of timed rounds.", "",
             "| arch | order | implementation | meta-batch | s / meta-iteration (min-max) | tasks/s | vs learn2learn "
             "| peak memory MB | meta-grad rel. diff |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['order']} | {r['implementation']} | {r['meta_batch']} | {r['median_s']:.3f} "
                     f"({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['tasks_per_s']:.2f} | {r['speedup_vs_l2l']:.2f}x | "
                     f"{r['peak_mb']:.0f} | {r['grad_rel_diff']:.1e} |")
    lines += ["", "| arch | s per 100 meta-test episodes (5 steps, 75 queries) |", "|---|---|"]
    lines += [f"| {r['arch']} | {r['s_per_100_test_episodes']:.1f} |" for r in test_rows]
    if data_rows:
        lines += ["", "| data workers | 105-image training episodes/s (mini-ImageNet-lite, 84x84) |", "|---|---|"]
        lines += [f"| {r['workers']} | {r['episodes_per_s']:.2f} |" for r in data_rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {out / (name + '.csv')}, {out / (name + '.md')}")


if __name__ == "__main__":
    main()
