"""Every CUDA-only line of fsl, and whether the CUDA rehearsal executes it (issue #47): benchmarks/results/cuda-rehearsal.md.

The rehearsal (fsl.device.rehearsal) runs fsl's own commands with `device=cuda` on this CPU, torch's public API intact
and only its driver faked: `fsl train` (producer thread on a side stream, the memory probe, pinned copies), `fsl test`
and `fsl adapt`, in each precision, with deterministic kernels and cuDNN's autotuner, out of memory in training and
in validation (the faked GPU's memory is small enough), a checkpoint resumed where fewer GPUs are visible, and GPUs
that cannot run a precision. A line tracer records which of fsl/'s CUDA-only lines ran, in every thread.

What counts as CUDA-only (`cuda_only_lines`, read from the source, so a new line is found without being listed):
- the branch that runs on CUDA of an `if` whose test mentions cuda (`device.type == "cuda"`: its body; `!= "cuda"`
  or `not ...`: its else, or the statements after it when the body leaves the block), or whose line says
  `# cuda-only` (e.g. `if self.side is not None:  # cuda-only`);
- a statement that calls `torch.cuda.*`, or a stream's or pinned tensor's method (`record_stream`, `wait_event`,
  `record_event`, `pin_memory`).

`python benchmarks/cuda_rehearsal.py` writes the report; `--check` also exits 1 if a CUDA-only line was not executed
and has no reason in NOT_REHEARSED (tests/test_cuda_rehearsal.py runs it so in CI).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import CodeType

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
FSL = REPO / "fsl"
SKIP = {FSL / "device" / "rehearsal.py", FSL / "device" / "memory_count.py"}  # the rehearsal itself
CALLS = ("record_stream", "wait_event", "record_event", "pin_memory")

# CUDA-only code the rehearsal does not run, by the text of its line (stable when lines move), with the reason
NOT_REHEARSED = {
    'raise ConfigError(f"{setting(name)} but torch sees no CUDA GPU; use {setting(\'cpu\')} or {setting(\'auto\')}")':
        "the error for device=cuda on a machine without a GPU: tests/test_cuda_rehearsal.py runs it outside the "
        "rehearsal",
    'raise ConfigError(f"{setting(name)} but torch sees {torch.cuda.device_count()} CUDA GPU(s) (indices 0.."':
        "the refusal of a GPU index past the GPUs there are: tests/test_cuda_rehearsal.py runs it in a rehearsal",
    'local_rank = int(os.environ.get("LOCAL_RANK", "0"))':
        "torchrun's device binding: the rehearsal runs one process; NCCL's process group needs real GPUs "
        "(tests/test_gpu.py's 2-GPU test on a GPU machine)",
    "if local_rank >= torch.cuda.device_count():": "torchrun's device binding, as above",
    'raise RuntimeError(f"process with LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} "':
        "torchrun with more processes than GPUs: the rehearsal runs one process (NCCL needs a GPU per process)",
    'device = torch.device("cuda", local_rank)':
        "torchrun's device binding: the rehearsal runs one process; NCCL's process group needs real GPUs "
        "(tests/test_gpu.py's 2-GPU test on a GPU machine)",
    "torch.cuda.set_device(device)": "torchrun's device binding, as above",
}


def cuda_only_lines(path: Path) -> dict[int, str]:
    """{line number: source line} of the CUDA-only statements of one file (module docstring)."""
    source = path.read_text()
    lines = source.splitlines()
    encoded = [line.encode() for line in lines]
    found: dict[int, str] = {}

    def mark(statements: list[ast.stmt]) -> None:
        for statement in statements:
            for node in ast.walk(statement):
                if isinstance(node, ast.stmt) and not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    found[node.lineno] = lines[node.lineno - 1].strip()

    def text(node: ast.expr) -> str:
        """The node's source: ast.get_source_segment, without splitting the whole file again for each node (that
        took 10 s a run); the columns are UTF-8 byte offsets."""
        first, last = (encoded[i - 1] for i in (node.lineno, node.end_lineno))
        if node.lineno == node.end_lineno:
            return first[node.col_offset:node.end_col_offset].decode()
        middle = encoded[node.lineno:node.end_lineno - 1]
        return b"\n".join([first[node.col_offset:], *middle, last[:node.end_col_offset]]).decode()

    def mentions_cuda(test: ast.expr) -> bool:
        return "cuda" in text(test)

    def negated(test: ast.expr) -> bool:
        """`not <cuda test>` or `... != "cuda"`: the CUDA branch is the other one."""
        return (isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and mentions_cuda(test)) or (
            isinstance(test, ast.Compare) and isinstance(test.ops[0], ast.NotEq) and mentions_cuda(test))

    def leaves(statements: list[ast.stmt]) -> bool:
        return bool(statements) and isinstance(statements[-1], (ast.Return, ast.Raise, ast.Continue, ast.Break))

    def visit_block(statements: list[ast.stmt]) -> None:
        for index, statement in enumerate(statements):
            if isinstance(statement, ast.If) and (mentions_cuda(statement.test)
                                                  or "# cuda-only" in lines[statement.lineno - 1]):
                if not negated(statement.test):
                    mark(statement.body)
                elif statement.orelse:
                    mark(statement.orelse)
                elif leaves(statement.body):
                    mark(statements[index + 1:])
            for node in ast.walk(statement) if not isinstance(statement, (ast.FunctionDef, ast.ClassDef)) else ():
                if isinstance(node, ast.Call) and calls_cuda(node) and isinstance(statement, ast.stmt) \
                        and not isinstance(statement, (ast.If, ast.For, ast.While, ast.With, ast.Try)):
                    found[statement.lineno] = lines[statement.lineno - 1].strip()
            for field in ("body", "orelse", "finalbody", "handlers"):
                block = getattr(statement, field, None)
                if isinstance(block, list) and block and isinstance(block[0], (ast.stmt, ast.ExceptHandler)):
                    visit_block([s for s in block if isinstance(s, ast.stmt)]
                                + [s for h in block if isinstance(h, ast.ExceptHandler) for s in h.body])

    def calls_cuda(call: ast.Call) -> bool:
        return text(call.func).startswith("torch.cuda.") or (isinstance(call.func, ast.Attribute) and call.func.attr in CALLS)

    visit_block(ast.parse(source).body)
    return found


def all_cuda_only_lines() -> dict[Path, dict[int, str]]:
    return {path: lines for path in sorted(FSL.rglob("*.py")) if path not in SKIP
            for lines in [cuda_only_lines(path)] if lines}


class LineTracer:
    """sys.settrace line coverage of fsl/'s CUDA-only lines (`lines`: file -> line numbers), in every thread it is
    installed in. Only the code objects that hold one of those lines are traced line by line; every other function
    (the store's decoding, the model, the inner loop) runs untraced, at full speed."""

    def __init__(self, lines: dict[Path, dict[int, str]]) -> None:
        self.wanted = {str(path): set(numbers) for path, numbers in lines.items()}
        self.traced: dict[CodeType, bool] = {}  # code object -> whether it holds a wanted line
        self.executed: set[tuple[str, int]] = set()

    def __call__(self, frame, event, arg):
        code = frame.f_code
        traced = self.traced.get(code)
        if traced is None:
            wanted = self.wanted.get(code.co_filename, ())
            traced = self.traced[code] = any(line in wanted for _, _, line in code.co_lines())
        return self.line if traced else None

    def line(self, frame, event, arg):
        if event == "line":
            self.executed.add((frame.f_code.co_filename, frame.f_lineno))
        return self.line


def scenarios(root: Path, data: Path, omniglot: Path | None) -> list[tuple[str, list[str], dict]]:
    """(name, fsl command line, rehearsal settings): the commands a user's GPU runs would take."""
    cell = str(REPO / "experiments/mini-imagenet-conv4-1shot.yaml")
    tiny = [f"data.root={data}", "data.mini_imagenet_images=84x84", "data.image_size=28", "data.workers=0",
            f"data.cache_dir={root / 'cache'}", "device=cuda", "train.meta_batch=2", "train.queries=2",
            "train.val_episodes=3", "train.log_every=2", "test.episodes=4", "train.tensorboard=false",
            f"results_dir={root / 'results'}"]
    runs = [
        ("train, auto groups, producer thread", ["train", cell, *tiny, f"work_dir={root / 'a'}", "train.tasks=8"], {}),
        ("test of that run", ["test", cell, *tiny, f"work_dir={root / 'a'}", "train.tasks=8"], {}),
        ("train, 84x84 sources sent whole (data.image_size=42: taps of 84 x 84)",
         ["train", cell, *[a for a in tiny if not a.startswith("data.image_size=")], f"work_dir={root / 'h'}",
          "train.tasks=4", "data.image_size=42"], {}),
        ("train tf32 with cuDNN's autotuner", ["train", cell, *tiny, f"work_dir={root / 'b'}", "train.tasks=4",
                                                    "precision=tf32", "cudnn_benchmark=true"], {}),
        ("train, deterministic", ["train", cell, *tiny, f"work_dir={root / 'c'}", "train.tasks=4",
                                  "deterministic=true"], {}),
        ("train, out of memory at 2 tasks and 2 episodes at once",
         ["train", cell, *tiny, f"work_dir={root / 'd'}", "train.tasks=4", "train.parallel_tasks=2",
          "test.parallel_episodes=2"], {"total_memory": 150 * 2**20}),
        ("train on the second of 2 GPUs (device=cuda:1)", ["train", cell, *tiny, f"work_dir={root / 'f'}",
                                                           "train.tasks=4", "device=cuda:1"], {"devices": 2}),
        ("resume on 1 GPU that run, written where 2 were visible",
         ["train", cell, *tiny, f"work_dir={root / 'f'}", "train.tasks=8"], {"devices": 1}),
        ("train where not even one task fits", ["train", cell, *tiny, f"work_dir={root / 'g'}", "train.tasks=4"],
         {"total_memory": 8 * 2**20, "exit": 1}),
    ]
    if omniglot is not None:
        runs.append(("train bf16, an Omniglot cell (no BatchNorm scale)",
                     ["train", str(REPO / "experiments/omniglot-conv4-1shot.yaml"), f"data.root={omniglot}",
                      "data.workers=0", f"data.cache_dir={root / 'cache'}", "device=cuda", "precision=bf16",
                      "train.meta_batch=2", "train.tasks=4", "train.val_episodes=2", "test.episodes=2",
                      "train.tensorboard=false", f"work_dir={root / 'e'}", f"results_dir={root / 'results'}"], {}))
    return runs


def support_folder(root: Path, data: Path) -> Path:
    """Five classes of one image each from the mini-ImageNet fixture's test split, for `fsl adapt`."""
    from fsl.data import load_split
    dataset = load_split("mini-imagenet", data, "test", images="84x84")
    folder = root / "support"
    for label in range(5):
        index = dataset.labels.index(label)
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{label}" / "a.jpg").write_bytes(Path(dataset.paths[index]).read_bytes())
    return folder


def rehearse(root: Path, data: Path, omniglot: Path | None, tracer: LineTracer) -> list[dict]:
    """Run every scenario in a rehearsal under `tracer`; one result row each."""
    from fsl.__main__ import main as fsl_main
    from fsl.data.episodes import EpisodeMaker
    from fsl.data.store import from_images
    from fsl.device.precision import check_precision, honoured_precisions
    from fsl.device.rehearsal import FakeGPU, rehearsal
    from fsl.jobs import sweep

    rows = []
    runs = scenarios(root, data, omniglot)
    support = support_folder(root, data)
    best = root / "a" / "mini-imagenet-conv4-1shot" / "best_accuracy_mean.pth"
    runs.insert(2, ("adapt, device auto", ["adapt", str(best), str(support), str(support), "--device", "auto"], {}))
    for name, argv, settings in runs:
        gpu = FakeGPU(total_memory=settings.get("total_memory", FakeGPU.total_memory))
        start, output = time.perf_counter(), io.StringIO()
        sys.settrace(tracer)
        try:
            with rehearsal(settings.get("devices", 1), gpu, trace=tracer) as driver, \
                    contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                code = fsl_main(argv)
        finally:
            sys.settrace(None)
        log = output.getvalue()
        expected = settings.get("exit", 0)
        rows.append({"scenario": name, "command": "fsl " + argv[0] + " " + Path(argv[1]).name, "exit": code,
                     "expected_exit": expected,
                     "driver_calls": len(driver.calls), "seconds": time.perf_counter() - start,
                     "note": next((line for line in log.splitlines() if "out of memory" in line), "")})
        if code != expected:
            print(log[-3000:], file=sys.stderr)
    sys.settrace(tracer)
    try:  # what no command reaches on a capable GPU: a GPU that cannot run a precision; the GPUs a sweep sees
        warnings.filterwarnings("ignore", message="Found GPU0 Tesla V100")  # torch's note on an old GPU
        for major in (7, 9):
            with rehearsal(2, FakeGPU(name="Tesla V100" if major == 7 else FakeGPU.name, major=major)):
                for precision in ("tf32", "bf16"):
                    with contextlib.suppress(Exception):
                        check_precision(precision, torch.device("cuda", 0))
                honoured_precisions(torch.device("cuda", 1))
                # a maker given 'cuda' without an index (benchmarks, a user's script) takes the current GPU's
                made = EpisodeMaker(from_images([np.zeros((4, 4, 3), np.uint8)]), 1, 1, 1, 2, torch.device("cuda"))
                assert made.device == torch.device("cuda", 0), made.device
                saved = os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                try:
                    gpus = sweep.visible_gpus()
                finally:
                    if saved is not None:
                        os.environ["CUDA_VISIBLE_DEVICES"] = saved
        rows.append({"scenario": "precision refusals on a 7.x GPU; the GPUs fsl sweep sees", "command": "(calls)",
                     "exit": 0 if gpus == ["0", "1"] else 1, "expected_exit": 0, "driver_calls": 0, "seconds": 0.0, "note": ""})
    finally:
        sys.settrace(None)
    return rows


def report(rows: list[dict], tracer: LineTracer, seconds: float,
           cuda_lines: dict[Path, dict[int, str]]) -> tuple[str, list[str]]:
    """The markdown report and the unexecuted lines that have no reason."""
    lines = ["# The CUDA rehearsal: fsl's CUDA-only lines, executed on a CPU", "",
             "`python benchmarks/cuda_rehearsal.py` (module docstring: what counts as CUDA-only, how it runs), "
             f"{seconds:.0f} s on {os.cpu_count()} CPU cores. Each command is fsl's own, with `device=cuda`, in "
             "fsl.device.rehearsal: torch's public API intact, its driver entry points faked, tensors on the CPU.", "",
             "| scenario | command | exit (expected) | faked driver calls | s | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['scenario']} | `{r['command']}` | {r['exit']} ({r['expected_exit']}) | {r['driver_calls']} | "
              f"{r['seconds']:.1f} | "
              f"{r['note'][:120]} |" for r in rows]
    table, missing, total, executed = [], [], 0, 0
    for path, found in cuda_lines.items():
        for number, text in sorted(found.items()):
            ran = (str(path), number) in tracer.executed
            reason = "" if ran else NOT_REHEARSED.get(text, "")
            total += 1
            executed += ran
            if not ran and not reason:
                missing.append(f"{path.relative_to(REPO)}:{number}: {text}")
            table.append(f"| {path.relative_to(REPO)}:{number} | `{text[:90].replace('|', '¦')}` | "
                         f"{'yes' if ran else 'no'} | {reason or ('' if ran else '**no reason: fails CI**')} |")
    lines += ["", f"**{executed} of {total} CUDA-only lines executed**; {total - executed - len(missing)} not, each "
              f"with its reason; {len(missing)} not executed without a reason.", "",
              "| line | code | executed | why not |", "|---|---|---|---|", *table]
    return "\n".join(lines) + "\n", missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared/data/mini-imagenet-lite"))
    parser.add_argument("--omniglot-root", default=str(REPO.parent / "shared/data/omniglot"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/cuda-rehearsal.md"))
    parser.add_argument("--check", action="store_true", help="exit 1 if a CUDA-only line ran without a reason")
    args = parser.parse_args()
    data, omniglot = Path(args.data_root), Path(args.omniglot_root)
    if not data.exists():
        print(f"cuda_rehearsal: --data-root {data} not found; fix: the mini-ImageNet fixture (../shared/data)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cuda_lines = all_cuda_only_lines()
    tracer, start = LineTracer(cuda_lines), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fsl-rehearsal-") as root:
        rows = rehearse(Path(root), data, omniglot if omniglot.exists() else None, tracer)
    text, missing = report(rows, tracer, time.perf_counter() - start, cuda_lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(text)
    failed = [r["scenario"] for r in rows if r["exit"] != r["expected_exit"]]
    if failed:
        print(f"cuda_rehearsal: scenario(s) failed: {failed}", file=sys.stderr)
    if missing:
        print("cuda_rehearsal: CUDA-only lines the rehearsal does not execute, without a reason in NOT_REHEARSED "
              "(benchmarks/cuda_rehearsal.py); fix: add a scenario that runs them, or the reason:\n  "
              + "\n  ".join(missing), file=sys.stderr)
    return 1 if args.check and (missing or failed) else 0


if __name__ == "__main__":
    sys.exit(main())
