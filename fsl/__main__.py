"""Command line: `fsl {train,test,adapt,data,tables,demo,sweep,slurm,done} ...` (or `python -m fsl ...`). Only
parses arguments and calls run()s."""
from __future__ import annotations

import argparse
import json
import sys

from fsl.config import ConfigError, load_config
from fsl.data.base import DatasetError


def build_parser() -> argparse.ArgumentParser:
    """The `fsl` command line: one subcommand per job."""
    parser = argparse.ArgumentParser(prog="fsl", description="MAML few-shot classification suite (also: python -m fsl)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="meta-train a cell (resumes from latest.pth)")
    train.add_argument("config", help="experiments/<cell>.yaml")
    train.add_argument("overrides", nargs="*", help="key=value, e.g. train.tasks=1000 device=cpu")

    test = commands.add_parser("test", help="meta-test a checkpoint on the fixed test episodes")
    test.add_argument("config")
    test.add_argument("checkpoint", nargs="?", help="default: <work_dir>/<run>/best_accuracy_mean.pth (latest.pth "
                                                    "with test.weights=final)")
    test.add_argument("overrides", nargs="*")

    data = commands.add_parser("data", help="prepare (download), check or cache (decode once) a dataset")
    data.add_argument("action", choices=["prepare", "check", "cache"])
    data.add_argument("dataset", choices=["cub", "mini-imagenet", "tiered-imagenet", "omniglot", "glyphs", "folder"],
                      help="folder: your own images (class folders per split, or images/ + split CSVs)")
    data.add_argument("--root", help="dataset folder (default: data/<dataset>)")
    data.add_argument("--json", action="store_true", help="check: print one JSON object of counts per split")
    data.add_argument("--no-decode", action="store_true", help="check: skip decoding every image (the files' "
                                                                  "structure is still checked)")
    data.add_argument("--config", help="check: the cell whose episodes the classes must fill (its shots + queries, "
                                       "train and test; and its data.root)")
    data.add_argument("--shots", type=int, help="check: support images per class an episode takes")
    data.add_argument("--queries", type=int, help="check: query images per class an episode takes")
    data.add_argument("--image-size", type=int, default=84, help="cache: the cell's data.image_size")
    data.add_argument("--cache-dir", default="data/cache", help="cache: where the stores go (data.cache_dir)")
    data.add_argument("--no-augment", action="store_true", help="cache: for data.train_augment=false")

    tables = commands.add_parser("tables", help="results tables and plots from results/*.csv")
    tables.add_argument("--results", default="results")

    adapt = commands.add_parser("adapt", help="adapt a trained checkpoint to your own classes, label new images")
    adapt.add_argument("checkpoint", help="a trained run's best_accuracy_mean.pth")
    adapt.add_argument("support", help="SUPPORT_DIR/<class>/<image>: a few labelled images per class")
    adapt.add_argument("queries", nargs="+", help="images to label: files, or folders (searched recursively)")
    adapt.add_argument("--out", help="write the predictions CSV here (file, predicted, p_<class>...)")
    adapt.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:N]")
    demo = commands.add_parser("demo", help="train, test and tabulate the glyphs 5-way 1-shot cell")
    demo.add_argument("overrides", nargs="*")

    sweep = commands.add_parser("sweep", help="run the cells that are not done concurrently, one per GPU group")
    sweep.add_argument("items", nargs="*", help="configs (default: the 12 paper cells) and key=value overrides")
    sweep.add_argument("--gpus-per-cell", type=int, default=1)
    sweep.add_argument("--devices", help="comma-separated GPU ids (default: the visible ones) or cpu,cpu,...")

    slurm = commands.add_parser("slurm", help="write (and --submit) a Slurm job array of the runs that are not done")
    slurm.add_argument("items", nargs="*", help="configs (default: the 12 paper cells) and key=value overrides")
    slurm.add_argument("--time", default="24:00:00", help="time limit per array task (Slurm format)")
    slurm.add_argument("--gpus", type=int, default=1, help="GPUs per array task (>1: torchrun)")
    slurm.add_argument("--cpus", type=int, default=8, help="CPU cores per array task (episode workers)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--submit", action="store_true", help="run sbatch on the script")

    done = commands.add_parser("done", help="exit 0 if summary.csv holds this run's comparable result for this config")
    done.add_argument("config")
    done.add_argument("overrides", nargs="*")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors that carry their fix are printed without a traceback (exit 2: bad input, a config,
    dataset, results file or checkpoint; 1: the run failed; 130: stopped by a signal, after writing latest.pth).
    `fsl done` exits 0 (done), 1 (not done) or 2 (an error)."""
    args = build_parser().parse_args(argv)
    from fsl import distributed
    where = f" (process {distributed.rank_from_env()} of a torchrun job)" if distributed.launched_by_torchrun() else ""
    from fsl.results import ResultsError
    try:
        return run_command(args)
    except (ConfigError, DatasetError, ResultsError, FileNotFoundError, ValueError) as error:
        print(f"error{where}: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # TrainingError, ResultsError and device errors carry their own fix
        print(f"error{where}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        print(f"\n{error or 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


def split_checkpoint(args: argparse.Namespace) -> None:
    """`test CONFIG key=value` (no checkpoint) parses the first override as the checkpoint: move it back."""
    if args.checkpoint and "=" in args.checkpoint:
        args.overrides.insert(0, args.checkpoint)
        args.checkpoint = None


def run_command(args: argparse.Namespace) -> int:
    if args.command == "train":
        from fsl import train
        train.run(load_config(args.config, args.overrides))
    elif args.command == "test":
        from fsl import episodes, evaluate
        split_checkpoint(args)
        cfg = load_config(args.config, args.overrides)
        episodes.check_test_episodes(cfg)  # a split too small for the episodes, before looking for a checkpoint
        evaluate.run(cfg, args.checkpoint or default_checkpoint(args, cfg), args.config)
    elif args.command == "data":
        return data_command(args)
    elif args.command == "tables":
        from fsl import report
        report.run(args.results)
    elif args.command == "adapt":
        from fsl import adapt
        adapt.run(args.checkpoint, args.support, args.queries, args.out, args.device)
    elif args.command == "demo":
        from fsl import demo
        demo.run(args.overrides)
    elif args.command in ("sweep", "slurm"):
        configs = [item for item in args.items if "=" not in item] or paper_cells()
        overrides = [item for item in args.items if "=" in item]
        if args.command == "sweep":
            from fsl import sweep
            devices = args.devices.split(",") if args.devices else None
            return 1 if sweep.run(configs, overrides, devices, args.gpus_per_cell) else 0
        from fsl import slurm
        slurm.run(configs, overrides, args.time, args.gpus, args.cpus, args.partition, args.account, args.submit)
    elif args.command == "done":
        from fsl.provenance import is_done
        return 0 if is_done(load_config(args.config, args.overrides), args.config) else 1
    return 0


def default_checkpoint(args: argparse.Namespace, cfg):
    """The checkpoint `fsl test` takes when none is named: the run's (fsl.checkpoint.tested_checkpoint). A test
    with other ways or shots than the run's (a 1-shot run tested 5-shot) names another cell: its run is then the
    one of the config file's own ways and shots, if that one exists."""
    from fsl.checkpoint import tested_checkpoint
    path = tested_checkpoint(cfg)
    episode_keys = ("test.ways", "test.shots")
    if not path.exists() and any(o.split("=", 1)[0].strip() in episode_keys for o in args.overrides):
        own = load_config(args.config, [o for o in args.overrides if o.split("=", 1)[0].strip() not in episode_keys])
        path = tested_checkpoint(own) if tested_checkpoint(own).exists() else path
    return path


