"""Command line: `fsl {train,test,adapt,data,tables,compare,demo,sweep,slurm,tune,done} ...` (or `python -m fsl ...`). It only
parses the arguments and calls each job's run(): fsl.train.meta_train, fsl.train.meta_test, fsl.jobs.*,
fsl.results.report."""
from __future__ import annotations

import argparse
import sys

from fsl.config import DATASETS, ConfigError, load_config
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
    add_data_command(commands)
    tables = commands.add_parser("tables", help="results tables and plots from results/*.csv")
    tables.add_argument("--results", default="results")
    adapt = commands.add_parser("adapt", help="adapt a trained checkpoint to your own classes, label new images")
    adapt.add_argument("checkpoint", help="a trained run's best_accuracy_mean.pth")
    adapt.add_argument("support", help="SUPPORT_DIR/<class>/<image>: a few labelled images per class")
    adapt.add_argument("queries", nargs="+", help="images to label: files, or folders (searched recursively)")
    adapt.add_argument("--out", help="write the predictions CSV here (file, predicted, p_<class>...)")
    adapt.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:N]")
    adapt.add_argument("--batch-norm", default="each", choices=("each", "together"),
                       help="each (default): every query classified in a batch of the support images and itself, "
                            "independent of the other queries; together: the queries normalised by each other's "
                            "statistics, as MAML's meta-test does (fsl/jobs/adapt.py)")
    demo = commands.add_parser("demo", help="train, test and tabulate the glyphs 5-way 1-shot cell")
    demo.add_argument("overrides", nargs="*")
    add_cluster_commands(commands)
    compare = commands.add_parser("compare", help="paired per-episode difference of two runs tested on the same "
                                                  "episodes")
    compare.add_argument("run_a", help="a run name of results/summary.csv, e.g. glyphs-conv4-1shot-anil")
    compare.add_argument("run_b")
    compare.add_argument("--results", default="results")
    add_tune_command(commands)
    done = commands.add_parser("done", help="exit 0 if summary.csv holds this run's comparable result for this config")
    done.add_argument("config")
    done.add_argument("overrides", nargs="*")
    return parser


def add_data_command(commands) -> None:
    data = commands.add_parser("data", help="prepare (download), check or cache (decode once) a dataset")
    data.add_argument("action", choices=["prepare", "check", "cache"])
    data.add_argument("dataset", choices=DATASETS,
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


def add_tune_command(commands) -> None:
    tune = commands.add_parser("tune", help="search a cell's settings with Optuna on validation only (docs/tuning.md)")
    tune.add_argument("config", help="experiments/<cell>.yaml (its tune: section is the search space)")
    tune.add_argument("overrides", nargs="*", help="key=value, for every trial")
    tune.add_argument("--trials", type=int, default=30, help="finished (complete or pruned) trials to reach")
    tune.add_argument("--budget", type=int, help="training tasks a trial (default: the cell's train.tasks)")
    tune.add_argument("--reports", type=int, default=4, help="validations a trial reports to the pruner")
    tune.add_argument("--study", help="the study's name (default: the run name); its folder: <work_dir>/tune/<name>")
    tune.add_argument("--storage", help="sqlite (default: one process), journal (several on one machine) or a URL "
                                        "(postgresql://...: several machines)")
    tune.add_argument("--jobs", type=int, default=1, help="worker processes on this machine (journal storage)")
    tune.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed")
    tune.add_argument("--best", action="store_true", help="then train and test the best settings at the cell's "
                                                          "full budget, and compare them with the cell's own row")


def add_cluster_commands(commands) -> None:
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


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors that carry their fix are printed without a traceback (exit 2: bad input, a config,
    dataset, results file or checkpoint; 1: the run failed; 130: stopped by a signal, after writing latest.pth).
    `fsl done` exits 0 (done), 1 (not done) or 2 (an error)."""
    args = build_parser().parse_args(argv)
    from fsl.device import distributed
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
        from fsl.train import meta_train as train
        train.run(load_config(args.config, args.overrides))
    elif args.command == "test":
        from fsl.train import meta_test
        split_checkpoint(args)
        meta_test.run_command(args.config, args.checkpoint, args.overrides)
    elif args.command == "data":
        from fsl.jobs import data
        return data.run(args)
    elif args.command == "tables":
        from fsl.results import report
        report.run(args.results)
    elif args.command == "adapt":
        from fsl.jobs import adapt
        adapt.run(args.checkpoint, args.support, args.queries, args.out, args.device, args.batch_norm)
    elif args.command == "demo":
        from fsl.jobs import demo
        demo.run(args.overrides)
    elif args.command in ("sweep", "slurm"):
        from fsl.jobs import slurm, sweep
        configs = [item for item in args.items if "=" not in item] or sweep.paper_cells()
        overrides = [item for item in args.items if "=" in item]
        if args.command == "sweep":
            devices = args.devices.split(",") if args.devices else None
            return 1 if sweep.run(configs, overrides, devices, args.gpus_per_cell) else 0
        slurm.run(configs, overrides, args.time, args.gpus, args.cpus, args.partition, args.account, args.submit)
    elif args.command == "compare":
        from fsl.results import compare
        compare.run(args.results, args.run_a, args.run_b)
    elif args.command == "tune":
        from fsl.jobs import tune
        tune.run(args.config, args.overrides, args.trials, args.budget, args.reports, args.study, args.storage,
                 args.jobs, args.seed, args.best)
    elif args.command == "done":
        from fsl.results import is_done
        return 0 if is_done(load_config(args.config, args.overrides), args.config) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
