"""Episode pipeline: the host's work per meta-batch (#48), training episodes per second, bytes in flight, and memory
at tiered-ImageNet scale (#15).

Part 0, host work (#48): a protocol training meta-batch (8 tasks x 105 crops) as the product makes it for a GPU,
the trainer's side only (`EpisodeMaker.gather`: the augmentation plan, the pixels each crop reads, the buffer; the
episode descriptions from the loader), in wall time per meta-batch at steady state, on one core (describing in the
trainer, the gather on 1 thread) and on two (one loader worker describes, the gather on 2 threads); for photo-sized
sources (a made root of 500x375 JPEGs, as benchmarks/full_size_store.py makes it) and 84x84 sources (the
mini-ImageNet fixture, travelling whole). Then the bytes each meta-batch carries to the device, the input rate the
host sustains, and how much a consumer thread issuing small torch ops at a steady rate (as the step's launching
thread does) is slowed while the producer thread gathers. The gather is fsl's own code; the part fails if the product
takes another path than the one timed (the native kernel not built, 84x84 sources not whole).

Part 1, throughput (mini-ImageNet-lite, protocol training episodes: 5-way, 5 shots + 16 queries, 84x84, augmented):
    v1   the pipeline before #15: DataLoader workers decode each image with PIL and apply torchvision's per-image
         transforms, float32 episodes through shared memory;
    fsl  workers only describe episodes (indices, labels, augmentation parameters: numpy through a pipe); the
         training process gathers uint8 pixels from the memory-mapped store and augments the meta-batch at once.
Part 2, memory (a synthetic tiered-ImageNet train split in Ren et al.'s layout, --images images of 351 classes,
random small PNGs): build the store, then draw 2,000 augmented training episodes with workers and report the
resident memory of the main process and of each worker (private "anon" memory and shared file pages) at the start
and the end, for this split and for one a tenth of its size.

    python benchmarks/episode_pipeline.py [--episodes 400] [--images 100000] [--skip-memory] [--skip-host-work]
        [--device cuda] [--workers 0 1 2] [--out DIR]

Writes benchmarks/results/episode-pipeline-<machine>.md (and prints it).
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import learn2learn as l2l  # noqa: E402
from meta_train_speed import sync  # noqa: E402  (this folder: the script's own path)
from torch.utils.data import DataLoader  # noqa: E402

from fsl.data import load_split  # noqa: E402
from fsl.data.episodes import (  # noqa: E402
    EpisodeDataset,
    EpisodeMaker,
    episode_loader,
    seeded,
    travels_whole,
)
from fsl.data.store import open_store  # noqa: E402
from fsl.data.transforms import train_transform  # noqa: E402
from fsl.device.distributed import describe_device, device_slug  # noqa: E402

WAYS, SHOTS, QUERIES, SIZE, META_BATCH = 5, 5, 16, 84, 8


class V1Episodes(torch.utils.data.Dataset):
    """The pre-#15 pipeline: learn2learn loads transform(PIL image) per item; float32 (105, 3, 84, 84) per episode."""

    def __init__(self, root: Path, count: int):
        dataset = load_split("mini-imagenet", root, "train", train_transform(SIZE))
        meta = l2l.data.MetaDataset(dataset, indices_to_labels=dataset.indices_to_labels())
        self.taskset = l2l.data.Taskset(meta, task_transforms=[
            l2l.data.transforms.NWays(meta, n=WAYS), l2l.data.transforms.KShots(meta, k=SHOTS + QUERIES),
            l2l.data.transforms.LoadData(meta), l2l.data.transforms.RemapLabels(meta, shuffle=True),
            l2l.data.transforms.ConsecutiveLabels(meta)])
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        with seeded(0, i):
            return self.taskset.get_task(self.taskset.sample_task_description())


def single_thread(_: int) -> None:
    torch.set_num_threads(1)


def rate_v1(root: Path, episodes: int, workers: int) -> tuple[float, float]:
    loader = DataLoader(V1Episodes(root, episodes), batch_size=META_BATCH, num_workers=workers,
                        worker_init_fn=single_thread, prefetch_factor=4 if workers else None)
    start, nbytes = time.perf_counter(), 0
    for x, y in loader:
        nbytes = x.nbytes + y.nbytes
    return episodes / (time.perf_counter() - start), nbytes


