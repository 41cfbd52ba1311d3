"""The package's imports run one way: no module imports, directly or through others, a module that
imports it back. Imports inside functions count as much as those at the top of a file."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import poslab

PACKAGE = Path(poslab.__file__).parent
REPO = PACKAGE.parent.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The poslab modules that ``path`` (module ``name``) imports anywhere in its body.

    ``from poslab.a import b`` is an edge to ``poslab.a.b`` when that is a module, else to
    ``poslab.a``. A package is not counted as imported by its own submodules (Python runs the
    package's ``__init__`` first, but a submodule that does not name it does not depend on it).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(path, name, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read_from_every_module():
    graph = import_graph()
    assert {
        "poslab.lab.cli",
        "poslab.lab.rundir",
        "poslab.lab.experiments.grid",
        "poslab.lab.presets.language",
    } <= set(graph)
    # Imports inside functions count: cli imports bench only when the bench command runs.
    assert "poslab.lab.bench" in graph["poslab.lab.cli"]
    assert "poslab.lab.rundir" in graph["poslab.lab.train"]


def test_find_cycle_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("poslab.lab.rundir", "poslab.lab.train"),
        ("poslab.lab.train", "poslab.lab.experiments"),
        ("poslab.lab.report", "poslab.lab.experiments"),
        ("poslab.lab.experiments", "poslab.lab.cli"),
        ("poslab.lab.experiments", "poslab.lab.studies"),
        ("poslab.lab.studies", "poslab.lab.cli"),
        ("poslab.lab.config", "poslab.lab.presets"),
        ("poslab.encodings", "poslab.model"),
        ("poslab.kernels", "poslab.attention"),
    ],
)
def test_layers_import_only_downwards(lower, upper):
    """A lower layer never imports a module of a layer above it."""
    graph = import_graph()
    for name, targets in graph.items():
        if name == lower or name.startswith(lower + "."):
            above = sorted(t for t in targets if t == upper or t.startswith(upper + "."))
            assert not above, f"{name} imports {above}"


def test_the_library_never_imports_the_lab():
    """Only `poslab.lab` (and ``python -m poslab``, the command line's entry point) imports the lab."""
    graph = import_graph()
    assert "poslab.lab.cli" in graph["poslab.__main__"]  # the check can see such an import
    offenders = {
        name: sorted(t for t in targets if t.startswith("poslab.lab"))
        for name, targets in graph.items()
        if not name.startswith("poslab.lab") and name != "poslab.__main__"
    }
    offenders = {name: targets for name, targets in offenders.items() if targets}
    assert not offenders, offenders


def test_import_poslab_loads_the_library_alone():
    """``import poslab`` needs torch and nothing of the lab, plotting or the HF bridge."""
    code = (
        "import sys, poslab; "
        "print(sorted(m for m in sys.modules if m.startswith(('poslab.lab', 'poslab.hf', 'matplotlib', "
        "'transformers', 'numpy.testing'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


SUITES = {"contracts", "identities", "imports", "reference"}  # cross-cutting, kept by name


def test_tests_mirror_the_package():
    """tests/<path>/test_<name>.py tests poslab/<path>/<name>.py (or the folder <name>/); a suffix
    after the name (test_train_ddp.py) is allowed, and the contract and parity suites keep theirs."""
    tests = REPO / "tests"
    unmatched = []
    for path in sorted(tests.rglob("test_*.py")):
        folder = PACKAGE.joinpath(*path.relative_to(tests).parent.parts)
        stem = path.stem.removeprefix("test_")
        parts = stem.split("_")
        prefixes = ["_".join(parts[:n]) for n in range(len(parts), 0, -1)]
        found = any((folder / f"{p}.py").is_file() or (folder / p).is_dir() for p in prefixes)
        if not found and not (path.parent == tests and (stem in SUITES or stem.startswith("parity_"))):
            unmatched.append(str(path.relative_to(REPO)))
    assert not unmatched, f"test files named after no module: {unmatched}"


def test_only_the_cli_parses_arguments():
    for name, path in modules().items():
        if name != "poslab.lab.cli":
            assert "import argparse" not in path.read_text(), name


def repository_files() -> list[Path]:
    suffixes = {".py", ".md", ".toml", ".txt", ".cfg"}
    files = [p for p in REPO.rglob("*") if p.is_file() and p.suffix in suffixes]
    return [p for p in files if not {".git", ".venv", "runs"} & set(p.relative_to(REPO).parts)]


def test_nothing_points_outside_the_repository():
    """Documents the repository does not hold are not referred to; docs/ has the design."""
    outside = ["DESIGN" + ".md", "STYLE" + ".md", "../" + "shared"]
    files = repository_files()
    assert len(files) > 20
    hits = [f"{p.relative_to(REPO)}: {word}" for p in files for word in outside if word in p.read_text()]
    assert not hits, hits


def test_docs_pages_referred_to_exist():
    pages = {m for p in repository_files() for m in re.findall(r"docs/[a-z_]+\.md", p.read_text())}
    assert {"docs/encodings.md", "docs/attention.md", "docs/tasks.md"} <= pages
    missing = sorted(page for page in pages if not (REPO / page).is_file())
    assert not missing, missing
