"""The structure of the code: the import order is the data flow, and nothing hides a cycle.

- import-linter's contracts (pyproject.toml, `[tool.importlinter]`) hold: each module of `mi_prun`
  imports only from the layers below it, and the core never imports the app or Streamlit;
- the contracts really catch a violation (a copy of the package with one import against the flow);
- no import inside a function or block of the shipped code (`mi_prun`, `mi_prun_app`, the pages)
  unless it is of an optional dependency and says so in a comment;
- ruff, configured in pyproject.toml, finds nothing.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "app.py", *sorted((ROOT / "mi_prun").rglob("*.py")), *sorted((ROOT / "mi_prun_app").rglob("*.py")),
           *sorted((ROOT / "pages").glob("*.py"))]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_import_contracts_hold():
    res = _lint_imports(ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_import_contracts_catch_an_import_against_the_flow(tmp_path):
    """A config that imports the selectors (the cycle this layering removed) breaks the contract."""
    for name in ("mi_prun", "mi_prun_app"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "mi_prun" / "config.py", "a") as fh:
        fh.write("\nfrom mi_prun.select import costs  # noqa: E402,F401\n")
    res = _lint_imports(tmp_path)
    assert res.returncode != 0 and "BROKEN" in res.stdout
    assert "mi_prun.config -> mi_prun.select.costs" in res.stdout


def _nested_imports(path: Path, root: Path = ROOT) -> list[str]:
    """Imports not at module level, except those of optional dependencies marked by a comment on
    their line or the line above ("optional") or guarded by `except ImportError`."""
    src = path.read_text(encoding="utf-8")
    tree = ast.parse(src)
    lines = src.splitlines()
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            guarded.update(range(node.lineno, node.end_lineno + 1))
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            here = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
            if node.lineno in guarded or "optional" in here.lower():
                continue
            found.append(f"{path.relative_to(root)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return found


def test_no_hidden_imports_in_the_shipped_code():
    found = [hit for path in SHIPPED for hit in _nested_imports(path)]
    assert not found, "imports inside functions or blocks (move them to the top, or mark an optional " \
                      "dependency with a comment):\n" + "\n".join(found)


def test_the_nested_import_check_sees_one(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from mi_prun.select import costs\n    return costs\n")
    ok = tmp_path / "n.py"
    ok.write_text("def f():\n    import datasets  # optional dependency\n    return datasets\n")
    assert len(_nested_imports(bad, tmp_path)) == 1 and _nested_imports(ok, tmp_path) == []


def test_ruff_is_clean():
    if shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.fail("ruff is not installed: `pip install -e .[dev]` installs it")
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-1000:]


# What only the runtime may ask: which way a model runs (streamed, dispatched by accelerate, resident).
_EXECUTION_PATH = re.compile(r"is_streamed|stream_of|_hf_hook|STREAM_ATTR|_mi_prun_stream|\.kind\s*[!=]=\s*\"(?:streamed|"
                             r"dispatched|resident)\"|isinstance\([^)]*(?:StreamedSource|DispatchedSource|ResidentSource)")


def _path_branches(root: Path) -> list[str]:
    hits = []
    for path in [root / "app.py", *sorted((root / "mi_prun").rglob("*.py")), *sorted((root / "mi_prun_app").rglob("*.py")),
                 *sorted((root / "pages").glob("*.py"))]:
        if not path.exists() or (root / "mi_prun" / "runtime") in path.parents:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _EXECUTION_PATH.search(line):
                hits.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    return hits


def test_only_the_runtime_asks_which_way_a_model_runs():
    """Capture, scoring, healing, evaluation and export run through the weight source and the block
    runner; a module outside `mi_prun/runtime` that branches on the execution path is a regression."""
    assert _path_branches(ROOT) == []


def test_the_execution_path_check_sees_a_branch(tmp_path):
    (tmp_path / "mi_prun" / "runtime").mkdir(parents=True)
    (tmp_path / "mi_prun" / "runtime" / "sources.py").write_text("def is_streamed(m): ...\n")
    (tmp_path / "mi_prun" / "capture.py").write_text(
        "def f(model):\n    if weight_source(model).kind == \"streamed\":\n        return 1\n")
    assert [h.split(":")[0] for h in _path_branches(tmp_path)] == ["mi_prun/capture.py"]