def rate_fsl(root: Path, cache: Path, episodes: int, workers: int,
             device: torch.device) -> tuple[float, float, dict]:
    dataset = load_split("mini-imagenet", root, "train")
    store = open_store(dataset, "mini-imagenet", "train", "train", SIZE, cache, progress=False)
    stream = EpisodeDataset(dataset, WAYS, SHOTS, QUERIES, seed=0, count=episodes, image_sizes=store.sizes)
    make = EpisodeMaker(store, WAYS, SHOTS, QUERIES, SIZE, device)
    start, nbytes = time.perf_counter(), 0
    for specs in episode_loader(stream, META_BATCH, workers):
        nbytes = sum(f.nbytes for f in specs)
        make(specs)
    sync(device)
    rate = episodes / (time.perf_counter() - start)
    # where the time goes, per meta-batch of 8
    specs = next(iter(episode_loader(stream, META_BATCH, 0)))
    parts = {}
    t = time.perf_counter()
    [stream[i] for i in range(META_BATCH)]
    parts["describe 8 episodes (one process)"] = time.perf_counter() - t
    t = time.perf_counter()
    make.gather(specs)
    parts[f"gather the pixels of 840 crops (on {device.type}: {'the sources whole' if make.whole else 'their taps'})"] = \
        time.perf_counter() - t
    t = time.perf_counter()
    make(specs)
    sync(device)
    parts[f"gather + augment + normalise ({device.type})"] = time.perf_counter() - t
    return rate, nbytes, parts


# images per split of the full releases (mini: Ravi & Larochelle; tiered: Ren et al.; CUB: 11,788 images, the train
# half of the classes holding about half of them) and the original (height, width) the train store keeps of each:
# the release's 84 x 84 for tiered-ImageNet and mini-ImageNet's 84x84 form; the full-size ImageNet JPEGs of
# mini-ImageNet's full form and CUB's photos at 500 x 375, typical of both (assumed, not measured: CUB's long side is
# at most 500 px; benchmarks/full_size_store.py measures a store of such images)
FULL_SPLITS = {"mini-imagenet (84x84)": ((38_400, (84, 84)), (9_600, 84), (12_000, 84)),
               "mini-imagenet (full)": ((38_400, (375, 500)), (9_600, 84), (12_000, 84)),
               "tiered-imagenet": ((448_695, (84, 84)), (124_261, 84), (206_209, 84)),
               "cub (about)": ((5_894, (375, 500)), (2_947, 84), (2_947, 84))}


def full_scale_sizes() -> list[str]:
    """Disk use of the image stores of the full datasets at 84x84 (fsl.data.store): train kind for the train split
    (the originals), eval kind (84 x 84) for validation and test."""
    lines = ["| dataset | train store | val store | test store | all |", "|---|---|---|---|---|"]
    for dataset, ((train, (h, w)), (val, _), (test, _)) in FULL_SPLITS.items():
        sizes = [train * h * w * 3, val * SIZE ** 2 * 3, test * SIZE ** 2 * 3]
        cells = [f"{train:,} x {h}x{w} x 3 = {sizes[0] / 1e9:.2f} GB",
                 *(f"{n:,} x {SIZE}^2 x 3 = {b / 1e9:.2f} GB" for n, b in zip((val, test), sizes[1:]))]
        lines.append(f"| {dataset} | " + " | ".join(cells) + f" | {sum(sizes) / 1e9:.2f} GB |")
    return lines


