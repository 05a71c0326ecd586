"""What a user gets from `ziplm run` beyond the report: files others can read, and progress that speaks for itself."""

from __future__ import annotations

import io
import os
import re
import signal
import stat
import subprocess
import sys
from types import SimpleNamespace

import yaml
from rich.console import Console

from tests.conftest import tiny_recipe, write_tiny_bert
from ziplm.cache import atomic_directory
from ziplm.pipeline import cli

TRANSFORMERS_OUTPUT = ("LOAD REPORT", "UNEXPECTED", "MISSING", "Loading weights", "Writing model shards")


def test_every_artifact_is_readable_by_others(tiny_family):
    """Members, the dense reference and the report: folders 0755, files 0644 (weights written 0600 before)."""
    paths = [tiny_family, *tiny_family.rglob("*")]
    assert any(p.suffix == ".safetensors" for p in paths)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


def test_cache_entries_are_shared_like_artifacts(tmp_path):
    with atomic_directory(tmp_path / "entry") as folder:
        (folder / "weights.bin").write_bytes(b"0")
        (folder / "weights.bin").chmod(0o600)
        (folder / "nested").mkdir(mode=0o700)
    assert stat.S_IMODE((tmp_path / "entry" / "weights.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "entry" / "nested").stat().st_mode) == 0o755


def test_the_run_says_what_happens_in_its_own_words_with_its_clock(tiny_family):
    output = (tiny_family.parent / "run.log").read_text()
    for noise in ("Writing model shards", "Loading weights", "LOAD REPORT", "MISSING"):
        assert noise not in output  # transformers' own reports and bars are kept from the user
    assert "is fine-tuned with its own sequence-classification head" in output  # the tiny checkpoint has one
    lines = [line for line in output.splitlines() if " teacher " in line or " table " in line]
    clocks = [re.match(r"\s*(\d+):(\d\d)\s+[\d.]+s (\w+)", line) for line in lines]
    assert lines and all(clocks)  # every progress line: the run's clock, the stage's clock, the stage
    run_seconds = [int(m[1]) * 60 + int(m[2]) for m in clocks]
    assert run_seconds == sorted(run_seconds)  # the run's clock never restarts at a new stage


def test_a_new_head_is_announced_and_transformers_own_reports_are_not(tmp_path, toy_sentiment_csv):
    """A real `ziplm` process, stopped after the teacher (ZIPLM_KILL_AT=table): from a checkpoint without a
    classification head transformers reports its missing and unexpected keys on the process's stderr (which a
    CliRunner does not capture), and shows bars while it loads and saves."""
    recipe = tmp_path / "recipe.yaml"
    base = write_tiny_bert(tmp_path / "pretrained", head=False)
    recipe.write_text(yaml.safe_dump(tiny_recipe(base, toy_sentiment_csv)))
    env = {**os.environ, "ZIPLM_CACHE": str(tmp_path / "cache"), "ZIPLM_KILL_AT": "table", "COLUMNS": "200"}
    killed = subprocess.run([sys.executable, "-m", "ziplm.pipeline.cli", "run", str(recipe), "--out",
                             str(tmp_path / "out")], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    output = killed.stdout + killed.stderr
    assert f"teacher a new sequence-classification head is trained on top of {base}" in output
    assert "teacher done in" in output  # the teacher loaded and saved its models before the kill
    for noise in TRANSFORMERS_OUTPUT:
        assert noise not in output


def fake_clock(monkeypatch, *readings: float) -> io.StringIO:
    """cli's clock reads `readings` in turn and its console prints into the returned buffer."""
    printed = io.StringIO()
    ticks = list(readings)
    monkeypatch.setattr(cli, "time", SimpleNamespace(perf_counter=lambda: ticks.pop(0)))
    monkeypatch.setattr(cli, "console", Console(file=printed, width=200))
    return printed


def test_a_progress_line_shows_the_runs_clock_then_the_stages(monkeypatch):
    monkeypatch.setattr(cli, "RUN_STARTED", [100.0])  # the command started at 100 s
    printed = fake_clock(monkeypatch, 159.0, 161.5, 3700.0)  # the stage began at 159 s; lines at 161.5 s and 3700 s
    progress = cli.stage_progress("table")
    progress("epoch 1/3 [####................] step 2/10")
    progress("done")
    assert printed.getvalue().splitlines() == ["  1:01     2.5s table epoch 1/3 [####................] step 2/10",
                                               " 60:00  3541.0s table done"]


def test_the_kill_hook_stops_the_process_at_its_stages_first_line(monkeypatch):
    kills: list[tuple[int, int]] = []
    monkeypatch.setattr(cli.os, "kill", lambda pid, sig: kills.append((pid, sig)))
    monkeypatch.setenv("ZIPLM_KILL_AT", "table")
    printed = fake_clock(monkeypatch, 0.0, 1.0, 2.0, 3.0)
    cli.stage_progress("teacher")("done")
    assert kills == []
    cli.stage_progress("table")("latency table: exporting")
    assert kills == [(os.getpid(), signal.SIGKILL)]
    assert printed.getvalue().splitlines()[-1].endswith("s table latency table: exporting")  # printed before it