def paper_cells() -> list[str]:
    """The 12 reference cells' configs, from the checkout's experiments/ folder."""
    from fsl.provenance import REPO
    from fsl.reference import REFERENCE
    return [str(REPO / "experiments" / f"{d}-{a}-{k}shot.yaml") for d, a, k in REFERENCE]


def data_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    cfg = load_config(args.config) if args.config else None
    if cfg is not None and cfg.data.dataset != args.dataset:
        raise ConfigError(f"{args.config} is a {cfg.data.dataset} cell, not {args.dataset}; fix: `fsl data "
                          f"{args.action} {cfg.data.dataset} --config {args.config}`")
    root = Path(args.root or (cfg.data_root if cfg is not None else Path("data") / args.dataset))
    if args.action == "cache":
        return cache_command(args, root)
    if args.action == "prepare":
        from fsl.data.prepare import prepare
        prepare(args.dataset, root)
    from fsl.data.check import check_dataset, summarise
    if args.dataset == "folder" and not args.json:
        from fsl.data.folder import detect_layout
        try:
            print(f"{root}: layout {detect_layout(root)}")
        except DatasetError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    counts, problems = check_dataset(args.dataset, root, decode=not args.no_decode, progress=not args.json,
                                     min_images=episode_sizes(args, cfg))
    for problem in summarise(problems):
        print(f"error: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps(counts))
    else:
        for split, count in counts.items():
            extra = "".join(f", {n:,} {kind}" for kind, n in count.items() if kind not in ("classes", "images"))
            print(f"{args.dataset} {split:5s}: {count['classes']:5,d} classes {count['images']:7,d} images{extra}")
        splits = [split for split in counts if split != "all"]
        if splits:
            sizes = " / ".join(f"{counts[split]['classes']:,}" for split in splits)
            print(f"{args.dataset} split of the classes ({' / '.join(splits)}): {sizes}")
        print(f"{root}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def episode_sizes(args: argparse.Namespace, cfg) -> dict[str, int] | None:
    """Images per class the episodes take, by split: --shots/--queries for every split, else the --config cell's
    (train: train.shots + train.queries; val and test: test.shots + test.queries), else the reader's default."""
    if args.shots is not None or args.queries is not None:
        if args.shots is None or args.queries is None or args.shots < 1 or args.queries < 1:
            raise ConfigError("--shots and --queries go together, each >= 1 (e.g. --shots 1 --queries 15)")
        return dict.fromkeys(("train", "val", "test"), args.shots + args.queries)
    if cfg is None:
        return None
    test = cfg.test.shots + cfg.test.queries
    return {"train": cfg.train.shots + cfg.train.queries, "val": test, "test": test}


def cache_command(args: argparse.Namespace, root) -> int:
    from fsl.data import READERS, SPLITS, load_split
    from fsl.data.store import open_store
    for split in SPLITS:  # greyscale datasets are never augmented (fsl.config.validate)
        augmented = split == "train" and not args.no_augment and READERS[args.dataset].channels == 3
        kind = "train" if augmented else "eval"
        store = open_store(load_split(args.dataset, root, split), args.dataset, split, kind, args.image_size,
                           args.cache_dir)
        print(f"{args.dataset} {split:5s} {kind:5s}: {len(store):7d} images {store.pixels.shape[1]}x"
              f"{store.pixels.shape[2]}, {store.path.stat().st_size / 2**20:8.1f} MB  {store.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
