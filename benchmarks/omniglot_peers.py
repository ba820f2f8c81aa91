"""fsl's meta-training step on the Omniglot network beside the MAML loops of learn2learn, higher and torch.func (#29).

One process, one meta-batch of real Omniglot episodes (fsl's pipeline: ../shared/data/omniglot, class rotations), the
cell's network and inner loop (experiments/omniglot-conv4-*.yaml: Finn et al.'s strided conv4, BatchNorm with an
offset only, the class-sum inner loss), and every parameter adapted (maml.adapt_bn=true), as each peer's own example
adapts. Contenders, each as its library's example writes it:
    fsl            fsl.maml.meta_train_step, at `auto` (fsl.maml.batching's timing probe) and at every group size
    learn2learn    MAML(model).clone() and learner.adapt(loss) task by task (examples/vision/maml_omniglot.py)
    higher         innerloop_ctx(net, SGD) and diffopt.step(loss) task by task (examples/maml-omniglot.py)
    torch.func     functional_call + grad for the inner steps, vmap over the meta-batch's tasks, grad outside
The peers run one plain torch.nn copy of fsl's network with fsl's initial weights. Before any timing, each one's
meta-gradient of a 4-task meta-batch is compared with fsl's in float64; a peer that differs is reported and not
timed. Then rounds alternate the contenders, one outer step each (meta-gradient and Adam); the table gives the median
over rounds (and the best), and the ratio to learn2learn's median. fsl's step with the cell's own loop (BatchNorm
offsets not adapted) is timed beside them for reference.

    python benchmarks/omniglot_peers.py [--threads 1] [--rounds 15] [--root ../shared/data/omniglot]

Writes benchmarks/results/omniglot-peers-cpu-x<cores>.md (and prints it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import higher
import learn2learn as l2l
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from meta_train_speed import machine  # noqa: E402  (this folder: the script's own path)

from fsl.config import Config, load_config  # noqa: E402
from fsl.data.episodes import Episode, EpisodeDataset, EpisodeMaker, collate_specs
from fsl.maml import (  # noqa: E402
    InnerLoop,
    batching,  # noqa: E402
    build_learner,
    meta_optimizer,
    meta_train_step,
)
from fsl.train.cell import cell_split, cell_store  # noqa: E402
from fsl.train.meta_train import probe_tasks  # noqa: E402

CELLS = ("omniglot-conv4-1shot", "omniglot-conv4-20way-1shot")
CHECK_TASKS = 4   # tasks of the float64 meta-gradient check
TOLERANCE = 1e-9  # max |peer - fsl| / max |fsl| over every meta-gradient entry, float64


class OffsetBatchNorm(nn.Module):
    """Finn et al.'s BatchNorm: batch statistics, an offset, no scale (a constant 1, as fsl.models.TaskBatchNorm2d
    passes it), eps 1e-3."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.bias, self.eps = nn.Parameter(torch.zeros(channels)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, torch.ones_like(self.bias), self.bias, True, 0.0, self.eps)


class SpatialMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def plain_network(cfg: Config, fsl_model: nn.Module) -> nn.Sequential:
    """The cell's network in plain torch.nn layers (what a peer's example would build), with fsl_model's weights."""
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, 64, 3, stride=2, padding=1), OffsetBatchNorm(64, cfg.model.bn_eps), nn.ReLU()]
        channels = 64
    net = nn.Sequential(*layers, SpatialMean(), nn.Linear(64, cfg.train.ways))
    mine, theirs = list(fsl_model.parameters()), list(net.parameters())
    assert [p.shape for p in mine] == [p.shape for p in theirs], "the plain network is not fsl's"
    with torch.no_grad():
        for a, b in zip(theirs, mine):
            a.copy_(b)
    return net.to(mine[0].dtype)


def tasks(episodes: Episode) -> list[Episode]:
    return [Episode(*(t[i] for t in episodes)) for i in range(len(episodes.query_y))]


