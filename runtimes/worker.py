"""Engines that cannot share the core environment (DeepSparse pins numpy<2 and onnx<1.15) run in a worker process in
a virtual environment of their own: `EngineEnvironment` creates it on demand (`ziplm runtimes install NAME`, never the
core install) under ZIPLM_ENGINES (default ~/.cache/ziplm/engines: apart from the stage cache, which a run may point
elsewhere), and `Worker` starts a script in it and calls it over a pipe (runtimes.wire).

A worker's CPU time is this process's own work to the load guard (runtimes.timing.OWN_WORKERS): while it times a
model, the core waits on the pipe, and the machine's load is the worker's.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ziplm.errors import MissingEngineError, ZipLMError
from ziplm.runtimes import wire
from ziplm.runtimes.timing import OWN_WORKERS, Call

INSTALLED_MARK = ".ziplm-engine"


class WorkerError(ZipLMError):
    """The worker process failed a command or ended; the message says which and what it logged."""


@dataclass(frozen=True)
class EngineEnvironment:
    """A virtual environment for one engine: `requirements` installed by one `pip install` with an interpreter of
    `pythons`, in engines_root()/<name>. `install_hint` is what `require` tells a user to do when it is missing
    ({name} filled in): a runtime's `ziplm runtimes install NAME` by default."""

    name: str
    requirements: tuple[str, ...]  # e.g. ("torch==2.13.0", "llmcompressor==0.14.0.1"): pins that keep pip off CUDA
    pythons: tuple[str, ...]  # major.minor versions the engine has wheels for, most preferred first
    install_hint: str = "`ziplm runtimes install {name}` (or `make setup-{name}`), or choose runtime onnxruntime"

    @property
    def path(self) -> Path:
        return engines_root() / self.name

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def mark(self) -> str:
        """The installed mark's text: the requirements, so that an environment of other pins is installed anew."""
        return " ".join(self.requirements)

    def installed(self) -> bool:
        mark = self.path / INSTALLED_MARK
        return self.python.exists() and mark.exists() and mark.read_text().strip() == self.mark

    def require(self) -> Path:
        """The environment's interpreter, or MissingEngineError naming the command that installs it."""
        if not self.installed():
            raise MissingEngineError(f"{self.name} runs in a Python environment of its own (Python "
                                     f"{' or '.join(self.pythons)}), which is not installed: run "
                                     f"{self.install_hint.format(name=self.name)}")
        return self.python

    def base_python(self) -> str:
        """This interpreter where the engine supports it, else the first `pythonX.Y` of `pythons` on the PATH."""
        if f"{sys.version_info.major}.{sys.version_info.minor}" in self.pythons:
            return sys.executable
        for version in self.pythons:
            found = shutil.which(f"python{version}")
            if found:
                return found
        raise MissingEngineError(f"{self.name} needs Python {' or '.join(self.pythons)} for its own "
                                 "environment, and none is on the PATH: install one (e.g. pyenv install 3.11)")

    def install(self, progress: Callable[[str], None] = print) -> Path:
        """Create the environment (again, if an earlier install was interrupted or pinned another version); the
        finished environment appears at `path` only once it imports."""
        if self.installed():
            progress(f"{self.name}: already installed in {self.path}")
            return self.path
        partial = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        base = self.base_python()
        progress(f"{self.name}: creating {self.path} with {base}, installing {self.mark}")
        for command in ([base, "-m", "venv", str(partial)],
                        [str(partial / "bin" / "python"), "-m", "pip", "install", "--quiet", *self.requirements],
                        [str(partial / "bin" / "python"), "-c", f"import {self.name}"]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                shutil.rmtree(partial, ignore_errors=True)
                raise MissingEngineError(f"installing {self.name}'s environment failed at `{' '.join(command)}`:\n"
                                         f"{(done.stderr or done.stdout).strip()[-2000:]}")
        (partial / INSTALLED_MARK).write_text(self.mark + "\n")
        shutil.rmtree(self.path, ignore_errors=True)
        partial.rename(self.path)  # bin/python finds its environment by the pyvenv.cfg beside it, so it survives the
        # rename (bin/pip's first line would not: pip is only ever run as python -m pip)
        progress(f"{self.name}: installed in {self.path}")
        return self.path


def engines_root() -> Path:
    return Path(os.environ.get("ZIPLM_ENGINES", Path.home() / ".cache" / "ziplm" / "engines"))


class Worker:
    """A script running in an engine's environment, called one command at a time (`call`), ended at exit."""

    def __init__(self, environment: EngineEnvironment, script: Path) -> None:
        python = environment.require()
        self.log = environment.path / "worker.log"
        self.lock = threading.Lock()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([str(python), str(script)], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log)
        OWN_WORKERS.add(self.process.pid)
        atexit.register(self.close)

    def call(self, command: str, **arguments: Any) -> Any:
        with self.lock:
            try:
                wire.send(self.process.stdin, command, arguments)
                kind, value = wire.receive(self.process.stdout)
            except (EOFError, BrokenPipeError, OSError) as error:
                raise WorkerError(f"the worker process ended during `{command}`; its log ({self.log}) ends:\n"
                                  f"{self.log_tail()}") from error
        if kind == "error":
            raise WorkerError(f"the worker failed `{command}`: {value}")
        return value

    def time_calls(self, runners: Mapping[str, Call], rounds: int, warmup: int, max_seconds: float | None,
                   min_rounds: int) -> dict[str, list[float]]:
        """A session's `timer` (runtimes.timing.Timer): the interleaved loop run in the worker on the models its
        sessions hold (`session.model`), fed their Calls' inputs."""
        calls = {name: (call.session.model, wire.encode_feed(call.inputs)) for name, call in runners.items()}
        return self.call("time", calls=calls, rounds=rounds, warmup=warmup, max_seconds=max_seconds,
                         min_rounds=min_rounds)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, characters: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-characters:] if self.log.exists() else ""

    def close(self) -> None:
        if self.alive():
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        OWN_WORKERS.discard(self.process.pid)