def synthetic_tiered(folder: Path, images: int, classes: int = 351) -> Path:
    """Ren et al.'s train split layout with `images` random small PNGs (a solid colour and a random rectangle)."""
    rng = np.random.default_rng(0)
    labels = np.arange(images) % classes
    png = np.empty(images, dtype=object)
    for i in range(images):
        pixels = np.empty((84, 84, 3), np.uint8)
        pixels[:] = rng.integers(0, 256, 3, dtype=np.uint8)
        top, left = rng.integers(0, 60, 2)
        pixels[top:top + 24, left:left + 24] = rng.integers(0, 256, 3, dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        png[i] = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train_images_png.pkl", "wb") as f:
        pickle.dump(png, f, protocol=4)
    with open(folder / "train_labels.pkl", "wb") as f:
        pickle.dump({"label_specific": labels, "label_specific_str": [f"n{c:08d}" for c in range(classes)],
                     "label_general": labels % 20, "label_general_str": [f"g{g}" for g in range(20)]}, f)
    return folder


def memory_mb(pid: int) -> dict:
    """A process's memory from /proc/<pid>/smaps_rollup, MB: Rss (resident), Pss (resident, shared pages divided
    among the processes sharing them), Anonymous (what the process allocated or copied: heap, tensors, Python
    objects) and File (resident pages of mapped files: the memory-mapped store and the libraries; page cache, which
    the kernel can drop and re-read, and shares among processes)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        fields[key] = int(value.split()[0]) / 1024
    return {"Rss": fields["Rss"], "Pss": fields["Pss"], "Anonymous": fields["Anonymous"],
            "File": fields["Rss"] - fields["Anonymous"]}


def memory_run(root: Path, cache: Path, episodes: int, workers: int) -> dict:
    """Draw `episodes` augmented training episodes; sample every process's memory as it goes."""
    before = memory_mb(os.getpid())
    dataset = load_split("tiered-imagenet", root, "train")
    store = open_store(dataset, "tiered-imagenet", "train", "train", SIZE, cache, progress=False)
    stream = EpisodeDataset(dataset, WAYS, SHOTS, QUERIES, seed=0, count=episodes, image_sizes=store.sizes)
    make = EpisodeMaker(store, WAYS, SHOTS, QUERIES, SIZE, torch.device("cpu"))
    loader = iter(episode_loader(stream, META_BATCH, workers))
    samples: dict[str, list[dict]] = {"main": []}
    worker_pids = [w.pid for w in getattr(loader, "_workers", [])]
    for step, specs in enumerate(loader):
        make(specs)
        if step in (0, episodes // META_BATCH - 1) or step % 25 == 0:
            samples["main"].append(memory_mb(os.getpid()))
            for k, pid in enumerate(worker_pids):
                samples.setdefault(f"worker {k}", []).append(memory_mb(pid))
    return {"images": len(dataset), "store_mb": store.path.stat().st_size / 2**20, "main_before": before,
            "samples": samples}


def memory_child(queue, *args) -> None:
    queue.put(memory_run(*args))


def run_memory_in_child(root: Path, cache: Path, episodes: int, workers: int) -> dict:
    """One split per fresh process, so that peak memory is this split's alone."""
    import multiprocessing as mp
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=memory_child, args=(queue, root, cache, episodes, workers))
    child.start()
    result = queue.get()
    child.join()
    return result


def throughput_lines(args: argparse.Namespace, root: Path, work: Path, device: torch.device) -> list[str]:
    """Part 1: training episodes/s of v1 and of fsl for each loader worker count, and where fsl's time goes."""
    lines: list[str] = []
    parts, v1_rates, fsl_rates = {}, [], []
    for workers in args.workers:
        rate, v1_bytes = rate_v1(root, args.episodes, workers)
        v1_rates.append(rate)
    for workers in args.workers:
        rate, nbytes, parts = rate_fsl(root, work / "cache", args.episodes, workers, device)
        fsl_rates.append(rate)
    for workers, old, new in zip(args.workers, v1_rates, fsl_rates):
        lines.append(f"| {workers} | {old:.1f} | {new:.1f} | {new / old:.2f}x |")
    lines.append(f"| best of each | {max(v1_rates):.1f} | {max(fsl_rates):.1f} | "
                 f"**{max(fsl_rates) / max(v1_rates):.2f}x** |")
    print("\n".join(lines[-len(args.workers) - 1:]), flush=True)
    describe = parts["describe 8 episodes (one process)"] / META_BATCH
    lines += ["", f"Bytes per meta-batch from the workers: v1 {v1_bytes / 1e6:.1f} MB of float32 through shared "
              f"memory; fsl {nbytes / 1024:.1f} KB of numpy through a pipe.", "",
              "Where the time goes (meta-batch of 8, one process):", ""]
    lines += [f"- {name}: {seconds * 1000:.1f} ms" for name, seconds in parts.items()]
    lines += ["", "Feeding a GPU: there the trainer augments on the GPU and the CPU work per episode is its "
              f"description ({describe * 1000:.1f} ms in a worker) plus the gather: one worker core describes "
              f"{1 / describe:.0f} training tasks/s (computed from this machine's describing time; no GPU "
              "rate is assumed here)."]
    return lines


def memory_lines(args: argparse.Namespace, work: Path) -> list[str]:
    """Part 2: memory of the tiered-ImageNet layout at scale, main process and loader workers."""
    lines: list[str] = []
    lines += ["", f"## tiered-ImageNet layout at scale: {args.memory_episodes} augmented training episodes, "
              f"2 loader workers", "",
              "Anonymous: memory the process allocated or copied (heap, tensors, Python objects). File pages: "
              "resident pages of mapped files, i.e. the memory-mapped store the main process reads pixels from "
              "(and the libraries): page cache, shared between processes, dropped and re-read by the kernel under "
              "memory pressure.", "",
              "| split images | store on disk | process | anonymous MB, first batch -> last | "
              "file pages MB, first -> last | PSS MB, last | RSS MB, last |", "|---|---|---|---|---|---|---|"]
    for images in (args.images // 10, args.images):
        t = time.perf_counter()
        folder = synthetic_tiered(work / f"tiered-{images}", images)
        made = time.perf_counter() - t
        t = time.perf_counter()
        open_store(load_split("tiered-imagenet", folder, "train"), "tiered-imagenet", "train", "train", SIZE,
                   work / "cache", progress=False)
        built = time.perf_counter() - t
        result = run_memory_in_child(folder, work / "cache", args.memory_episodes, 2)
        for process, samples in result["samples"].items():
            lines.append(f"| {images:,} | {result['store_mb']:.0f} MB | {process} | "
                         f"{samples[0]['Anonymous']:.0f} -> {samples[-1]['Anonymous']:.0f} | "
                         f"{samples[0]['File']:.0f} -> {samples[-1]['File']:.0f} | {samples[-1]['Pss']:.0f} | "
                         f"{samples[-1]['Rss']:.0f} |")
            print(lines[-1], flush=True)
        lines.append(f"| | | (generating the split: {made:.0f} s; building its store: {built:.0f} s) | | | | |")
        for name in os.listdir(work / "cache"):
            if name.startswith("tiered"):
                os.remove(work / "cache" / name)
    return lines


WINDOW = 1.0  # seconds: the consumer part's windows (alone, beside the thread, alone, beside the process), --rounds


def host_work_child(queue, root: str, images: str, cache: str, cores: list[int], batches: int,
                    consumer: float = 0.0, rounds: int = 6) -> None:
    """In a process pinned to `cores`: the steady-state wall time per meta-batch of the trainer's host work, or (with
    `consumer`, an input rate in tasks/s) a consumer thread's rate of small torch ops alone and beside a producer
    that gathers meta-batches at that rate (as a GPU's step consumes them; the queue of EpisodeStream holds the
    producer back), on one gather thread: `consumer_rates`."""
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(1)
    dataset = load_split("mini-imagenet", Path(root), "train", images=images)
    store = open_store(dataset, "mini-imagenet", "train", "train", SIZE, Path(cache), progress=False)
    threads = 1 if consumer else len(cores)
    make = EpisodeMaker(store, WAYS, SHOTS, QUERIES, SIZE, torch.device("cpu"), threads=threads)
    make.whole = travels_whole(store, SIZE)  # as for a GPU (this machine has none: its buffers are not pinned)
    episodes = EpisodeDataset(dataset, WAYS, SHOTS, QUERIES, seed=0, count=META_BATCH * (batches + 2),
                              image_sizes=store.sizes)
    # the product's loader describes episodes in worker processes wherever there is a core for one
    # (fsl.data.episodes.default_workers); on one core, in the trainer's process. The consumer's producer has its
    # loader worker beside it on its own core: describing in the producer thread (17 ms of Python a meta-batch)
    # would time a path the product does not take on a GPU machine
    workers = 1 if consumer or len(cores) > 1 else 0

    def produce(stop=None, interval: float = 0.0, core: int | None = None, gate=None) -> tuple[float, int, int]:
        """Gather every meta-batch of the loader, the first two untimed, one every `interval` seconds at most, this
        thread (and the loader worker it forks) on `core` if given, and only while `gate` (an Event) is set;
        (seconds per meta-batch, bytes, count)."""
        if core is not None:
            os.sched_setaffinity(0, [core])  # 0: the calling thread
        loader = iter(episode_loader(episodes, META_BATCH, workers))
        for _ in range(2):  # warm-up: the loader's worker starts, the buffer is allocated
            warm = make.gather(next(loader))
            make.free[tuple(warm.pixels.shape)] = warm.pixels
        start, count, nbytes = time.perf_counter(), 0, 0
        due = start
        for specs in loader:
            if gate is not None and not gate.is_set():
                while not gate.wait(0.05):
                    if stop.is_set():
                        break
                due = time.perf_counter()  # paced afresh: no burst to catch up after a pause
            gathered = make.gather(specs)
            make.free[tuple(gathered.pixels.shape)] = gathered.pixels  # consumed, as build would
            nbytes, count, due = gathered.pixels.nbytes, count + 1, due + interval
            if stop is not None and stop.is_set():
                break
            time.sleep(max(0.0, due - time.perf_counter()))
        return (time.perf_counter() - start) / max(count, 1), nbytes, count

    if not consumer:
        seconds, nbytes, _ = produce()
        queue.put({"seconds": seconds, "bytes": nbytes, "whole": make.whole,
                   "native": __import__("fsl.data.native", fromlist=["load"]).load() is not None})
        return
    queue.put(consumer_rates(produce, META_BATCH / consumer, cores, rounds))


def consumer_rates(produce, interval: float, cores: list[int], rounds: int) -> dict:
    """The consumer (this thread, on cores[0], as the launching thread keeps a core): its rate of small torch ops in
    `rounds` rounds of four WINDOW-second windows, alone, beside `produce` in a thread of this process on cores[1]
    (sharing the interpreter lock), alone, and, the control, beside the same producer in a process of its own (no
    lock shared; the same core). The producers pause between their windows (a gate), so that each window's rate is
    compared with the alone windows next to it in time: the machine's own drift (other tenants) falls on both."""
    import multiprocessing
    import threading

    x, w = torch.randn(8, 32, 10, 10), torch.randn(32, 32, 3, 3)
    os.sched_setaffinity(0, [cores[0]])

    def ops_per_second(seconds: float) -> float:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.relu(torch.nn.functional.conv2d(x, w, padding=1)).sum()
            count += 1
        return count / (time.perf_counter() - start)
    stop, beside_gate, result = threading.Event(), threading.Event(), {}
    producer = threading.Thread(target=lambda: result.update(zip(("seconds", "bytes", "count"),
                                                                 produce(stop, interval, cores[1], beside_gate))))
    context = multiprocessing.get_context("fork")
    apart_stop, apart_gate = context.Event(), context.Event()
    other = context.Process(target=lambda: produce(apart_stop, interval, cores[1], apart_gate))
    producer.start()
    other.start()
    ops_per_second(2.0)  # warm-up: both producers past their first batches, waiting at their gates
    rates: dict[str, list[float]] = {"alone": [], "beside": [], "apart": []}
    gated = 0.0  # seconds the thread producer was let run
    for _ in range(rounds):
        for name, gate in (("alone", None), ("beside", beside_gate), ("alone", None), ("apart", apart_gate)):
            opened = time.perf_counter()
            if gate is not None:
                gate.set()
                time.sleep(0.2)  # the producer at its pace
            rates[name].append(ops_per_second(WINDOW))
            if gate is not None:
                gate.clear()
                gated += (time.perf_counter() - opened) if name == "beside" else 0.0
                time.sleep(0.1)  # its last batch done
    stop.set()
    apart_stop.set()
    beside_gate.set()
    apart_gate.set()
    producer.join()
    other.join()
    return {name: float(np.mean(values)) for name, values in rates.items()} | {
        "input_rate": result.get("count", 0) * META_BATCH / gated}


def in_child(*args) -> dict:
    import multiprocessing
    context = multiprocessing.get_context("fork")  # the parent has started no thread
    queue = context.Queue()
    process = context.Process(target=host_work_child, args=(queue, *args))
    process.start()
    result = queue.get(timeout=1800)
    process.join()
    return result


def host_work_lines(args: argparse.Namespace, root: Path, work: Path) -> list[str]:
    """Part 0 (#48): host work per meta-batch, bytes, input rate, and the consumer's slowdown."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from full_size_store import made_root
    photos = made_root(work / "photos", args.photo_classes, 40)
    cores = sorted(os.sched_getaffinity(0))[:2]
    sources = {"photos, 500x375 (a made root of JPEGs)": (photos, "full"),
               "84x84 (mini-ImageNet fixture)": (root, "84x84")}
    lines = ["## Host work per protocol meta-batch (#48)", "",
             f"8 tasks x 105 crops, the trainer's side as for a GPU (`EpisodeMaker.gather`: pixels into a buffer; "
             f"descriptions from the loader; buffers reused, not pinned: this machine has no GPU), wall "
             f"time per meta-batch over {args.host_batches} meta-batches after "
             f"2 untimed, each in a process pinned to its cores (torch 1 thread):", "",
             "| sources | cores (loader workers, gather threads) | ms per meta-batch, median (range) of "
             f"{args.repeats} runs | input rate, tasks/s | "
             "MB per meta-batch to the device | bytes per crop / source image |", "|---|---|---|---|---|---|"]
    failures = []
    for name, (folder, form) in sources.items():
        dataset = load_split("mini-imagenet", folder, "train", images=form)
        made = open_store(dataset, "mini-imagenet", "train", "train", SIZE, work / "cache", progress=False)
        source_bytes = int(made.sizes[0].prod()) * 3
        for used in ([cores[0]], cores) if len(cores) > 1 else ([cores[0]],):
            runs = [in_child(str(folder), form, str(work / "cache"), used, args.host_batches)
                    for _ in range(args.repeats)]
            result = runs[0]
            ms = sorted(r["seconds"] * 1e3 for r in runs)
            median = float(np.median(ms))
            per_crop = result["bytes"] / (META_BATCH * (SHOTS + QUERIES) * WAYS)
            lines.append(f"| {name} | {len(used)} ({0 if len(used) == 1 else 1}, {len(used)}) | "
                         f"**{median:.1f}** ({ms[0]:.1f}-{ms[-1]:.1f}) | {META_BATCH / median * 1e3:.0f} | "
                         f"{result['bytes'] / 1e6:.1f} | {per_crop / source_bytes:.2f} (first image) |")
            print(lines[-1], flush=True)
            if not result["native"]:
                failures.append("the native gather (fsl.data.native) could not be built: the product would take "
                                "numpy's path, not the one timed")
            if form == "84x84" and not result["whole"]:
                failures.append("84x84 sources did not travel whole (EpisodeMaker.whole)")
    if len(cores) > 1:
        lines += ["", "A consumer thread issuing small torch ops at its steady rate (conv 3x3 + ReLU + sum on "
                  "8x32x10x10, 1 torch thread; the step's launching thread) on one core, alone and while a producer "
                  "thread of the same process gathers photo meta-batches at a given input rate on the other core "
                  "(with its loader worker; the gather on 1 thread); and, as the control, beside the same producer in "
                  "a process of its own (no interpreter lock shared, the same cores): the difference is what sharing "
                  "the interpreter lock costs, the rest is the machine's (its two cores share caches and memory, and "
                  "may be one physical core's two threads). Each run interleaves the three: "
                  f"{args.rounds} rounds of {WINDOW:.0f}-second windows alone, beside the thread, alone, beside the "
                  "process (each producer paused at a gate outside its windows), so that the machine's drift falls on "
                  "all three alike; a run's figure is the mean of its windows of each kind:", "",
                  f"| input rate, tasks/s | the thread's, measured | consumer alone, iterations/s | beside the "
                  f"producer thread | slowdown, median (range) of {args.repeats} runs | beside the producer in a "
                  "process of its own | slowdown |",
                  "|---|---|---|---|---|---|---|"]
        for rate in args.consumer_rates:
            runs = [in_child(str(photos), "full", str(work / "cache"), cores, 10**6, rate, args.rounds)
                    for _ in range(args.repeats)]
            slowdowns = sorted(100 * (1 - r["beside"] / r["alone"]) for r in runs)
            aparts = sorted(100 * (1 - r["apart"] / r["alone"]) for r in runs)
            consumer = runs[0]
            lines.append(f"| {rate:.0f} | {consumer['input_rate']:.0f} | {consumer['alone']:.0f} | "
                         f"{consumer['beside']:.0f} | **{np.median(slowdowns):.1f} %** ({slowdowns[0]:.1f} to "
                         f"{slowdowns[-1]:.1f}) | {consumer['apart']:.0f} | {np.median(aparts):.1f} % "
                         f"({aparts[0]:.1f} to {aparts[-1]:.1f}) |")
            print(lines[-1], flush=True)
    if failures:
        raise SystemExit("episode_pipeline: " + "; ".join(dict.fromkeys(failures)))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=400, help="part 1: training episodes per measurement")
    parser.add_argument("--images", type=int, default=100_000, help="part 2: images of the synthetic split")
    parser.add_argument("--memory-episodes", type=int, default=2000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where fsl's trainer side augments (v1 always runs on the CPU, as it did)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to time")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-host-work", action="store_true")
    parser.add_argument("--host-batches", type=int, default=20, help="part 0: timed meta-batches per measurement")
    parser.add_argument("--photo-classes", type=int, default=16, help="part 0: classes of 40 made photos")
    parser.add_argument("--repeats", type=int, default=3, help="part 0: runs of each measurement (median, range)")
    parser.add_argument("--consumer-rates", type=float, nargs="+", default=[40, 100],
                        help="part 0: input rates (tasks/s) at which the producer feeds the consumer")
    parser.add_argument("--rounds", type=int, default=6, help="part 0: interleaved rounds of the consumer's windows")
    parser.add_argument("--sizes-only", action="store_true", help="only the full-scale store sizes, computed: "
                        "written to <out>/store-sizes.md")
    parser.add_argument("--data-root",
                        default=str(Path(__file__).resolve().parents[2] / "shared/data/mini-imagenet-lite"))
    args = parser.parse_args()
    if args.sizes_only:
        text = "\n".join(["# Image stores of the full datasets at 84x84 (computed from fsl.data.store, not measured)",
                          "", "`python benchmarks/episode_pipeline.py --sizes-only`", "", *full_scale_sizes()]) + "\n"
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "store-sizes.md").write_text(text)
        print(text)
        return
    root = Path(args.data_root)
    work = Path(tempfile.mkdtemp(prefix="fsl-pipeline-bench-"))
    device = torch.device(args.device)
    machine = device_slug(device)
    lines = [f"# Episode pipeline: {machine}", "", "## Image stores of the full datasets (computed, not measured)", "",
             *full_scale_sizes(), "",
             f"`python benchmarks/episode_pipeline.py --episodes {args.episodes} --images {args.images}` on "
             f"{os.cpu_count()} CPU cores, torch {torch.__version__}; training episodes 5-way, 5 + 16 images per "
             f"class, 84x84, augmented, meta-batch 8; fsl's augmentation on {device.type}"
             f" ({describe_device(device)}).", "",
             *(host_work_lines(args, root, work) + [""] if not args.skip_host_work else []),
             "## Throughput", "",
             "Training episodes/s, v1 (before #15: DataLoader workers decode with PIL and apply torchvision's "
             "per-image transforms) and fsl (workers describe episodes; the trainer gathers uint8 pixels from the "
             "store and augments the meta-batch at once), measured in the same run:", "",
             "| loader workers | v1 episodes/s | fsl episodes/s | fsl / v1 |", "|---|---|---|---|"]
    if not args.skip_throughput:
        lines += throughput_lines(args, root, work, device)
    if not args.skip_memory:
        lines += memory_lines(args, work)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"episode-pipeline-{machine}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