def support_loss(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    return F.cross_entropy(logits, labels) * scale  # the cell's class-sum inner loss: ways x the mean


class Peer:
    """A contender's outer step: `gradients(episodes)` leaves the meta-gradient in the network's .grad (mean over
    the tasks), `step(episodes)` adds its Adam update."""

    def __init__(self, name: str, net: nn.Module, loop: InnerLoop, meta_lr: float):
        self.name, self.net, self.loop = name, net, loop
        self.optimizer = torch.optim.Adam(net.parameters(), lr=meta_lr)

    def gradients(self, episodes: Episode) -> None:
        raise NotImplementedError

    def step(self, episodes: Episode) -> None:
        self.optimizer.zero_grad()
        self.gradients(episodes)
        self.optimizer.step()

    def meta_gradient(self, episodes: Episode) -> list[torch.Tensor]:
        self.optimizer.zero_grad()
        self.gradients(episodes)
        return [p.grad.clone() for p in self.net.parameters()]


class Learn2Learn(Peer):
    def __init__(self, *args):
        super().__init__(*args)
        self.maml = l2l.algorithms.MAML(self.net, lr=self.loop.lr, first_order=False)

    def gradients(self, episodes: Episode) -> None:
        batch = tasks(episodes)
        for task in batch:
            learner = self.maml.clone()
            for _ in range(self.loop.steps):
                learner.adapt(support_loss(learner(task.support_x), task.support_y, self.loop.loss_scale))
            F.cross_entropy(learner(task.query_x), task.query_y).backward()
        for p in self.maml.parameters():
            p.grad.data.mul_(1.0 / len(batch))


class Higher(Peer):
    def __init__(self, *args):
        super().__init__(*args)
        self.inner = torch.optim.SGD(self.net.parameters(), lr=self.loop.lr)

    def gradients(self, episodes: Episode) -> None:
        batch = tasks(episodes)
        for task in batch:
            with higher.innerloop_ctx(self.net, self.inner, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(self.loop.steps):
                    diffopt.step(support_loss(fnet(task.support_x), task.support_y, self.loop.loss_scale))
                (F.cross_entropy(fnet(task.query_x), task.query_y) / len(batch)).backward()


class TorchFunc(Peer):
    def gradients(self, episodes: Episode) -> None:
        names = [name for name, _ in self.net.named_parameters()]
        params = {name: p for name, p in self.net.named_parameters()}
        loop, net = self.loop, self.net

        def query_loss(weights, support_x, support_y, query_x, query_y):
            for _ in range(loop.steps):
                g = grad(lambda w: support_loss(functional_call(net, w, (support_x,)), support_y,
                                                loop.loss_scale))(weights)
                weights = {name: weights[name] - loop.lr * g[name] for name in names}
            return F.cross_entropy(functional_call(net, weights, (query_x,)), query_y)

        meta_loss = lambda w: vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(w, *episodes).mean()  # noqa: E731
        for name, g in grad(meta_loss)(params).items():
            params[name].grad = g


PEERS = {"learn2learn": Learn2Learn, "higher": Higher, "torch.func": TorchFunc}


class Fsl:
    """fsl's outer step (fsl.maml.meta_train_step) on its own model, at a group size."""

    def __init__(self, cfg: Config, model: nn.Module, loop: InnerLoop):
        self.cfg, self.model, self.loop = cfg, model, loop
        self.optimizer = meta_optimizer(list(model.parameters()), cfg.train.meta_lr)

    def step(self, episodes: Episode, group: int) -> None:
        meta_train_step(self.model, self.optimizer, episodes, self.loop, parallel_tasks=group)

    def meta_gradient(self, episodes: Episode, group: int) -> list[torch.Tensor]:
        sgd = torch.optim.SGD(self.model.parameters(), lr=0.0)  # the step leaves the weights as they are
        meta_train_step(self.model, sgd, episodes, self.loop, parallel_tasks=group)
        return [p.grad.clone() for p in self.model.parameters()]


def omniglot_batch(cfg: Config, count: int) -> Episode:
    """`count` training episodes of the cell, built by fsl's pipeline (learn2learn task sampling, rotations)."""
    split = cell_split(cfg, "train")
    store = cell_store(cfg, split, "train", "eval")
    episodes = EpisodeDataset(split, cfg.train.ways, cfg.train.shots, cfg.train.queries, seed=0, count=count,
                              rotations=cfg.data.class_rotations)
    make = EpisodeMaker(store, cfg.train.ways, cfg.train.shots, cfg.train.queries, cfg.data.image_size,
                        torch.device("cpu"), normalisation=split.normalisation)
    return make(collate_specs([episodes[i] for i in range(count)]))


def relative_error(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    scale = max(g.abs().max().item() for g in ours)
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs)) / scale


def check_gradients(cfg: Config, batch: Episode) -> dict[str, float]:
    """Each contender's float64 meta-gradient of CHECK_TASKS tasks against fsl's task-by-task one."""
    torch.manual_seed(0)
    model, _ = build_learner(cfg)
    model = model.double()
    episodes = Episode(*(t[:CHECK_TASKS].double() if t.is_floating_point() else t[:CHECK_TASKS] for t in batch))
    loop = InnerLoop.training(cfg)
    fsl = Fsl(cfg, model, loop)
    reference = fsl.meta_gradient(episodes, 1)
    errors = {f"fsl, {group} at once": relative_error(reference, fsl.meta_gradient(episodes, group))
              for group in batching.candidate_groups(CHECK_TASKS)[1:]}
    for name, kind in PEERS.items():
        errors[name] = relative_error(reference, kind(name, plain_network(cfg, model), loop, cfg.train.meta_lr)
                                      .meta_gradient(episodes))
    return errors


def time_cell(cfg: Config, own: Config, batch: Episode, rounds: int) -> tuple[dict, str, dict]:
    """Median and best seconds per step of every contender over `rounds` alternating rounds; the group `auto`
    chose and why; the float64 check."""
    errors = check_gradients(cfg, batch)
    torch.manual_seed(0)
    model, _ = build_learner(cfg)
    loop = InnerLoop.training(cfg)
    fsl = Fsl(cfg, model, loop)
    auto, why = batching.resolve("auto", len(batch.query_y), torch.device("cpu"), probe_tasks(model, None, batch, cfg, torch.device("cpu")))
    steps: dict[str, Callable[[], None]] = {f"fsl, auto ({auto} at once)": lambda: fsl.step(batch, auto)}
    for group in batching.candidate_groups(len(batch.query_y)):
        steps[f"fsl, {group} at once"] = lambda group=group: fsl.step(batch, group)
    for name, kind in PEERS.items():
        if errors[name] <= TOLERANCE:
            peer = kind(name, plain_network(cfg, model), loop, cfg.train.meta_lr)
            steps[name] = lambda peer=peer: peer.step(batch)
    torch.manual_seed(0)
    own_model, _ = build_learner(own)
    own_fsl = Fsl(own, own_model, InnerLoop.training(own))
    own_auto, _ = batching.resolve("auto", len(batch.query_y), torch.device("cpu"),
                                   probe_tasks(own_model, None, batch, own, torch.device("cpu")))
    steps[f"fsl, the cell's loop (BatchNorm not adapted), auto ({own_auto})"] = lambda: own_fsl.step(batch, own_auto)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)
    return {name: (statistics.median(s), min(s)) for name, s in seconds.items()}, why, errors


