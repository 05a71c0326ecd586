"""Resume: a `ziplm run` killed mid-stage leaves nothing half-written and, run again, reuses every finished stage;
a changed recipe rebuilds only the stages that depend on the change."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import tiny_recipe
from ziplm.cache import atomic_directory
from ziplm.pipeline.cli import app

REPO = Path(__file__).resolve().parents[1]


def run_cli(recipe: Path, out: Path, cache: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "ZIPLM_CACHE": str(cache), "COLUMNS": "200"}
    env.pop("ZIPLM_KILL_AT", None)
    if kill_at:
        env["ZIPLM_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "ziplm.pipeline.cli", "run", str(recipe), "--out", str(out)],
                          cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)


def entries(cache: Path) -> dict[str, float]:
    """Every finished stage entry (teacher, table, stage folders) with its modification time."""
    finished = list(cache.glob("stages/*/[!.]*"))
    return {str(path.relative_to(cache)): path.stat().st_mtime_ns for path in finished}


def visible_partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if "partial" in p.name and not p.name.startswith(".")]


def stage_lines(stderr: str, stage: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.search(rf"s {re.escape(stage)} ", line)]


@pytest.mark.parametrize("kill_at, finished, killed", [
    ("database", ["stages/teacher", "stages/table", "stages/dense", "stages/calibrate"], "stages/database"),
    ("dense", ["stages/teacher", "stages/table"], "stages/dense"),  # killed while exporting the dense reference
])
def test_killed_run_resumes_without_redoing_finished_work(tmp_path, tiny_bert_dir, toy_sentiment_csv, kill_at,
                                                          finished, killed):
    recipe, out, cache = tmp_path / "recipe.yaml", tmp_path / "out", tmp_path / "cache"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert_dir, toy_sentiment_csv)))

    first = run_cli(recipe, out, cache, kill_at=kill_at)
    assert first.returncode == -signal.SIGKILL, first.stderr
    before = entries(cache)
    for stage in finished:
        assert any(name.startswith(stage + "/") for name in before), (stage, before)
    assert not any(name.startswith(killed + "/") for name in before)  # only a hidden temporary folder
    assert list((cache / killed).glob(".*.partial-*"))
    assert not out.exists() or all(p.name.startswith(".") for p in out.iterdir())
    assert not visible_partials(cache)

    second = run_cli(recipe, out, cache)
    assert second.returncode == 0, second.stderr  # the tiny recipe is built to pass
    for stage in ["teacher", "table", *(["dense", "calibrate"] if kill_at == "database" else [])]:
        assert any("cached" in line for line in stage_lines(second.stderr, stage)), (stage, second.stderr)
    assert any("done in" in line for line in stage_lines(second.stderr, kill_at))
    after = entries(cache)
    assert {name: after[name] for name in before} == before  # finished entries untouched
    assert (out / "report.json").is_file() and (out / "dense" / "model.onnx").is_file()
    assert not [p for p in [*cache.rglob(".*partial*"), *out.rglob(".*partial*")]]  # stale temporaries cleaned


def test_a_changed_recipe_rebuilds_only_what_depends_on_it(tmp_path, monkeypatch, tiny_bert_dir, toy_sentiment_csv):
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ZIPLM_KILL_AT", raising=False)

    def run(**overrides) -> str:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert_dir, toy_sentiment_csv, **overrides)))
        result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "out")],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output  # the tiny recipe is built to pass
        return result.output

    def reused(output: str) -> dict[str, bool]:
        return {stage: any("cached" in line for line in stage_lines(output, stage))
                for stage in ("teacher", "table", "dense", "calibrate", "database", "1.3x", "1.6x")}

    first = reused(run())
    assert not any(first.values())
    assert reused(run()) == {"teacher": True, "table": True, "dense": True, "calibrate": True, "database": True,
                             "1.3x": True, "1.6x": False}
    changed_search = reused(run(ziplm={"damping_frac": 0.02}, targets=[1.3, 1.6]))
    assert changed_search == {"teacher": True, "table": True, "dense": True, "calibrate": True, "database": False,
                              "1.3x": False, "1.6x": False}
    more_targets = reused(run(ziplm={"damping_frac": 0.02}, targets=[1.3, 1.6]))
    assert all(more_targets.values())


def test_an_interrupted_atomic_directory_is_cleaned_by_the_next_build(tmp_path):
    final = tmp_path / "entry"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".entry.partial-{dead.stdout.strip()}-abc"
    stale.mkdir()
    alive = tmp_path / f".entry.partial-{os.getpid()}-xyz"  # a concurrent build of this process: left alone
    alive.mkdir()
    with atomic_directory(final) as tmp:
        (tmp / "file").write_text("complete")
        assert not final.exists()
    assert (final / "file").read_text() == "complete"
    assert not stale.exists() and alive.exists()
