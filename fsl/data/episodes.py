"""N-way K-shot episodes: learn2learn's task pipeline picks the images, the training device builds the tensors.

`MetaDataset` + `Taskset` (the TaskDataset of older releases) with `NWays`, `KShots(shots + queries)`,
`LoadData`, `RemapLabels` (labels 0..N-1 in a random order per task, i.e. a random assignment of classes to head
rows) and `ConsecutiveLabels` (items grouped by class) run over the split's labels only: an episode's description
is its image indices, their labels and, for training, each image's augmentation parameters (`EpisodeSpec`, a few KB
of numpy arrays). DataLoader workers compute descriptions and pass them back through a pipe, so nothing goes
through shared memory (/dev/shm); the training process gathers the uint8 pixels from the memory-mapped image store
(fsl.data.store) and augments and normalises the whole meta-batch on its device (`EpisodeMaker`).

Episode `i` of an `EpisodeDataset` is a pure function of `(seed, stream, i)`: the task description (learn2learn draws
it with Python's `random`) and the augmentation parameters (torch's CPU RNG, as torchvision draws them) are drawn
under a generator seeded from `(seed, stream, i)`, the stream being the split the episodes come from (`STREAMS`). So
the same seed gives the same classes, images and crops in every run, with any number of DataLoader workers, in any
order, and after resuming at any task; the caller's RNG state is left as it was. Episode i of one split shares
nothing with episode i of another (before #36 the stream was (seed, i) for every split: validation and test episode
i then had the same rotations and drawing positions, `EPISODE_STREAMS`).
"""
from __future__ import annotations

import contextlib
import functools
import os
import queue
import random
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import learn2learn as l2l
import learn2learn.vision.transforms  # noqa: F401  (l2l.vision is not imported by learn2learn itself)
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fsl.data.augment import AugmentPlan, augment, draw_params, normalise, plan_augmentation, to_device
from fsl.data.base import DatasetError, SplitDataset
from fsl.data.store import ImageStore
from fsl.data.transforms import IMAGENET, Normalisation, Taps, tap_patches


class Episode(NamedTuple):
    """support_x: (ways*shots, C, H, W); support_y: (ways*shots,) in 0..ways-1 (class-major order);
    query_x: (ways*queries, C, H, W); query_y: (ways*queries,). A meta-batch has one more leading dimension (tasks)
    on every field."""
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device: torch.device | str) -> "Episode":
        return Episode(*(t.to(device, non_blocking=True) for t in self))


class EpisodeSpec(NamedTuple):
    """What an episode is, before any pixel is read: indices (ways*(shots+queries),) into the split, grouped by
    class (shots then queries within each class); labels (same shape) in 0..ways-1; params (same length,
    len(fsl.data.augment.PARAMS)) augmentation parameters, or (0, 0) without augmentation; turns (same shape)
    each image's counter-clockwise quarter turns, its class's (`ClassRotations`), or (0,) without rotations. A batch
    from `episode_loader` has a leading task dimension on every field."""
    indices: np.ndarray
    labels: np.ndarray
    params: np.ndarray
    turns: np.ndarray


SEEDED = threading.RLock()  # one seeded draw at a time in this process (`seeded`)
STREAMS = {"train": 0, "val": 1, "test": 2}  # each split's own random stream, an entropy word of SeedSequence
EPISODE_STREAMS = "per-split"  # how episode streams are derived, recorded in checkpoints and result rows: "per-split"
                               # (seed, split, i), since #36; rows and checkpoints without it: SHARED_STREAMS
SHARED_STREAMS = "shared"      # the streams before #36: episode i of every split from (seed, i)


