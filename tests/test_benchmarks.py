"""The benchmarks stay runnable as the library changes: every module imports, its command line parses, its calls
into the library match the signatures they call, and every stored result renders again to the markdown beside it (no
timing: the renderers read the stored JSON)."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import benchmarks

RESULTS = Path(benchmarks.__file__).parent / "results"
MODULES = sorted(name for _, name, is_package in pkgutil.walk_packages(benchmarks.__path__, "benchmarks.")
                 if not is_package)
# stored result -> (module, how its markdown is rendered from the stored JSON)
RENDERERS: dict[str, tuple[str, Callable[[Any, dict[str, Any]], str]]] = {
    "accuracy_vs_speedup": ("benchmarks.accuracy_vs_speedup", lambda m, r: m.markdown(r["tasks"])),
    "compound": ("benchmarks.compound", lambda m, r: m.markdown(r)),
    "cost": ("benchmarks.cost", lambda m, r: m.markdown(r["models"], r.get("commit"))),
    "decoder_accuracy_vs_speedup": ("benchmarks.decoder_accuracy_vs_speedup", lambda m, r: m.markdown(r)),
    "deepsparse_compound": ("benchmarks.deepsparse_compound", lambda m, r: m.markdown(r)),
    "embedding": ("benchmarks.embedding", lambda m, r: m.markdown(r)),
    "generation": ("benchmarks.generation", lambda m, r: m.markdown(r)),
    "int8_parity": ("benchmarks.int8_parity", lambda m, r: m.markdown(r["runs"])),
    "int8_speedup": ("benchmarks.int8_speedup", lambda m, r: m.markdown(r)),
    "latency_prediction": ("benchmarks.latency_prediction", lambda m, r: m.markdown(m.Result.from_json(r))),
    "obert_oneshot": ("benchmarks.obert_oneshot", lambda m, r: m.markdown(r)),
    "runtimes": ("benchmarks.runtimes", lambda m, r: m.markdown(r)),
    "peers": ("benchmarks.peers", lambda m, r: m.markdown(r)),
    "scale_out": ("benchmarks.scale_out", lambda m, r: m.markdown(r)),
    "speedup_guarantee": ("benchmarks.speedup_guarantee", lambda m, r: m.markdown(r["models"], r["command"])),
    "speedup_guarantee_families": ("benchmarks.speedup_guarantee", lambda m, r: m.markdown(r["models"], r["command"])),
    "speedup_guarantee_modernbert": ("benchmarks.speedup_guarantee",
                                     lambda m, r: m.markdown(r["models"], r["command"])),
    "speedup_guarantee_gpt2": ("benchmarks.speedup_guarantee", lambda m, r: m.markdown(r["models"], r["command"])),
    "contention": ("benchmarks.measurement.contention", lambda m, r: m.markdown(r)),
    "round_structures": ("benchmarks.measurement.round_structures", lambda m, r: m.markdown(r)),
    "table_contention": ("benchmarks.measurement.table_contention", lambda m, r: m.markdown(r)),
    "verdict_drift": ("benchmarks.measurement.verdict_drift", lambda m, r: m.markdown(r)),
    "verdict_settling": ("benchmarks.measurement.verdict_settling", lambda m, r: m.markdown(r)),
}


HELPERS = ("benchmarks.common", "benchmarks.sparsegpt", "benchmarks.torch_pruning_peer")  # modules, not commands


@pytest.mark.parametrize("name", [m for m in MODULES if m not in HELPERS])
def test_every_benchmark_imports_and_its_command_line_parses(name, monkeypatch, capsys):
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


def library_calls(module: Any) -> list[tuple[str, inspect.Signature | None, ast.Call]]:
    """Every call in the module's source to a ziplm or benchmarks callable it names directly (`f(...)` or
    `module.f(...)`, resolved through the module's globals), with the callee's signature (None: the module has no
    such attribute any more). Calls through *args or **kwargs, and methods of objects built at run time, are left
    out: only running the benchmark would resolve them."""
    calls: list[tuple[str, inspect.Signature | None, ast.Call]] = []
    for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
        if not isinstance(node, ast.Call) or any(isinstance(a, ast.Starred) for a in node.args) \
                or any(k.arg is None for k in node.keywords):
            continue
        func, where = node.func, f"{module.__name__}:{node.lineno}: {ast.unparse(node.func)}"
        if isinstance(func, ast.Name):
            callee = vars(module).get(func.id)
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                and inspect.ismodule(owner := vars(module).get(func.value.id)):
            callee = getattr(owner, func.attr, None)
            if callee is None and owner.__name__.startswith(("ziplm", "benchmarks")):
                calls.append((where, None, node))
        else:
            continue
        if not callable(callee) or not getattr(callee, "__module__", "").startswith(("ziplm", "benchmarks")):
            continue
        try:
            calls.append((where, inspect.signature(callee), node))
        except (TypeError, ValueError):  # no signature to check against
            continue
    return calls


@pytest.mark.parametrize("name", MODULES)
def test_every_library_call_binds_to_its_signature(name):
    """A function the library removed or a keyword it dropped (a settings knob, a moved argument) fails here, not an
    hour into a run. Arguments are bound by position and keyword only; their types are not checked."""
    failures = []
    for where, signature, call in library_calls(importlib.import_module(name)):
        if signature is None:
            failures.append(f"{where}: no longer in its module")
            continue
        try:
            signature.bind(*call.args, **{k.arg: k.value for k in call.keywords})
        except TypeError as error:
            failures.append(f"{where}: {error}")
    assert not failures, "\n".join(failures)


def test_every_stored_result_has_a_renderer():
    assert {path.stem for path in RESULTS.glob("*.json")} == set(RENDERERS)


@pytest.mark.parametrize("name", sorted(RENDERERS))
def test_a_stored_result_renders_to_the_markdown_beside_it(name, monkeypatch, tmp_path):
    module_name, render = RENDERERS[name]
    module = importlib.import_module(module_name)
    monkeypatch.setattr(module, "RESULTS", tmp_path, raising=False)  # plots drawn on the way go here, not over ours
    stored = json.loads((RESULTS / f"{name}.json").read_text())
    assert render(module, stored) == (RESULTS / f"{name}.md").read_text()
