"""Are two runs of one cell the same, bit for bit? (the check behind "a refactor, not a change of behaviour")

    python benchmarks/compare_runs.py A B [--cell glyphs-conv4-1shot] [--out FILE]

A and B are two checkouts (or any folders holding work_dirs/<cell> and results/<cell>) that ran the same command,
e.g. `make demo` at two commits. Compares, exactly: the model weights, learned rates and Adam state of latest.pth
and best_accuracy_mean.pth, their counters, every loss/accuracy/ci95 of log.csv, the per-episode test CSVs, and the
numbers of the cell's summary row. Timings and commits are printed, not compared.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

COUNTERS = ("tasks_done", "best_val_mean", "best_val_tasks", "window", "parallel_tasks", "parallel_episodes")
ROW_NUMBERS = ("mean_acc", "ci95", "episodes", "train_tasks", "best_val_tasks", "train_config_sha", "test_config_sha")


def tensors_equal(a, b) -> bool:
    """Exact equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def checks(a: Path, b: Path, cell: str) -> list[tuple[str, bool]]:
    results = []
    for name in ("latest.pth", "best_accuracy_mean.pth"):
        ca, cb = (torch.load(root / "work_dirs" / cell / name, map_location="cpu", weights_only=False)
                  for root in (a, b))
        for part in ("model", "rates", "optimizer"):
            results.append((f"{name} {part}", tensors_equal(ca[part], cb[part])))
        results.append((f"{name} counters {', '.join(COUNTERS)}", all(ca.get(k) == cb.get(k) for k in COUNTERS)))
    logs = [[(r["tasks"], r["split"], r["loss"], r["accuracy"], r["ci95"]) for r in
             csv.DictReader(open(root / "work_dirs" / cell / "log.csv"))] for root in (a, b)]
    results.append((f"log.csv loss, accuracy, ci95 ({len(logs[0])} rows)", logs[0] == logs[1]))
    for stem in ("test_episodes", "untrained_test_episodes"):
        files = [root / "results" / cell / f"{stem}.csv" for root in (a, b)]
        if all(f.exists() for f in files):
            results.append((f"results/{cell}/{stem}.csv", files[0].read_bytes() == files[1].read_bytes()))
    rows = [next(r for r in csv.DictReader(open(root / "results/summary.csv"))
                 if r["run"] == cell and not r["test_tag"] and not r.get("train_tag")) for root in (a, b)]
    results.append((f"summary row {', '.join(ROW_NUMBERS)}", all(rows[0][k] == rows[1][k] for k in ROW_NUMBERS)))
    for key in ("mean_acc", "ci95", "tasks_per_s", "commit"):
        print(f"  {key}: {rows[0][key]} | {rows[1][key]}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--cell", default="glyphs-conv4-1shot")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()
    print(f"{args.cell}: {args.a} | {args.b}")
    results = checks(args.a, args.b, args.cell)
    lines = [f"- {'equal' if same else 'DIFFERENT'}: {what}" for what, same in results]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0 if all(same for _, same in results) else 1


if __name__ == "__main__":
    sys.exit(main())