@contextmanager
def seeded(seed: int, index: int, stream: str = "train") -> Iterator[None]:
    """Seed Python's `random` and torch's CPU RNG from (seed, stream, index) inside the block; restore them after.
    `stream`: a key of STREAMS, the split whose episode `index` is drawn.

    Both are process-wide (learn2learn's transforms call the `random` module's functions), so the block holds a
    process-wide lock: an EpisodeStream's producer thread drawing training episodes while the trainer draws
    validation ones would otherwise interleave their draws (2 to 5 of 200 episodes differed, issue #30)."""
    derived = int(np.random.SeedSequence([seed, STREAMS[stream], index]).generate_state(1, dtype=np.uint64)[0])
    with SEEDED, torch.random.fork_rng(devices=[]):
        python_state = random.getstate()
        random.seed(derived)
        # the CPU generator only: torch.manual_seed would also queue seeds for CUDA/XPU/MTIA, capturing a Python
        # stack trace each time (~2 ms per episode)
        torch.default_generator.manual_seed(derived)
        try:
            yield
        finally:
            random.setstate(python_state)


class SplitLabels(Dataset):
    """The split as learn2learn sees it: item i is (i, label of i); no image is touched."""

    def __init__(self, labels: list[int]):
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, self.labels[index]


def items_to_arrays(items: list[tuple[int, ...]]) -> np.ndarray:
    """A task's (index, label[, quarter turns]) items -> one (fields, n) int64 array: the Taskset's collate
    (torch's default_collate took 5 ms per 105-image episode)."""
    return np.asarray(items, dtype=np.int64).reshape(len(items), -1).T


def with_turns(item: tuple[int, int], turns: int) -> tuple[int, int, int]:
    return (*item, turns)


class ClassRotations(l2l.vision.transforms.RandomClassRotation):
    """learn2learn's RandomClassRotation for a pipeline that moves image indices, not images: the same angles,
    drawn the same way (`random.choice(degrees)` for each new class, in the task's order), recorded as quarter turns
    in each item, (index, label) -> (index, label, turns); the pixels are turned when they are gathered
    (`EpisodeMaker.gather`: np.rot90, the same pixels as torchvision's rotation by a multiple of 90 degrees;
    tests/test_omniglot.py). Unlike learn2learn 0.2.0's transform, every class keeps its own angle: there, each
    image's lambda reads the loop variable `rotation` late, so every image of a task gets the last class's angle."""

    def __init__(self, dataset: l2l.data.MetaDataset):
        super().__init__(dataset, [0.0, 90.0, 180.0, 270.0])

    def __call__(self, task_description: list) -> list:
        turns: dict[int, int] = {}
        for description in task_description:
            label = self.dataset.indices_to_labels[description.index]
            if label not in turns:
                turns[label] = int(random.choice(self.degrees)) // 90
            description.transforms.append(functools.partial(with_turns, turns=turns[label]))
        return task_description


def build_taskset(dataset: SplitDataset, ways: int, shots: int, queries: int,
                  rotations: bool = False, keys: str = "") -> l2l.data.Taskset:
    """learn2learn task pipeline drawing `ways` classes and `shots + queries` images of each; `rotations`: each class
    turned by a random multiple of 90 degrees (`ClassRotations`). `keys`: the config section the episode sizes come
    from ("train" or "test"), for the error messages."""
    per_class = dataset.images_per_class()
    ways_key, shots_key, queries_key = (f"{keys}.{k}" if keys else k for k in ("ways", "shots", "queries"))
    if len(per_class) < ways:
        raise DatasetError(f"{type(dataset).__name__} split has {len(per_class)} classes, fewer than {ways_key}="
                           f"{ways}\n  fix: {ways_key}={len(per_class)} at most, or a split with more classes")
    too_small = {dataset.class_names[c]: n for c, n in per_class.items() if n < shots + queries}
    if too_small:
        raise DatasetError(f"{len(too_small)} class(es) have fewer images than {shots_key} + {queries_key} = {shots} "
                           f"+ {queries}, e.g. {dict(list(too_small.items())[:3])}\n"
                           f"  fix: lower {shots_key} or {queries_key} (to {min(too_small.values())} images in all), "
                           f"or remove these classes from the split")
    meta = l2l.data.MetaDataset(SplitLabels(dataset.labels), indices_to_labels=dataset.indices_to_labels())
    transforms = [
        l2l.data.transforms.NWays(meta, n=ways),
        l2l.data.transforms.KShots(meta, k=shots + queries),
        l2l.data.transforms.LoadData(meta),
        l2l.data.transforms.RemapLabels(meta, shuffle=True),
        l2l.data.transforms.ConsecutiveLabels(meta),
    ] + ([ClassRotations(meta)] if rotations else [])
    return l2l.data.Taskset(meta, task_transforms=transforms, task_collate=items_to_arrays)


