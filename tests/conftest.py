"""Shared test fixtures. The real-data fixtures live in ../shared/data (override with FSL_SHARED_DATA)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FSL_SHARED_DATA", REPO.parent / "shared" / "data"))
FIXTURES = {"mini-imagenet": "mini-imagenet-lite", "cub": "CUB_200_2011-lite",
            "tiered-imagenet": "tiered-imagenet-lite", "omniglot": "omniglot"}

# mini-ImageNet-lite is the 84x84 release: runs on it name that form (the cells default to the full-size JPEGs)
MINI_84 = "data.mini_imagenet_images=84x84"

torch.set_num_threads(2)
# decoded-image stores (fsl.data.store) shared by every test of the session, built on first use
STORE_CACHE = Path(tempfile.mkdtemp(prefix="fsl-test-stores-"))
atexit.register(shutil.rmtree, STORE_CACHE, ignore_errors=True)


def fixture_root(name: str) -> Path:
    root = SHARED_DATA / FIXTURES[name]
    if not root.exists():
        pytest.skip(f"real-data fixture {root} not found: expected the reduced datasets in ../shared/data "
                    f"(or set FSL_SHARED_DATA)")
    return root


@pytest.fixture
def mini_root() -> Path:
    return fixture_root("mini-imagenet")


@pytest.fixture(scope="session")
def glyphs_root(tmp_path_factory) -> Path:
    """One generated glyphs dataset for the whole session."""
    from fsl.data import glyphs

    root = tmp_path_factory.mktemp("data") / "glyphs"
    glyphs.generate(root)
    return root


def pytest_collection_modifyitems(items) -> None:
    """Mark `slow` every test that starts another process (fsl, make, torchrun, sbatch: seconds to minutes each), so
    that `make test-fast` (pytest -m "not slow") runs the in-process tests only (CONTRIBUTING.md)."""
    import inspect
    for item in items:
        function = getattr(item, "function", None)
        try:
            source = inspect.getsource(function) if function else ""
        except (OSError, TypeError):
            source = ""
        if "subprocess." in source or "submit(" in source:
            item.add_marker(pytest.mark.slow)
