"""Hyper-parameter sweep behind experiments/glyphs-conv4-*.yaml (issue #7); results in
benchmarks/results/glyphs-demo-sweep-h200.{jsonl,md}. One process per variant; run many at once on one GPU.

Uses fsl.models / fsl.maml exactly as `fsl train` does, but samples episodes with numpy from the generated glyphs
arrays (preprocessing as the eval transform: resize to size*96/84, centre crop, grey -> RGB, ImageNet mean/std),
so that it runs where learn2learn is not installed (the GPU machine it ran on had torch and higher only).
usage: python benchmarks/glyphs_demo_sweep.py NAME key=value ...
  keys: fo (first order 0/1) steps lr (inner) mb (meta-batch) mlr (meta lr) q (queries) width (conv4 channels)
        size (pixels) tasks budget_s (stop after this much training time) device data out seed test_at every
"""
import json
import os
import sys
import time
import types

try:  # fsl.data.episodes imports learn2learn's task pipeline, unused here; a GPU machine may lack learn2learn
    import learn2learn.vision.transforms  # noqa: F401
except ImportError:
    for name in ("learn2learn", "learn2learn.vision", "learn2learn.vision.transforms"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["learn2learn"].vision = sys.modules["learn2learn.vision"]
    sys.modules["learn2learn.vision"].transforms = sys.modules["learn2learn.vision.transforms"]
    sys.modules["learn2learn.vision.transforms"].RandomClassRotation = type("RandomClassRotation", (), {})
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fsl.data.episodes import Episode, collate_episodes
from fsl.data.transforms import MEAN_255, STD_255
from fsl.maml import InnerLoop, evaluate_episode, meta_train_step
from fsl.models import FewShotClassifier, conv4_features, init_weights

name, args = sys.argv[1], dict(a.split("=") for a in sys.argv[2:])
cfg = dict(fo=0, steps=1, lr=0.4, mb=4, mlr=0.002, q=5, width=64, size=28, tasks=12000, budget_s=1e9,
           device="cuda", data="data/glyphs", out=os.environ.get("OUT", "."), test_steps=3, seed=0, test_at=4000,
           every=1000)
cfg.update({k: type(cfg[k])(v) if not isinstance(cfg[k], float) else float(v) for k, v in args.items()})
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
device = torch.device(cfg["device"])
torch.manual_seed(cfg["seed"])

images = np.load(f"{cfg['data']}/images.npy")
labels = np.load(f"{cfg['data']}/labels.npy")
classes = pd.read_csv(f"{cfg['data']}/classes.csv")
x = torch.from_numpy(images).float()[:, None]                      # (N, 1, 32, 32), 0..255
if cfg["size"] != 28:
    resized = round(cfg["size"] * 96 / 84)
    x = F.interpolate(x, size=(resized, resized), mode="bilinear", antialias=True, align_corners=False)
crop = (x.shape[-1] - cfg["size"]) // 2
x = x[..., crop:crop + cfg["size"], crop:crop + cfg["size"]]
mean = torch.tensor(MEAN_255).view(1, 3, 1, 1)
std = torch.tensor(STD_255).view(1, 3, 1, 1)
x = ((x.expand(-1, 3, -1, -1) - mean) / std).contiguous().to(device)
by_split = {s: [np.flatnonzero(labels == c) for c in classes[classes.split == s]["class"]]
            for s in ("train", "val", "test")}


def episode(split: str, rng: np.random.Generator, shots: int, queries: int) -> Episode:
    pool = by_split[split]
    chosen = rng.choice(len(pool), 5, replace=False)
    sx, qx = [], []
    for c in chosen:
        idx = rng.choice(pool[c], shots + queries, replace=False)
        sx.append(idx[:shots])
        qx.append(idx[shots:])
    sy = torch.arange(5).repeat_interleave(shots).to(device)
    qy = torch.arange(5).repeat_interleave(queries).to(device)
    return Episode(x[np.concatenate(sx)], sy, x[np.concatenate(qx)], qy)


def meta_test(model, split, n, steps, seed):
    rng = np.random.default_rng(seed)
    loop = InnerLoop(steps, cfg["lr"], True)
    acc = np.array([evaluate_episode(model, episode(split, rng, 1, 15), loop) for _ in range(n)])
    return round(float(acc.mean()), 2), round(float(1.96 * acc.std(ddof=1) / np.sqrt(n)), 2)


features = conv4_features(cfg["width"])
with torch.no_grad():
    dim = features(torch.zeros(2, 3, cfg["size"], cfg["size"])).flatten(1).shape[1]
model = FewShotClassifier(features, dim, 5)
init_weights(model)
model.to(device)
opt = torch.optim.Adam(model.parameters(), lr=cfg["mlr"])
rng = np.random.default_rng(cfg["seed"] + 1)
log = open(f"{cfg['out']}/sweep.jsonl", "a")
start, done, train_time = time.time(), 0, 0.0
while done < cfg["tasks"] and train_time < cfg["budget_s"]:
    t0 = time.time()
    batch = [episode("train", rng, 1, cfg["q"]) for _ in range(cfg["mb"])]
    loop = InnerLoop(cfg["steps"], cfg["lr"], bool(cfg["fo"]))
    loss, acc = (meta_train_step(model, opt, collate_episodes(batch), loop)[:2] / cfg["mb"]).tolist()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_time += time.time() - t0
    done += cfg["mb"]
    last = done >= cfg["tasks"] or train_time >= cfg["budget_s"]
    if done % cfg["every"] == 0 or last:
        row = dict(name=name, tasks=done, train_s=round(train_time, 1), tasks_per_s=round(done / train_time, 2),
                   train_acc=round(acc, 1))
        if done % cfg["test_at"] == 0 or last:
            row["val10"] = meta_test(model, "val", 100, 10, 1)
            row["test10"] = meta_test(model, "test", 300, 10, 2)
            row["test20"] = meta_test(model, "test", 300, 20, 2)
        print(json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()
