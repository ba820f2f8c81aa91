"""Docs that cannot drift (#32): README.md, CONTRIBUTING.md and docs/*.md name only links, files, make targets, fsl
subcommands and config keys that exist, and every number in the README has its source file beside it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

from fsl.__main__ import build_parser
from fsl.config import Config, flat_dict

PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
PATH_PREFIXES = ("fsl/", "docs/", "experiments/", "benchmarks/", "tests/", "scripts/", "results/", "notebooks/",
                 ".ci/")
TOP_FILES = {"Makefile", "README.md", "CONTRIBUTING.md", "pyproject.toml", "requirements.txt", "requirements-dev.txt",
             "pytest.ini"}
FILE_SUFFIXES = ("py", "csv", "md", "yaml", "pth", "png", "npz", "pkl", "json", "jsonl", "txt", "zip", "sh", "log",
                 "ipynb", "sbatch")
SECTIONS = ("data", "model", "maml", "train", "test")
NOT_KEYS = {"export"}  # bare `word=` in code that is a shell word, not a config key
WRITTEN_ON_DEMAND = {"results/tables/other_tests.md"}  # fsl tables writes it only when there are such rows


def code_spans(text: str) -> list[str]:
    """Inline code and the lines of fenced code blocks."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S))
    lines = [re.sub(r"(^|\s)#.*", "", line) for block in blocks for line in block.splitlines()]  # comments: prose
    return inline + lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)}


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    targets = {t for line in re.findall(r"^([\w%. -]+):(?!=)", text, flags=re.M) for t in line.split()}
    cells = {p.stem for p in (REPO / "experiments").glob("*.yaml") if not p.stem.startswith("_")}
    variants = {p.stem for p in (REPO / "experiments/variants").glob("*.yaml")}
    data = {f"data-{d}" for d in ("cub", "mini-imagenet", "tiered-imagenet", "omniglot")}
    return (targets - {t for t in targets if "%" in t}) | cells | variants | data


def subcommands() -> set[str]:
    parser = build_parser()
    return set(next(a for a in parser._actions if a.dest == "command").choices)


CONFIG_KEYS = set(flat_dict(Config()))


def references(page: Path) -> dict[str, list[str]]:
    """What a page names, by kind."""
    text = page.read_text()
    spans = code_spans(text)
    found = {"link": [], "file": [], "make": [], "fsl": [], "key": []}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+://", target):
            found["link"].append(target)
    for span in spans:
        for token in re.findall(r"[\w./{},*+-]+", span):
            token = token.rstrip(".,")
            if (token.startswith(PATH_PREFIXES) or token in TOP_FILES) and not re.search(r"[{}]|\.\.\.", token):
                found["file"].append(token)
        found["make"] += re.findall(r"(?:^|\s|`)make ([a-z][\w+-]*)", span)
        found["fsl"] += re.findall(r"(?:^|[\s(])(?:python -m )?fsl (\w[\w-]*)", span) + \
            re.findall(r"-m fsl (\w+)", span)
        found["key"] += [k for k in re.findall(r"(?<![\w/.{,-])((?:%s)\.[a-z_]+)(?![\w/])" % "|".join(SECTIONS), span)
                         if k.rsplit(".", 1)[1] not in FILE_SUFFIXES]
        found["key"] += re.findall(r"(?:^|\s|\")([a-z][a-z_]*)=(?!=)", span)
    return found


def missing(page: Path) -> dict[str, list[str]]:
    found, bad = references(page), {}
    targets, commands = make_targets(), subcommands()
    for link in found["link"]:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists() or (anchor and target.suffix == ".md" and anchor not in anchors(target)):
            bad.setdefault("link", []).append(link)
    for name in found["file"]:
        if name not in WRITTEN_ON_DEMAND and not (list(REPO.glob(name)) if "*" in name else (REPO / name).exists()):
            bad.setdefault("file", []).append(name)
    bad_make = [t for t in found["make"] if t not in targets]
    bad_fsl = [c for c in found["fsl"] if c not in commands]
    bad_keys = [k for k in found["key"] if k not in CONFIG_KEYS and k not in NOT_KEYS]
    for kind, values in (("make", bad_make), ("fsl", bad_fsl), ("key", bad_keys)):
        if values:
            bad[kind] = values
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_file_target_command_and_key_a_page_names_exists(page):
    assert missing(page) == {}


def test_the_checker_finds_what_does_not_exist(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See [gone](docs/nowhere.md), [here](#no-such-heading), `fsl/nothing.py`, `make no-such-target`, "
                    "`fsl frobnicate x`, `train.no_such_key=1` and `devise=cpu`.\n\n# A heading\n")
    assert missing(page) == {"link": ["docs/nowhere.md", "#no-such-heading"], "file": ["fsl/nothing.py"],
                             "make": ["no-such-target"], "fsl": ["frobnicate"],
                             "key": ["train.no_such_key", "devise"]}
    page.write_text("[ok](#a-heading), `make demo`, `fsl train x`, `train.tasks=9`, `device=cpu`, `fsl/config.py`\n\n"
                    "# A heading\n")
    assert missing(page) == {}


NUMBER = re.compile(r"\d+\.\d+|\d+ ?%|\d+(\.\d+)?x\b|tasks/s")


def blocks(text: str) -> list[str]:
    """The README's paragraphs and tables (separated by blank lines), code blocks and headings left out."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [b for b in re.split(r"\n\s*\n", text) if b.strip() and not b.lstrip().startswith("#")]


def sources(block: str) -> list[str]:
    return [t for span in re.findall(r"`([^`]+)`", block) for t in span.split()
            if (t.startswith(PATH_PREFIXES) or t in TOP_FILES) and (REPO / t).exists()]


def unsourced(text: str) -> list[str]:
    """Blocks with a measured or published number and no existing file named in them (a table may take its source
    from the paragraph right before or after it)."""
    parts, bad = blocks(text), []
    for i, block in enumerate(parts):
        if not NUMBER.search(block) or sources(block):
            continue
        if block.lstrip().startswith("|") and any(sources(parts[j]) for j in (i - 1, i + 1) if 0 <= j < len(parts)):
            continue
        bad.append(block.strip()[:80])
    return bad


def test_every_number_in_the_readme_has_its_source_file_beside_it():
    assert unsourced((REPO / "README.md").read_text()) == []


def test_the_number_check_finds_an_unsourced_number():
    assert unsourced("fsl is 1.5x faster.\n\nIt is 1.5x faster (`benchmarks/results/omniglot-peers-cpu-x2.md`).\n") \
        == ["fsl is 1.5x faster."]


def test_the_readme_is_short_and_starts_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first = re.match(r"```bash\n(.*?)```", text, flags=re.S).group(1).splitlines()
    assert [line.split("#")[0].strip() for line in first] == ["make demo", "make test"]