class EpisodeDataset(Dataset):
    """Episodes `start .. start+count-1` of the stream defined by `seed` and `stream` (the split they are drawn
    from: a key of STREAMS; see module docstring), as EpisodeSpecs.

    `image_sizes` (N, 2): the (height, width) of each image of the split, for the augmentation parameters; None for
    episodes without augmentation (validation, test, or data.train_augment=false). `rotations`: every class turned
    by a random multiple of 90 degrees (data.class_rotations)."""

    def __init__(self, dataset: SplitDataset, ways: int, shots: int, queries: int, seed: int,
                 count: int, start: int = 0, image_sizes: np.ndarray | None = None, rotations: bool = False,
                 keys: str = "", stream: str = "train"):
        if stream not in STREAMS:
            raise ValueError(f"stream={stream!r}: one of {list(STREAMS)}")
        self.taskset = build_taskset(dataset, ways, shots, queries, rotations, keys)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.seed, self.start, self.count, self.stream = seed, start, count, stream
        self.image_sizes = image_sizes

    def __len__(self) -> int:
        return self.count

    def describe(self, i: int) -> list[int]:
        """Dataset indices of episode i's images, class by class (support first within each class)."""
        return self[i].indices.tolist()

    def __getitem__(self, i: int) -> EpisodeSpec:
        if not 0 <= i < self.count:
            raise IndexError(i)
        with seeded(self.seed, self.start + i, self.stream):
            indices, labels, *turns = self.taskset.get_task(self.taskset.sample_task_description())
            # drawn after the task, image after image in loading order, as the per-image v1 transforms drew them
            params = draw_params(self.image_sizes[indices]) if self.image_sizes is not None else np.zeros((0, 0))
        grouped = labels.reshape(self.ways, self.shots + self.queries)  # ConsecutiveLabels: one row per class
        assert (grouped == grouped[:, :1]).all(), f"episode {i}: images are not grouped by class: {labels.tolist()}"
        return EpisodeSpec(indices, labels, params, turns[0] if turns else np.zeros(0, dtype=np.int64))


class RankShare(Dataset):
    """This rank's tasks of every meta-batch of `episodes`: item k is episode
    (k // per_rank) * meta_batch + rank * per_rank + k % per_rank, with per_rank = meta_batch / world.
    Loaded in batches of per_rank, rank r's step s holds tasks r*per_rank .. (r+1)*per_rank-1 of meta-batch s, so
    the P ranks together see exactly the meta-batches of a single process. len(episodes) must be a multiple of
    meta_batch."""

    def __init__(self, episodes: Dataset, meta_batch: int, rank: int, world: int):
        assert meta_batch % world == 0 and len(episodes) % meta_batch == 0, (len(episodes), meta_batch, world)
        self.episodes, self.meta_batch, self.rank, self.per_rank = episodes, meta_batch, rank, meta_batch // world

    def __len__(self) -> int:
        return len(self.episodes) // self.meta_batch * self.per_rank

    def global_index(self, k: int) -> int:
        return (k // self.per_rank) * self.meta_batch + self.rank * self.per_rank + k % self.per_rank

    def __getitem__(self, k: int):
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self.episodes[self.global_index(k)]


def collate_specs(batch: list[EpisodeSpec]) -> EpisodeSpec:
    """Stack specs field by field: (tasks, ...) numpy arrays (pickled through the worker's pipe, not shared memory)."""
    return EpisodeSpec(*(np.stack(field) for field in zip(*batch)))


class Planned(NamedTuple):
    """An augmented training meta-batch, planned before any pixel is read (`plan_specs`): indices (n,) the stored
    originals in the plan's processing order; labels (n,) int64 in the batch's order (every task's supports, then
    every task's queries); tasks; plan: its AugmentPlan."""
    indices: np.ndarray
    labels: np.ndarray
    tasks: int
    plan: AugmentPlan


def plan_specs(specs: EpisodeSpec, ways: int, shots: int, queries: int, image_size: int) -> Planned:
    """The order and augmentation plan of an augmented meta-batch `specs`: every task's support images, then every
    task's queries (both come out of the batch as views, no copy of the 70 MB meta-batch), read in the plan's
    processing order (fsl.data.augment.plan_augmentation)."""
    tasks, per_task = specs.indices.shape
    assert not specs.turns.size, "class rotations turn whole stored images: eval-kind (un-augmented) episodes only"
    position = np.arange(tasks * per_task).reshape(tasks, ways, shots + queries)
    order = np.concatenate([position[:, :, :shots].ravel(), position[:, :, shots:].ravel()])
    indices, labels = specs.indices.reshape(-1)[order], specs.labels.reshape(-1)[order]
    plan = plan_augmentation(specs.params.reshape(tasks * per_task, -1)[order], image_size)
    return Planned(indices[plan.order], np.ascontiguousarray(labels, dtype=np.int64), tasks, plan)


def collate_episodes(batch: list[Episode]) -> Episode:
    """Stack episodes field by field: (tasks, ...) on every field."""
    return Episode(*(torch.stack(field) for field in zip(*batch)))


def _loader_worker_init(_: int) -> None:
    """DataLoader workers: one thread (they run Python task sampling; intra-op threads would only fight the
    trainer), and deaf to SIGINT/SIGTERM: Ctrl-C and Slurm signal the whole process group, and the trainer owns
    those signals (it finishes its step and writes latest.pth; a worker killed first would abort that step).
    Workers still end with their trainer: they watch it and exit when it is gone (`exit_with_parent`)."""
    torch.set_num_threads(1)
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)
    exit_with_parent()


