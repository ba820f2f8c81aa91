"""The code's layout (#24, #32): the package laid out as the pipeline, no import cycles, a command line that only
dispatches, short functions, training that never imports the test, one function that names the device. Read from the
source with `ast`, so a change that breaks the layout fails here."""
import ast
from pathlib import Path

from conftest import REPO

LONGEST = 60  # lines per function in fsl/, docstring included
TOP_LEVEL = ["config.py", "data", "device", "jobs", "maml", "models.py", "results", "train"]  # besides __init__/__main__


def parsed(folder: str) -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text()) for path in sorted((REPO / folder).rglob("*.py"))}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def fsl_imports(tree: ast.Module) -> set[str]:
    """Every fsl module a file imports, at its top or inside a function (`from fsl.x import y` counts as both fsl.x
    and fsl.x.y: y may be a module)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fsl"):
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("fsl")}
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the fsl modules it imports (names that are not modules, e.g. fsl.results.is_done, dropped; a package's
    own __init__ re-exports are not edges out of its modules)."""
    trees = {module_name(path): tree for path, tree in parsed("fsl").items()}
    return {name: {i for i in fsl_imports(tree) if i in trees and i != name} for name, tree in trees.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles among modules (a package importing its own submodules to re-export them is not one)."""
    def edges(name):
        return {i for i in graph[name] if not name.startswith(i + ".") and not i.startswith(name + ".")}
    found, state = [], {}

    def visit(name, path):
        state[name] = "open"
        for other in sorted(edges(name)):
            if state.get(other) == "open":
                found.append(path[path.index(other):] + [other])
            elif other not in state:
                visit(other, path + [other])
        state[name] = "closed"
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def test_fsl_top_level_is_the_pipeline_in_at_most_8_entries():
    entries = sorted(p.name for p in (REPO / "fsl").iterdir() if p.name not in ("__init__.py", "__main__.py")
                     and p.name != "__pycache__" and not p.name.endswith(".egg-info"))
    assert entries == TOP_LEVEL
    doc = ast.get_docstring(ast.parse((REPO / "fsl/__init__.py").read_text()))
    assert [line.split()[0] for line in doc.splitlines() if line.startswith("    ")] == \
        ["config.py", "data/", "models.py", "maml/", "device/", "train/", "results/", "jobs/"]  # in the pipeline's order


def test_no_import_cycles_even_through_imports_inside_functions():
    graph = import_graph()
    assert len(graph) > 40 and "fsl.results.provenance" in graph["fsl.results.files"] | graph["fsl.results.report"]
    assert cycles(graph) == []
    assert "fsl.results.files" not in graph["fsl.results.provenance"]  # #32: they imported each other
    assert not {i for i in graph["fsl.config"] if i.startswith(("fsl.models", "fsl.data"))}


PIPELINE = ["fsl.config", "fsl.data", "fsl.models", "fsl.maml", "fsl.device", "fsl.train", "fsl.results", "fsl.jobs",
            "fsl.__main__"]  # docs/layout.md's order
UPWARD = {("fsl.maml", "fsl.device"), ("fsl.train", "fsl.results")}  # the exceptions docs/layout.md names


def test_modules_import_only_the_layers_above_them_but_the_two_named_exceptions():
    def layer(name):
        return next(top for top in PIPELINE if name == top or name.startswith(top + "."))
    graph = {name: imports - {"fsl"} for name, imports in import_graph().items() if name != "fsl"}  # the root: a docstring
    upward = {(layer(name), layer(other)) for name, imports in graph.items() for other in imports
              if PIPELINE.index(layer(other)) > PIPELINE.index(layer(name))}
    assert upward == UPWARD


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"fsl.a": {"fsl.b"}, "fsl.b": {"fsl.c"}, "fsl.c": {"fsl.a"}}) == [["fsl.a", "fsl.b", "fsl.c", "fsl.a"]]
    assert cycles({"fsl.p": {"fsl.p.x"}, "fsl.p.x": {"fsl.p"}}) == []  # a package and its own module


def test_the_command_line_only_parses_and_dispatches():
    """fsl/__main__.py defines no class and calls no computation: each command is one call of a job's run()."""
    tree = ast.parse((REPO / "fsl/__main__.py").read_text())
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert functions <= {"build_parser", "add_data_command", "add_cluster_commands", "add_tune_command", "main",
                         "split_checkpoint", "run_command"}
    calls = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    jobs = {call for call in calls if call.endswith(".run") or call.endswith(".run_command")}
    assert jobs == {"train.run", "meta_test.run_command", "data.run", "report.run", "adapt.run", "demo.run",
                    "sweep.run", "slurm.run", "compare.run", "tune.run"}


def test_no_function_in_fsl_is_longer_than_60_lines():
    lengths = {f"{path.relative_to(REPO)}:{node.lineno} {node.name}": node.end_lineno - node.lineno + 1
               for path, tree in parsed("fsl").items() for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert len(lengths) > 300  # the walk saw the code
    assert {name: n for name, n in lengths.items() if n > LONGEST} == {}


def test_training_and_its_pieces_never_import_the_test():
    trees = parsed("fsl")
    pieces = ["train/meta_train.py", "train/checkpoint.py", "train/accuracy.py", "train/run_log.py", "train/cell.py",
              "data/episodes.py", "maml/loop.py", "maml/step.py"]
    for name in pieces:
        imports = fsl_imports(trees[REPO / "fsl" / name])
        assert not {i for i in imports if i == "fsl.train.meta_test" or i.startswith("fsl.train.meta_test.")}, name
    assert "fsl.train.accuracy" in fsl_imports(trees[REPO / "fsl/train/meta_train.py"])  # validation and test share it


def test_one_function_names_the_device():
    callers = [f"{path.relative_to(REPO)}:{node.lineno}" for folder in ("fsl", "benchmarks")
               for path, tree in parsed(folder).items() for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr == "get_device_name"]
    assert len(callers) == 1 and callers[0].startswith("fsl/device/distributed.py:"), callers  # in device_name
