"""Meta-training speed and memory: fsl's inner loop (task by task, and task-batched) beside learn2learn's MAML and a
plain autograd loop, on the same batch, at every precision setting the device honours. `make bench`.

Protocol workload per arch: 5-way episodes of 105 images (5 shots + 16 queries, 84x84), 2 inner steps, meta-batch 8,
second order (and first order). Rows:
    fsl loop     fsl.maml.meta_train_step with train.parallel_tasks=1: higher's loop, one task at a time
    fsl batched  the same with parallel_tasks=meta-batch: all tasks in one grouped forward
    learn2learn  l2l.algorithms.MAML, one task at a time        plain autograd  torch.autograd.grad, one task at a time
Exactness is checked in float64 first (small 32x32 episodes, meta-batch 3): every implementation must give fsl loop's
meta-gradient to 1e-10 relative, or the script refuses to time it. At the timed size, `grad_rel_diff` is each row's
meta-gradient against fsl loop in fp32 on the same batch (GPU kernels are not deterministic, and TF32/bf16 round;
stated tolerances in GRAD_TOLERANCE). Timings alternate between implementations, round by round; `speedup_vs_l2l`
compares with learn2learn at the same precision. Also: meta-test seconds per 100 episodes (5 steps), one at a time
and batched, and the expected hours of every cell of the table (training + validation + test) on this device.

    python benchmarks/meta_train_speed.py [--quick] [--device cuda] [--archs conv4 resnet12] [--rounds 3]

Writes benchmarks/results/<device>[-quick].csv (one row per arch x order x implementation x precision) and .md.
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

from fsl.data.episodes import Episode  # noqa: E402
from fsl.device.distributed import describe_device, device_slug  # noqa: E402
from fsl.device.precision import apply_precision, autocast, honoured_precisions  # noqa: E402
from fsl.maml import InnerLoop, evaluate_tasks, meta_optimizer, meta_train_step  # noqa: E402
from fsl.models import build_model  # noqa: E402

WAYS, SHOTS, QUERIES, STEPS, LR = 5, 5, 16, 2, 0.01
IMAGE_SIZE = 84  # the protocol's (--image-size changes it, for a dry run only)
GRAD_TOLERANCE = {"fp32": 1e-2, "tf32": 0.5, "bf16": 0.5}  # relative L2 difference to fsl loop in fp32


def random_batch(tasks: int, size: int, device: torch.device, dtype=torch.float32, queries: int = QUERIES,
                 shots: int = SHOTS) -> Episode:
    """`tasks` 5-way episodes of Gaussian noise images, fields with a leading task dimension."""
    g = torch.Generator().manual_seed(0)
    labels = lambda n: torch.arange(WAYS).repeat_interleave(n).repeat(tasks, 1)  # noqa: E731
    return Episode(torch.randn(tasks, WAYS * shots, 3, size, size, generator=g, dtype=dtype), labels(shots),
                   torch.randn(tasks, WAYS * queries, 3, size, size, generator=g, dtype=dtype),
                   labels(queries)).to(device)


def tasks_of(batch: Episode) -> list[Episode]:
    return [Episode(*(t[i] for t in batch)) for i in range(len(batch.query_y))]


def fsl_loop(model, optimizer, batch, first_order):
    meta_train_step(model, optimizer, batch, InnerLoop(STEPS, LR, first_order), parallel_tasks=1)


def fsl_batched(model, optimizer, batch, first_order):
    meta_train_step(model, optimizer, batch, InnerLoop(STEPS, LR, first_order), parallel_tasks=len(batch.query_y))


def l2l_step(model, optimizer, batch, first_order):
    maml = l2l.algorithms.MAML(model, lr=LR, first_order=first_order)
    optimizer.zero_grad(set_to_none=True)
    episodes = tasks_of(batch)
    for episode in episodes:
        learner = maml.clone()
        for _ in range(STEPS):
            learner.adapt(F.cross_entropy(learner(episode.support_x), episode.support_y))
        (F.cross_entropy(learner(episode.query_x), episode.query_y) / len(episodes)).backward()
    optimizer.step()


def autograd_step(model, optimizer, batch, first_order):
    optimizer.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    episodes = tasks_of(batch)
    for episode in episodes:
        fast = params
        for _ in range(STEPS):
            loss = F.cross_entropy(functional_call(model, fast, (episode.support_x,)), episode.support_y)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: p - LR * g for (n, p), g in zip(fast.items(), grads)}
        if first_order:
            fast = {n: p.detach().requires_grad_() for n, p in fast.items()}
        loss = F.cross_entropy(functional_call(model, fast, (episode.query_x,)), episode.query_y) / len(episodes)
        # second order: differentiate through the inner loop to the meta-parameters; first order: at the fast weights
        grads = torch.autograd.grad(loss, list((fast if first_order else params).values()))
        for p, g in zip(params.values(), grads):
            p.grad = g if p.grad is None else p.grad + g
    optimizer.step()


IMPLEMENTATIONS = {"fsl loop": fsl_loop, "fsl batched": fsl_batched, "learn2learn": l2l_step,
                   "plain autograd": autograd_step}
BASELINE = "learn2learn"


def meta_gradient(step, model, batch, first_order, precision="fp32", device=None) -> torch.Tensor:
    """The meta-gradient `step` computes (a zero-lr optimizer keeps the weights where they are)."""
    model = copy.deepcopy(model)
    with autocast(precision, device or batch.query_x.device):
        step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, first_order)
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_float64(arch: str, device: torch.device) -> list[dict]:
    """Every implementation against fsl loop in float64 (32x32, meta-batch 3, 4 queries): exact agreement."""
    torch.manual_seed(0)
    model = build_model(arch, WAYS, 32).double().to(device)
    batch = random_batch(3, 32, device, torch.float64, queries=4)
    rows = []
    for first_order in (False, True):
        reference = meta_gradient(fsl_loop, model, batch, first_order)
        for name, step in IMPLEMENTATIONS.items():
            difference = relative_difference(meta_gradient(step, model, batch, first_order), reference)
            print(f"  float64 {arch} {'first' if first_order else 'second'} order: {name} vs fsl loop {difference:.1e}")
            if difference > 1e-10:
                raise SystemExit(f"{name} computes another meta-gradient than fsl loop in float64 ({difference:.1e}); "
                                 f"refusing to time it")
            rows.append({"arch": arch, "order": "first" if first_order else "second", "implementation": name,
                         "float64_rel_diff": difference})
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device, before: int = 0) -> float:
    """The step's own peak on a GPU: max_memory_allocated since the reset, less what was allocated before the step
    (every row's model, gradient and Adam state stay allocated between rows: about 2.2 GiB for ResNet-12, #47.5)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # the process's peak RSS (not reset per row on the CPU)
            return int(line.split()[1]) / 1024
    return float("nan")


def time_training(arch: str, device: torch.device, meta_batch: int, rounds: int, first_order: bool,
                  precisions: list[str]) -> list[dict]:
    """One row per implementation x precision: median seconds per meta-iteration, tasks/s, peak memory."""
    torch.manual_seed(0)
    model = build_model(arch, WAYS, IMAGE_SIZE).to(device)
    batch = random_batch(meta_batch, IMAGE_SIZE, device)
    order = "first" if first_order else "second"
    apply_precision("fp32", device)
    reference = meta_gradient(fsl_loop, model, batch, first_order, "fp32", device)
    rows = []
    for precision in precisions:
        apply_precision(precision, device)
        for name, step in IMPLEMENTATIONS.items():
            row = {"arch": arch, "order": order, "implementation": name, "precision": precision,
                   "meta_batch": meta_batch, "seconds": [], "peak_mb": 0.0, "note": ""}
            try:
                row["grad_rel_diff"] = relative_difference(
                    meta_gradient(step, model, batch, first_order, precision, device), reference)
            except torch.cuda.OutOfMemoryError:
                row.update(grad_rel_diff=float("nan"), note="out of memory")
                torch.cuda.empty_cache()
            if row["grad_rel_diff"] > GRAD_TOLERANCE[precision]:
                raise SystemExit(f"{arch} {order} {name} {precision}: meta-gradient differs from fsl loop fp32 by "
                                 f"{row['grad_rel_diff']:.2e} > {GRAD_TOLERANCE[precision]}; refusing to time it")
            rows.append(row)
    models = {(r["implementation"], r["precision"]): copy.deepcopy(model) for r in rows}
    # fsl trains with its fused Adam (fsl.maml.meta_optimizer, which also skips a non-finite step on the device);
    # the others with torch's default Adam, as their examples do
    optimizers = {key: meta_optimizer(list(m.parameters()), 1e-3) if key[0].startswith("fsl")
                  else torch.optim.Adam(m.parameters(), 1e-3) for key, m in models.items()}
    for round_index in range(rounds + 1):  # round 0 warms up (cuDNN algorithm choice, allocator)
        for row in rows:
            if row["note"]:
                continue
            key = (row["implementation"], row["precision"])
            apply_precision(row["precision"], device)
            sync(device)
            before = 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            with autocast(row["precision"], device):
                IMPLEMENTATIONS[row["implementation"]](models[key], optimizers[key], batch, first_order)
            sync(device)
            if round_index:
                row["seconds"].append(time.perf_counter() - start)
                row["peak_mb"] = max(row["peak_mb"], peak_memory_mb(device, before))
    apply_precision("fp32", device)
    for row in rows:
        seconds = row.pop("seconds") or [float("nan")]
        median = statistics.median(seconds)
        row.update({"median_s": median, "min_s": min(seconds), "max_s": max(seconds),
                    "tasks_per_s": meta_batch / median})
    for row in rows:
        baseline = next(r for r in rows if r["implementation"] == BASELINE and r["precision"] == row["precision"])
        row["speedup_vs_l2l"] = baseline["median_s"] / row["median_s"]
        print(f"  {arch} {order} {row['precision']} {row['implementation']}: {row['tasks_per_s']:.2f} tasks/s "
              f"({row['speedup_vs_l2l']:.2f}x learn2learn), peak {row['peak_mb']:.0f} MB, meta-gradient vs fsl loop "
              f"fp32 {row['grad_rel_diff']:.1e} {row['note']}")
    return rows


def time_meta_test(arch: str, device: torch.device, episodes: int, parallel: int) -> float:
    """Seconds per 100 meta-test episodes (5-way 1-shot, 15 queries, 5 steps), `parallel` episodes at a time."""
    torch.manual_seed(0)
    model = build_model(arch, WAYS, IMAGE_SIZE).to(device)
    batch = random_batch(parallel, IMAGE_SIZE, device, shots=1, queries=15)
    evaluate_tasks(model, batch, InnerLoop(5, LR, True))
    sync(device)
    start = time.perf_counter()
    for _ in range(max(1, episodes // parallel)):
        evaluate_tasks(model, batch, InnerLoop(5, LR, True))
    sync(device)
    return (time.perf_counter() - start) / (max(1, episodes // parallel) * parallel) * 100


def cell_hours(rows: list[dict], test_rows: list[dict]) -> list[dict]:
    """Expected hours of each of the 12 cells on this device with fsl's fastest fp32-exact and fastest overall
    setting: 100,000 training tasks + 50 validations of 100 episodes + 2,000 test episodes."""
    out = []
    for arch in sorted({r["arch"] for r in rows}):
        second = [r for r in rows if r["arch"] == arch and r["order"] == "second" and r["implementation"]
                  .startswith("fsl") and r["tasks_per_s"] == r["tasks_per_s"]]
        test = min(r["s_per_100_test_episodes"] for r in test_rows if r["arch"] == arch)
        for label, candidates in (("fp32", [r for r in second if r["precision"] == "fp32"]), ("fastest", second)):
            best = max(candidates, key=lambda r: r["tasks_per_s"])
            hours = (100_000 / best["tasks_per_s"] + (50 * 100 + 2000) * test / 100) / 3600
            out.append({"arch": arch, "setting": f"{best['implementation']} {best['precision']}",
                        "kind": label, "hours_per_cell": hours})
    return out


def machine(device: torch.device) -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = describe_device(device) if device.type == "cuda" else "none"
    return (f"CPU {cpu} x{os.cpu_count()} (torch threads {torch.get_num_threads()}); GPU {gpu}; "
            f"torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="conv4 only, meta-batch 2, 2 rounds: minutes on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", nargs="+", default=None, help="default: conv4 resnet12 (conv4 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per row (default 5, quick 2)")
    parser.add_argument("--meta-batch", type=int, default=None, help="default 8 (quick 2)")
    parser.add_argument("--precisions", nargs="+", default=None, help="default: every one the device honours")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--image-size", type=int, default=84, help="the protocol's 84; smaller only to check that "
                        "the script runs (GPU_SESSION_DRY=1 bash benchmarks/gpu_session.sh): its files are then "
                        "named -<size>px and are not a measurement of the protocol")
    args = parser.parse_args()
    global IMAGE_SIZE
    IMAGE_SIZE = args.image_size
    device = torch.device(args.device)
    archs = args.archs or (["conv4"] if args.quick else ["conv4", "resnet12"])
    meta_batch = args.meta_batch or (2 if args.quick else 8)
    rounds = args.rounds or (2 if args.quick else 5)
    precisions = args.precisions or honoured_precisions(device)
    print(machine(device))
    start = time.time()
    exact, rows, test_rows = [], [], []
    for arch in archs:  # the files are rewritten after each arch: a timeout keeps the archs done (#47.4)
        exact += check_float64(arch, device)
        rows += [row for first_order in (False, True)
                 for row in time_training(arch, device, meta_batch, rounds, first_order, precisions)]
        test_rows += [{"arch": arch, "parallel_episodes": parallel,
                       "s_per_100_test_episodes": time_meta_test(arch, device, 4 if args.quick else 40, parallel)}
                      for parallel in (1, 8)]
        write_results(device, rows, exact, test_rows, cell_hours(rows, test_rows), args.quick, Path(args.out),
                      time.time() - start)


def write_results(device, rows, exact, test_rows, hours, quick, out: Path, seconds: float) -> None:
    import pandas as pd

    name = device_slug(device) + ("-quick" if quick else "") + (f"-{IMAGE_SIZE}px" if IMAGE_SIZE != 84 else "")
    out.mkdir(parents=True, exist_ok=True)
    columns = ["arch", "order", "implementation", "tasks_per_s", "speedup_vs_l2l", "peak_mb", "grad_rel_diff",
               "precision", "meta_batch", "median_s", "min_s", "max_s", "note"]
    pd.DataFrame(rows)[columns].to_csv(out / f"{name}.csv.tmp", index=False)
    os.replace(out / f"{name}.csv.tmp", out / f"{name}.csv")
    lines = [f"# Meta-training speed: {name}", "", machine(device), "",
             f"5-way, 105-image episodes at 84x84, {STEPS} inner steps, Gaussian-noise images; median of timed rounds;"
             f" peak memory is the step's own on a GPU (max_memory_allocated less what was allocated before the step; "
             f"on a CPU: the process's peak RSS so far). "
             f"`python benchmarks/meta_train_speed.py{' --quick' if quick else ''}` ({seconds:.0f} s).", "",
             "| arch | order | precision | implementation | meta-batch | s / meta-iteration (min-max) | tasks/s | "
             "vs learn2learn | peak MB | meta-grad vs fsl loop fp32 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['order']} | {r['precision']} | {r['implementation']} | {r['meta_batch']} | "
                     f"{r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['tasks_per_s']:.2f} | "
                     f"{r['speedup_vs_l2l']:.2f}x | {r['peak_mb']:.0f} | {r['grad_rel_diff']:.1e} {r['note']} |")
    lines += ["", "float64 agreement with fsl loop (32x32, meta-batch 3): " + ", ".join(
        f"{r['arch']} {r['order']} {r['implementation']} {r['float64_rel_diff']:.0e}" for r in exact)]
    lines += ["", "| arch | episodes at once | s per 100 meta-test episodes (5 steps, 75 queries) |", "|---|---|---|"]
    lines += [f"| {r['arch']} | {r['parallel_episodes']} | {r['s_per_100_test_episodes']:.2f} |" for r in test_rows]
    lines += ["", "Expected time of one cell on this device: 100,000 second-order training tasks + 50 validations of "
              "100 episodes + 2,000 test episodes (data loading assumed to keep up).", "",
              "| arch | setting | hours per cell | hours for the 6 cells of this arch |", "|---|---|---|---|"]
    lines += [f"| {h['arch']} | {h['setting']} ({h['kind']}) | {h['hours_per_cell']:.2f} | "
              f"{6 * h['hours_per_cell']:.1f} |" for h in hours]
    (out / f"{name}.md.tmp").write_text("\n".join(lines) + "\n")
    os.replace(out / f"{name}.md.tmp", out / f"{name}.md")
    print("\n".join(lines))
    print(f"\nwritten: {out / (name + '.csv')}, {out / (name + '.md')}")


if __name__ == "__main__":
    main()