def exit_with_parent(interval: float = 1.0) -> None:
    """Exit this process (os._exit) within `interval` seconds of its parent's death, from a daemon thread.

    torch's own watchdog is not enough for a trainer killed outright (SIGKILL: the OOM killer, Slurm past its grace
    time): it ends the worker's loop, but the worker then waits forever at exit for its result queue's feeder thread,
    blocked on a full pipe that nobody reads (seen here: an orphaned worker deaf to SIGTERM, idle, holding the
    store's pages)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(0)
    threading.Thread(target=watch, daemon=True, name="fsl-exit-with-parent").start()


def default_workers() -> int:
    """Loader workers for `data.workers=-1`: one core is the training process's, the rest (up to 4) describe
    episodes, ~0.2k training episodes/s per worker (benchmarks/episode_pipeline.py)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def episode_loader(episodes: Dataset, meta_batch: int = 1, workers: int = 0) -> DataLoader:
    """Yields EpisodeSpec batches with a leading dimension of `meta_batch` tasks, in episode order. `workers`: -1 =
    `default_workers()`; capped at the number of CPU cores."""
    workers = default_workers() if workers < 0 else min(workers, os.cpu_count() or 1)
    return DataLoader(episodes, batch_size=meta_batch, shuffle=False, num_workers=workers,
                      worker_init_fn=_loader_worker_init, persistent_workers=False,
                      prefetch_factor=4 if workers else None, collate_fn=collate_specs)


class Gathered(NamedTuple):
    """A meta-batch on the host, ready for its device (`EpisodeMaker.gather`): pixels uint8, pinned where the device
    is a GPU, in the order the device processes them: (n, S, S, 3) eval-kind images, (n, 2 S, 2 S, 3) the source
    pixels of each training crop (`EpisodeMaker.host_patches`), or, for sources no larger than that (84x84), the
    (n, h, w, 3) sources themselves, whose crops' pixels the device takes (`taps`); labels (n,) int64; tasks; plan:
    the augmentation plan (fsl.data.augment.AugmentPlan), or None for evaluation-kind images; taps: (rows (n, 2 S),
    cols (n, 2 S)) int64 tensors for whole sources, else None."""
    pixels: torch.Tensor
    labels: torch.Tensor
    tasks: int
    plan: AugmentPlan | None
    taps: tuple[torch.Tensor, torch.Tensor] | None = None