def report(cell: str, cfg: Config, timings: dict, why: str, errors: dict, rounds: int) -> str:
    tasks_per_step = cfg.train.meta_batch
    l2l_median = timings["learn2learn"][0] if "learn2learn" in timings else float("nan")
    lines = [f"## {cell}: {cfg.train.ways}-way {cfg.train.shots}-shot, {cfg.maml.inner_steps} second-order "
             f"step(s), inner lr {cfg.maml.inner_lr}, meta-batch {tasks_per_step}", "",
             f"`auto`: {why}", "",
             "| contender | tasks/s (median) | tasks/s (best) | x learn2learn (median) |", "|---|---|---|---|"]
    for name, (median, best) in timings.items():
        lines.append(f"| {name} | {tasks_per_step / median:.1f} | {tasks_per_step / best:.1f} | "
                     f"{l2l_median / median:.2f} |")
    lines += ["", f"Meta-gradients of {CHECK_TASKS} tasks in float64, max |contender - fsl task by task| / "
              f"max |fsl| (timed only if <= {TOLERANCE:g}):", ""]
    lines += [f"- {name}: {error:.1e}{'' if error <= TOLERANCE else ' (differs: not timed)'}"
              for name, error in errors.items()]
    return "\n".join(lines) + f"\n\n({rounds} rounds, one outer step per contender per round)\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: as issue #29 measured)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "omniglot"))
    parser.add_argument("--cache-dir", default=str(ROOT / "data" / "cache"))
    parser.add_argument("--cells", nargs="*", default=list(CELLS))
    parser.add_argument("--out", default=None, help="default: benchmarks/results/omniglot-peers-cpu-x<cores>.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = [f"data.root={args.root}", f"data.cache_dir={args.cache_dir}", "device=cpu"]
    parts = [f"# fsl beside learn2learn, higher and torch.func on the Omniglot network (issue #29)\n\n"
             f"`python benchmarks/omniglot_peers.py --threads {args.threads} --rounds {args.rounds}`; machine: "
             f"{machine(torch.device('cpu'))}; learn2learn {l2l.__version__}, higher {version('higher')}.\n"
             f"Every parameter adapted (maml.adapt_bn=true), as in each peer's example; one meta-batch of real "
             f"Omniglot episodes; input building excluded for every contender.\n"]
    for cell in args.cells:
        config = ROOT / "experiments" / f"{cell}.yaml"
        cfg, own = load_config(config, settings + ["maml.adapt_bn=true"]), load_config(config, settings)
        batch = omniglot_batch(cfg, cfg.train.meta_batch)
        timings, why, errors = time_cell(cfg, own, batch, args.rounds)
        parts.append(report(cell, cfg, timings, why, errors, args.rounds))
        print(parts[-1], flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"omniglot-peers-cpu-x{os.cpu_count()}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
