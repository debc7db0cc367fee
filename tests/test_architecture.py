"""The layout rules of docs/architecture.md, checked on the source: imports run one way between the stages, no
module reaches into another's private names, modules stay small, tests do not import each other (only
tests/helpers/)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "captune"
TESTS = Path(__file__).resolve().parent
FOUNDATIONS = {"errors", "fileio", "devices", "distributed"}
# Each stage, and what it may import besides the foundations (docs/architecture.md).
ALLOWED = {
    "inputs": set(),
    "internvl": {"inputs"},
    "data": {"internvl", "inputs"},
    "eval": {"data", "internvl", "inputs"},
    "train": {"eval", "data", "internvl", "inputs"},
    "merge": {"internvl", "inputs"},
    "demo": {"train", "eval", "data", "internvl", "inputs", "merge"},
}
MAX_LINES = 400  # "no module over ~400 lines"


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _stage(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0] if len(rel.parts) > 1 else rel.parts[0]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported from, names) of every `from captune... import ...` in the file, lazy imports included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and (node.module == "captune" or node.module.startswith("captune.")):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append(("." * node.level + (node.module or ""), [a.name for a in node.names]))
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_run_one_way(path):
    stage = _stage(path)
    if stage not in ALLOWED and stage not in FOUNDATIONS:
        return  # cli, __init__, __main__: the top may import anything
    allowed = ALLOWED.get(stage, set()) | FOUNDATIONS | {stage}
    for module, names in _imports(path):
        assert not module.startswith("."), f"{path}: relative import {module}; use captune.<package>"
        parts = module.split(".")
        target = parts[1] if len(parts) > 1 else names[0]
        if stage in FOUNDATIONS:
            assert target in {"errors", stage} or (stage == "distributed" and target == "devices"), f"{path} imports {module}"
        else:
            assert target in allowed, f"{path} ({stage}) imports {module}: not allowed by docs/architecture.md"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_names_across_modules(path):
    for module, names in _imports(path):
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{path} imports {private} from {module}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path}: split it by what it does"


def _imported_modules(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.append(node.module or "")
    return found


def test_tests_do_not_import_each_other():
    """The only modules of the test tree that a test (or a helper) imports are tests/helpers/'s."""
    local = {p.stem for p in TESTS.rglob("*.py") if not p.stem.startswith("__")}
    for path in TESTS.rglob("*.py"):
        for name in _imported_modules(path):
            top = name.split(".")[0]
            assert not top.startswith("test_"), f"{path} imports a test module ({name})"
            assert top not in local, f"{path} imports {name}: shared helpers live in tests/helpers/ (helpers.{name})"


def test_shared_helpers_live_in_tests_helpers():
    stray = [str(p.relative_to(TESTS)) for p in TESTS.rglob("*.py")
             if not p.name.startswith("test_") and p.name != "conftest.py" and p.relative_to(TESTS).parts[0] != "helpers"]
    assert stray == [], "helpers shared by tests belong in tests/helpers/"
