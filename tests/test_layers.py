"""The architecture is the folder layout: imports run one way, and the package installs from a wheel."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ziplm.<first part> -> its layer (the package root: errors <- cache <- assets); a module imports its own
# subpackage and lower layers only
LAYERS = {"errors": 0.0, "cache": 0.1, "assets": 0.2, "families": 1, "tasks": 1, "runtimes": 1, "stages": 2,
          "pipeline": 3}
FOLDERS = {"ziplm": "", "families": "families", "tasks": "tasks", "runtimes": "runtimes", "stages": "stages",
           "pipeline": "pipeline"}
MATH_MODULES = ("stages/obs.py", "stages/search.py")  # pure math: numpy and torch, nothing of the project


def project_imports(path: Path) -> set[str]:
    """The ziplm modules a file imports (its first part below ziplm: 'families', 'errors', ...)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ziplm"):
            parts = node.module.split(".")
            names |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("ziplm.")}
    return names


def owner(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    return path.stem if folder == "ziplm" else folder


def source_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_every_package_folder_is_layered():
    assert {owner(p) for p in source_files()} - {"__init__"} <= set(LAYERS)


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    """root (errors, cache, assets) <- families, tasks, runtimes <- stages <- pipeline; no edges between peers."""
    me = owner(path)
    if me == "__init__":
        return
    wrong = sorted(name for name in project_imports(path) - {me} if LAYERS[name] >= LAYERS[me])
    assert not wrong, f"{path.relative_to(ROOT)} ({me}, layer {LAYERS[me]}) imports {wrong}"


@pytest.mark.parametrize("module", MATH_MODULES)
def test_math_modules_import_nothing_of_the_project(module):
    assert project_imports(ROOT / module) == set()


def test_no_stale_nested_paths_in_code_or_docs():
    stale = re.compile(r"(?<!\.cache/)\bziplm/(pipeline|stages|runtimes|families|tasks)\b")  # the cache is no code
    files = [*source_files(), *ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"),
             *(ROOT / "benchmarks").rglob("*.py"), ROOT / "Makefile", ROOT / "pyproject.toml"]
    hits = [f"{f.relative_to(ROOT)}: {m[0]}" for f in files if f.exists() for m in stale.finditer(f.read_text())]
    assert not hits


def test_the_wheel_holds_every_subpackage_and_imports_from_it(tmp_path):
    """Build the wheel, install it alone into a fresh directory, and import every subpackage from there."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("ziplm_deploy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.split("/")[0] not in ("ziplm",) and ".dist-info" not in n]
    assert "ziplm/pipeline/recipes/minilm_mr.yaml" in names
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    script = ("import ziplm, ziplm.families, ziplm.tasks, ziplm.runtimes, ziplm.stages, ziplm.pipeline.cli;"
              "from ziplm.pipeline.recipe import load_recipe; load_recipe('minilm_mr');"
              "print(ziplm.pipeline.cli.__file__)")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(tmp_path / "site" / "ziplm" / "pipeline"))
