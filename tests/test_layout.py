"""The code's layout (#24): short functions in fsl/, training that never imports the test, one function that names
the device. Read from the source with `ast`, so a change that breaks the layout fails here."""
import ast
from pathlib import Path

from conftest import REPO

LONGEST = 60  # lines per function in fsl/, docstring included


def parsed(folder: str) -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text()) for path in sorted((REPO / folder).rglob("*.py"))}


def fsl_imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fsl"):
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("fsl")}
    return names


def test_no_function_in_fsl_is_longer_than_60_lines():
    lengths = {f"{path.relative_to(REPO)}:{node.lineno} {node.name}": node.end_lineno - node.lineno + 1
               for path, tree in parsed("fsl").items() for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert len(lengths) > 300  # the walk saw the code
    assert {name: n for name, n in lengths.items() if n > LONGEST} == {}


def test_training_and_its_pieces_never_import_the_test():
    trees = parsed("fsl")
    for name in ("train", "checkpoint", "accuracy", "run_log", "episodes", "maml"):
        imports = fsl_imports(trees[REPO / f"fsl/{name}.py"])
        assert not {i for i in imports if i == "fsl.evaluate" or i.startswith("fsl.evaluate.")}, name
    assert "fsl.accuracy" in fsl_imports(trees[REPO / "fsl/train.py"])  # validation and test share the evaluator


def test_one_function_names_the_device():
    callers = [f"{path.relative_to(REPO)}:{node.lineno}" for folder in ("fsl", "benchmarks")
               for path, tree in parsed(folder).items() for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr == "get_device_name"]
    assert len(callers) == 1 and callers[0].startswith("fsl/distributed.py:"), callers  # in device_name