def travels_whole(store: ImageStore, image_size: int) -> bool:
    """Whether a train-kind store's originals go to a GPU whole rather than as each crop's 2 image_size x 2 image_size
    taps: all of one size, and no larger than the taps (the 84x84 releases: 84 x 84 < 168 x 168)."""
    sizes = store.sizes
    return (store.kind == "train" and len(sizes) > 0 and bool((sizes == sizes[0]).all())
            and int(sizes[0].prod()) <= (2 * image_size) ** 2)


class EpisodeMaker:
    """EpisodeSpec batches -> Episode batches on `device`, in two stages: `gather` (host: the uint8 images from
    `store`, the augmentation plan, labels) and `build` (device: copy, augment with each image's parameters
    (training) or take the images as stored (evaluation kind), normalise, split support and query). `build` makes
    no host sync, so it can run ahead of the training step (`EpisodeStream`).

    images: from the store (T*n, S, S, 3) uint8 (evaluation kind), or the (T*n, 2 S, 2 S, 3) pixels the crops read
    (training) -> device -> (T, n, C, image_size, image_size) float32, C the channels of `normalisation` (the dataset's:
    ImageNet's RGB, or Omniglot's inverted greyscale, C = 1). Training sources of one size no larger than a crop's
    reads (the 84x84 releases: 84 x 84 < 168 x 168) travel to a GPU whole, 4x fewer bytes, and the GPU takes each
    crop's pixels from them: the same pixels. The host side reads the crops in native code on `threads` threads
    (fsl.data.native) into buffers that are reused once `build` has consumed them (a fresh 70 MB buffer costs its
    page faults: ~60 ms); on a GPU the pinned buffers come from torch's caching host allocator, which reuses them
    once their copies are done."""

    def __init__(self, store: ImageStore, ways: int, shots: int, queries: int, image_size: int,
                 device: torch.device, chunk: int | None = None, normalisation: Normalisation = IMAGENET,
                 threads: int | None = None):
        self.store, self.image_size, self.device = store, image_size, torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # set_device (the producer thread) needs it
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.ways, self.shots, self.queries = ways, shots, queries
        self.chunk = chunk or (64 if self.device.type == "cpu" else None)  # images augmented at a time; None: all
        self.normalisation = normalisation
        self.threads = threads or min(2, os.cpu_count() or 1)
        # sources travel whole to a GPU (class docstring); on a CPU nothing travels, and the host reads the patches
        self.whole = self.device.type == "cuda" and travels_whole(store, image_size)
        self.free: dict[tuple, torch.Tensor] = {}  # host buffers `build` has consumed (not on a GPU)

    def __call__(self, specs: EpisodeSpec) -> Episode:
        return self.build(self.gather(specs))

    def buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A uint8 host buffer of `shape`: pinned (torch's caching host allocator) for a GPU, else one `build` has
        consumed, or new."""
        if self.device.type == "cuda":
            return torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        reused = self.free.pop(shape, None)
        return reused if reused is not None else torch.empty(shape, dtype=torch.uint8)

    def host_images(self, indices: np.ndarray, turns: np.ndarray | None = None) -> torch.Tensor:
        """The stored eval-kind uint8 images `indices` (N,) as (N, S, S, 3), read into pinned memory for a GPU;
        each turned counter-clockwise by its `turns` (N,) quarter turns, if given."""
        pixels = self.buffer((len(indices), *self.store.pixels.shape[1:]))
        array = self.store.gather(indices, out=pixels.numpy())
        for k in (1, 2, 3) if turns is not None and turns.size else ():
            turned = turns == k
            if turned.any():
                array[turned] = np.rot90(array[turned], k, axes=(1, 2))
        return pixels

    def host_patches(self, indices: np.ndarray, plan: AugmentPlan) -> torch.Tensor:
        """The source pixels each crop's resize reads from the stored originals `indices` (N,) (in the plan's
        order): (N, 2 image_size, 2 image_size, 3) uint8, pinned for a GPU."""
        pixels = self.buffer((len(indices), plan.rows.shape[1], plan.cols.shape[1], 3))
        self.store.patches(indices, plan.rows, plan.cols, out=pixels.numpy(), threads=self.threads)
        return pixels

    def host_sources(self, indices: np.ndarray) -> torch.Tensor:
        """The stored originals `indices` (N,) of a store of one image size, whole: (N, h, w, 3) uint8, pinned for a
        GPU."""
        height, width = (int(v) for v in self.store.sizes[0])
        pixels = self.buffer((len(indices), height, width, 3))
        images = self.store.pixels[:len(self.store) * height * width * 3].reshape(-1, height, width, 3)
        np.take(images, indices, axis=0, out=pixels.numpy())
        return pixels

    def gather(self, specs: EpisodeSpec) -> Gathered:
        """Host side: pixels, labels and (training) the augmentation plan of a meta-batch (`plan_specs`)."""
        if specs.params.size:
            specs = plan_specs(specs, self.ways, self.shots, self.queries, self.image_size)
            plan, taps = specs.plan, None
            if self.whole:  # cuda-only
                pixels = self.host_sources(specs.indices)
                pin = self.device.type == "cuda"
                taps = tuple(torch.from_numpy(a).pin_memory() if pin else torch.from_numpy(a)
                             for a in (plan.rows, plan.cols))
            else:
                pixels = self.host_patches(specs.indices, plan)
            labels, tasks = torch.from_numpy(specs.labels), specs.tasks
        else:
            turns = specs.turns.reshape(-1) if specs.turns.size else None
            pixels, plan, taps = self.host_images(specs.indices.reshape(-1), turns), None, None
            labels = torch.from_numpy(np.ascontiguousarray(specs.labels.reshape(-1), dtype=np.int64))
            tasks = len(specs.indices)
        return Gathered(pixels, labels.pin_memory() if self.device.type == "cuda" else labels, tasks, plan, taps)

    def build(self, gathered: Gathered) -> Episode:
        """Device side: the Episode batch of a gathered meta-batch, without a host sync."""
        episode = self._build(gathered)
        if self.device.type != "cuda":  # consumed: the episode holds none of it (on a GPU it holds a copy)
            self.free[tuple(gathered.pixels.shape)] = gathered.pixels
        return episode

    def _build(self, gathered: Gathered) -> Episode:
        channels = len(self.normalisation.mean)
        images = to_device(gathered.pixels, self.device).permute(0, 3, 1, 2)[:, :channels]  # (N, C, S, S), a view
        y = to_device(gathered.labels, self.device)
        tasks, k = gathered.tasks, self.shots
        if gathered.plan is None:
            assert images.shape[-1] == self.image_size, (images.shape, self.image_size)
            x = normalise(images, normalisation=self.normalisation).view(tasks, self.ways, self.shots + self.queries,
                                                                         *images.shape[1:])
            y = y.view(tasks, self.ways, -1)
            # memory layout as the committed results had it (a 1-shot support set keeps the store's NHWC strides,
            # and convolutions round differently on them): changing it moves e.g. the demo's accuracy by ~0.4 points
            return Episode(support_x=x[:, :, :k].flatten(1, 2), support_y=y[:, :, :k].flatten(1),
                           query_x=x[:, :, k:].flatten(1, 2), query_y=y[:, :, k:].flatten(1))
        if gathered.taps is not None:  # cuda-only: whole sources, the crops' pixels taken on the device
            rows, cols = (to_device(t, self.device) for t in gathered.taps)
            images = tap_patches(images, Taps(rows, cols, None, None))
        x = augment(images, gathered.plan.to(self.device), self.image_size, self.chunk)
        support = tasks * self.ways * k
        return Episode(support_x=x[:support].view(tasks, self.ways * k, *x.shape[1:]),
                       support_y=y[:support].view(tasks, self.ways * k),
                       query_x=x[support:].view(tasks, self.ways * self.queries, *x.shape[1:]),
                       query_y=y[support:].view(tasks, self.ways * self.queries))


class _End:
    """The loader is exhausted."""


class _Failed(NamedTuple):
    """The producer thread failed with `error`."""
    error: BaseException


def threaded(prefetch: str, device: torch.device) -> bool:
    """data.prefetch: a producer thread (thread, or auto on CUDA), or batches built when asked for (inline, or auto
    on a CPU)."""
    return prefetch == "thread" or (prefetch == "auto" and device.type == "cuda")


class EpisodeStream:
    """Meta-batches of EpisodeSpecs (a loader, or any iterable) as Episodes on `device`, built ahead by a producer
    thread (`prefetch`: thread, inline, or auto: thread on CUDA, fsl.data.episodes.threaded).

    thread: a background thread takes the next descriptions, gathers their pixels (into pinned host memory for a
    GPU) and builds the batch; on CUDA on a side stream, recording an event that the consumer's stream waits for
    (the host does not), with the tensors marked as used by the consumer's stream so that the caching allocator
    keeps them until the step is done. `depth` batches wait at most. With `hold_first`, the thread stops after the
    first batch until `release()` (the trainer probes memory on that batch alone). An error in the thread is raised
    by every later `next()`. Episodes are the same as inline: each is a pure function of (seed, index) (`seeded`
    holds a lock), whatever the main thread draws meanwhile.
    inline: each batch is described, gathered and built when asked for, in the consumer's thread: on a CPU the
    step already uses every core, and a second Python thread would contend for the interpreter lock (it slowed the
    glyphs demo's training on 2 cores). `input_seconds`: the host time the consumer spent in `next()`, waiting or
    (inline) building: the time the step waited for its input."""

    def __init__(self, specs, make: EpisodeMaker, prefetch: str = "auto", depth: int = 2,
                 hold_first: bool = False):
        self.make, self.device = make, make.device
        self.specs = iter(specs)
        self.input_seconds = 0.0
        self.side = self.thread = None
        if threaded(prefetch, self.device):
            self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            self.ready: queue.Queue = queue.Queue(maxsize=depth)
            self.stopping, self.released = threading.Event(), threading.Event()
            if not hold_first:
                self.released.set()
            self.thread = threading.Thread(target=self._produce, args=(self.specs,), daemon=True,
                                           name="fsl-episode-stream")
            self.thread.start()

    def release(self) -> None:
        """Let a `hold_first` producer build ahead."""
        if self.thread is not None:
            self.released.set()

    def _produce(self, specs: Iterator[EpisodeSpec]) -> None:
        try:
            if self.side is not None:  # cuda-only
                # a new thread's current device is 0: leaving torch.cuda.stream() would restore device 0's stream
                # and start a CUDA context there, in every process of a torchrun job
                torch.cuda.set_device(self.device)
            for count, spec in enumerate(specs):
                gathered = self.make.gather(spec)
                with torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext():
                    item = (self.make.build(gathered), self.side.record_event() if self.side is not None else None)
                if not self._put(item) or (count == 0 and not self._wait(self.released)):
                    return
            self._put(_End)
        except BaseException as error:  # handed to the consumer, raised there
            self._put(_Failed(error))

    def _wait(self, event: threading.Event) -> bool:
        """Wait for `event` unless the stream is closing; whether it came."""
        while not self.stopping.is_set():
            if event.wait(timeout=0.1):
                return True
        return False

    def _put(self, item) -> bool:
        while not self.stopping.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "EpisodeStream":
        return self

    def __next__(self) -> Episode:
        start = time.perf_counter()
        if self.thread is None:
            episode = self.make(next(self.specs))
        else:
            item = self.ready.get()
            if item is _End or isinstance(item, _Failed):
                self.ready.put(item)  # for every later next() too: the producer has stopped
                if item is _End:
                    raise StopIteration
                raise item.error
            episode, event = item
            if event is not None:  # cuda-only
                consumer = torch.cuda.current_stream(self.device)
                consumer.wait_event(event)
                for tensor in episode:
                    tensor.record_stream(consumer)
        self.input_seconds += time.perf_counter() - start
        return episode

    def close(self) -> None:
        """Stop the thread, if any (the loader's workers end with its iterator)."""
        if self.thread is None:
            return
        self.stopping.set()
        while self.thread.is_alive():
            try:
                self.ready.get_nowait()
            except queue.Empty:
                self.thread.join(timeout=0.1)

    def __enter__(self) -> "EpisodeStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
