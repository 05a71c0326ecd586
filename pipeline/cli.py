"""The `ziplm` command line. Exit status: 0 success, 1 a target or check missed, 2 bad input, 3 an internal error.

Test hook, the only one: with ZIPLM_KILL_AT=<stage> in the environment (a progress label such as teacher, table,
dense, calibrate, database, 2x), the process kills itself with SIGKILL at that stage's first progress line. The
kill-and-resume tests use it to interrupt a run in the middle of a stage: with tiny models a stage ends before a
parent that watches the output could send the signal.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import click
import huggingface_hub.utils
import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from transformers.utils import logging as transformers_logging

from ziplm import assets
from ziplm.cache import StageCache, cache_root, write_json_atomic
from ziplm.errors import BadInputError, MissingEngineError, ZipLMError
from ziplm.families.loading import load_config
from ziplm.pipeline.gate import environment, load_artifact, verify_artifact, write_junit
from ziplm.pipeline.recipe import DEFAULT_RECIPE, load_recipe
from ziplm.pipeline.report import phase_note
from ziplm.pipeline.run import prepare_inputs, run_recipe
from ziplm.runtimes import InferenceEnv, available_runtimes, fleet, get_runtime
from ziplm.runtimes.fleet import FleetSettings
from ziplm.runtimes.base import runtime_class
from ziplm.runtimes.policy import policy
from ziplm.stages.finetune import TRAINING_LINE, TeacherResult
from ziplm.stages.latency_table import GROUP_SIZE, LatencyTable, get_or_build_table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
assets_app = typer.Typer(no_args_is_help=True, help="The embedded models and data sets.")
app.add_typer(assets_app, name="assets")
runtimes_app = typer.Typer(no_args_is_help=True, help="The inference runtimes and their engines.")
app.add_typer(runtimes_app, name="runtimes")
console = Console(stderr=True, soft_wrap=True)  # long paths in messages stay whole


class Effort(str, Enum):
    """The measurement efforts (runtimes.policy.Effort)."""

    quick = "quick"
    standard = "standard"
    thorough = "thorough"


RUN_STARTED = [time.perf_counter()]  # when the command started: the run's clock in every progress line


def stage_progress(stage: str) -> Callable[[str], None]:
    """Per-stage progress lines with the run's clock and the time since the stage began (and the ZIPLM_KILL_AT hook,
    see above). On a terminal, a training line replaces the previous one, as a live bar."""
    start = time.perf_counter()

    def progress(message: str) -> None:
        now = time.perf_counter()
        run_clock = int(now - RUN_STARTED[0])
        clocks = f"{run_clock // 60:3d}:{run_clock % 60:02d} {now - start:7.1f}s"
        line = f"[dim]{clocks}[/] [bold]{escape(stage)}[/] {escape(message)}"  # a training bar's [###..] is text
        live = console.is_terminal and message.startswith(TRAINING_LINE)
        console.print(f"\x1b[2K{line}" if console.is_terminal else line, end="\r" if live else "\n")
        if os.environ.get("ZIPLM_KILL_AT") == stage:
            os.kill(os.getpid(), signal.SIGKILL)

    return progress


@app.callback()
def start() -> None:
    """Start the run's clock, and keep transformers' own load reports and progress bars from the user: the progress
    lines say what happens (a new classification head, for one)."""
    RUN_STARTED[0] = time.perf_counter()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


INTERNAL_ERROR = 3  # a failure of the tool itself: never confused with a missed target (1) or bad input (2)


def fail_clearly(command: Callable[..., None]) -> Callable[..., None]:
    """Turn a ZipLMError into its message and exit status instead of a traceback; any other exception is a failure of
    the tool, shown with its traceback, exit status 3."""

    def run(*args: object, **kwargs: object) -> None:
        try:
            command(*args, **kwargs)
        except ZipLMError as error:
            console.print(f"[red]error:[/] {escape(str(error))}")
            raise typer.Exit(error.exit_code) from error
        except (typer.Exit, click.ClickException):  # a status the command chose (typer.Exit is a RuntimeError)
            raise
        except Exception as error:  # noqa: BLE001  (reported in full, then a distinct exit status)
            console.print_exception()
            console.print(f"[red]internal error:[/] {type(error).__name__}: {escape(str(error))}; this is a bug in "
                          "ziplm, not in the input: please report it with the traceback above")
            raise typer.Exit(INTERNAL_ERROR) from error

    run.__name__, run.__doc__, run.__wrapped__ = command.__name__, command.__doc__, command  # for typer's help
    return run


@runtimes_app.command("list")
@fail_clearly
def runtimes_list() -> None:
    """Every registered runtime, the phases and precisions it times, and whether its engine is on this machine."""
    table = Table("runtime", "phases", "precisions", "engine")
    for name in available_runtimes():
        cls = runtime_class(name)
        table.add_row(name, ", ".join(cls.phases), ", ".join(cls.precisions), engine_status(name))
    Console().print(table)


@runtimes_app.command("install")
@fail_clearly
def runtimes_install(name: Annotated[str, typer.Argument(help="a runtime with an environment of its own")]) -> None:
    """Create the Python environment of a runtime whose engine cannot share the core one (deepsparse)."""
    environment = runtime_class(name).environment
    if environment is None:
        raise BadInputError(f"runtime {name!r} runs in the core environment: there is nothing to install")
    environment.install(stage_progress("install"))


def engine_status(name: str) -> str:
    """"ready", or what loading the runtime says is missing."""
    try:
        get_runtime(InferenceEnv(runtime=name))
    except MissingEngineError as error:
        return f"missing: {error}"
    return "ready"


@assets_app.command("fetch")
@fail_clearly
def fetch() -> None:
    """Download and unpack the embedded data sets into the cache (downloads nothing when already there)."""
    assets.fetch_assets()


@app.command()
@fail_clearly
def run(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file or built-in recipe name")] = DEFAULT_RECIPE,
    out: Annotated[Path, typer.Option(help="output folder: report.json, report.md, one folder per member")] = Path(
        "runs/latest"),
    ray: Annotated[str | None, typer.Option(help="Ray cluster whose nodes measure environments that name a device "
                                                 "(overrides the recipe's `ray`)")] = None,
) -> None:
    """Produce the family: one pruned ONNX model per target, each verified in the runtime. Exit 1 if any missed."""
    spec = load_recipe(recipe)
    if ray:
        spec = spec.model_copy(update={"ray": FleetSettings(address=ray)})
    start = time.perf_counter()
    report = run_recipe(spec, out, stage_progress)
    for member in report["members"]:
        mark = "[green]pass[/]" if member["passed"] else "[red]MISS[/]"
        sla = member["sla"]
        holds = f", {sla['metric']} {sla['measured_ms']:.2f} ms vs SLA {sla['ms']:g} ms" if sla else ""
        console.print(f"{mark} {member['name']}: target {member['target_speedup']:.3g}x, measured "
                      f"{member['measured_speedup']:.3f}x ({member['deviation']:+.1%}){holds}, "
                      f"{member['metric']['name']} {member['metric']['value']:.4f} "
                      f"(dense {member['metric']['dense_value']:.4f})")
    console.print(f"wrote {out / 'report.md'} in {time.perf_counter() - start:.0f} s")
    if not all(member["passed"] for member in report["members"]):
        raise typer.Exit(1)


@app.command()
@fail_clearly
def verify(
    artifact: Annotated[Path, typer.Argument(help="a member folder written by `ziplm run` (OUT/<name>)")],
    runtime: Annotated[str | None, typer.Option(help="runtime to measure in (default: the manifest's)")] = None,
    threads: Annotated[int | None, typer.Option(help="threads (default: the manifest's)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="batch size (default: the manifest's)")] = None,
    sequence_length: Annotated[int | None, typer.Option(help="sequence length (default: the manifest's)")] = None,
    max_latency_ms: Annotated[float | None, typer.Option(help="latency SLA in ms (default: the member's SLA)")] = None,
    metric: Annotated[str | None, typer.Option(help="latency statistic the SLA bounds: p90 or median")] = None,
    min_speedup: Annotated[float | None, typer.Option(help="required speedup (default: target x (1 - tolerance))")]
    = None,
    effort: Annotated[Effort, typer.Option(help="how hard to measure (docs/measurement.md)")] = Effort.standard,
    max_ttft_ms: Annotated[float | None, typer.Option(help="decoders: time to first token (a prompt of the sequence "
                                                          "length) in ms")] = None,
    max_tpot_ms: Annotated[float | None, typer.Option(help="decoders: time per output token in ms")] = None,
    context_length: Annotated[int | None, typer.Option(min=1, help="decoders: the cache length a token is timed on "
                                                             "(default: the member's decode context)")] = None,
    junit: Annotated[Path | None, typer.Option(help="write a JUnit XML report here")] = None,
    ray: Annotated[str | None, typer.Option(help="Ray cluster that offers the member's device (its manifest's "
                                                 "`device`), when it was measured on one")] = None,
) -> None:
    """Re-measure an artifact against its dense reference and gate on it: exit 0 pass, 1 fail, 2 bad input."""
    if metric not in (None, "p90", "median"):
        raise BadInputError(f"unknown --metric {metric!r}: choose p90 or median")
    loaded = load_artifact(artifact)
    env = environment(loaded.manifest, runtime, threads, batch_size, sequence_length)
    fleet.prepare(FleetSettings(address=ray) if ray else None, [env])
    verdict = verify_artifact(loaded, env, max_latency_ms, min_speedup, metric, Effort(effort).value, max_ttft_ms,
                              max_tpot_ms, context_length)
    if junit is not None:
        write_junit(verdict, junit)
    print(verdict.line())
    if not verdict.passed:
        raise typer.Exit(1)


@app.command()
@fail_clearly
def publish(
    folder: Annotated[Path, typer.Argument(help="the --out folder of `ziplm run`, or one member folder")],
    registry: Annotated[str, typer.Option(help="MLflow tracking/registry URI, e.g. http://127.0.0.1:5000")],
    experiment: Annotated[str, typer.Option(help="MLflow experiment of the runs")] = "ziplm-deploy",
    force: Annotated[bool, typer.Option(help="also publish members that failed verification")] = False,
) -> None:
    """Register every verified member in an MLflow model registry; exit 1 if a failed member was refused."""
    from ziplm.pipeline.registry import publish_family

    result = publish_family(folder, registry, experiment, force)
    for name, version in result.published.items():
        console.print(f"[green]published[/] {name} version {version} to {registry}")
    for name in result.refused:
        console.print(f"[red]refused[/] {name}: it failed verification (passed=false); --force publishes it anyway")
    if result.refused:
        raise typer.Exit(1)


@app.command()
@fail_clearly
def prepare(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file or built-in recipe name")] = DEFAULT_RECIPE,
    out: Annotated[Path | None, typer.Option(help="write prepare.json (teacher and table summary) here")] = None,
) -> None:
    """Run the cached stages of a recipe: the dense teacher fine-tune and the latency table."""
    spec = load_recipe(recipe)
    inputs = prepare_inputs(spec, StageCache(cache_root() / "stages", stage_progress))
    teacher, table = inputs.teacher, inputs.table
    summary = {"recipe": spec.model_dump(mode="json"), "teacher": teacher_summary(teacher),
               "latency_table": table_summary(table)}
    show_table(table)
    console.print(f"teacher validation {teacher.metric.name}: [bold]{teacher.metric.value:.4f}[/] "
                  f"on {teacher.metric.size} examples")
    if out is not None:
        write_json_atomic(out / "prepare.json", summary)
        console.print(f"wrote {out / 'prepare.json'}")


class TablePrecision(str, Enum):
    """The precisions a latency table can be timed in (runtimes.base.Precision)."""

    fp32 = "fp32"
    int8 = "int8"


class TablePhase(str, Enum):
    """The phases a latency table can be timed in (runtimes.base.Phase)."""

    sequence = "sequence"
    prefill = "prefill"
    decode = "decode"
    request = "request"


def runtime_options(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs as runtime options, each value read as YAML reads it (cpu, 0, true)."""
    options = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise BadInputError(f"--option {pair!r} is not KEY=VALUE (e.g. --option device=cpu)")
        options[key] = yaml.safe_load(value)
    return options


@app.command("latency-table")
@fail_clearly
def latency_table(
    model: Annotated[str, typer.Option(help="minilm, smollm2, bert-base, roberta-base, distilbert-base, "
                                            "modernbert-base, gpt2-small (random shapes), a model directory, GGUF "
                                            "file or hub id")] = "minilm",
    runtime: str = "onnxruntime",
    threads: int = 2,
    batch_size: int = 1,
    sequence_length: int = 128,
    precision: Annotated[TablePrecision, typer.Option(help="int8: QDQ INT8 blocks, as INT8 chains use")] = "fp32",
    group_size: int = GROUP_SIZE,
    effort: Annotated[Effort, typer.Option(help="how hard to measure (docs/measurement.md)")] = Effort.standard,
    rebuild: Annotated[bool, typer.Option(help="measure again even when a cached table exists")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the table here")] = None,
    phase: Annotated[TablePhase, typer.Option(help="decoders: prefill (a prompt of the sequence length, time to "
                                                   "first token), decode (one token on a cache of --context-length) "
                                                   "or request (prefill, then --new-tokens greedy tokens)")]
    = "sequence",
    context_length: Annotated[int | None, typer.Option(min=1, help="decode: the cache length")] = None,
    new_tokens: Annotated[int | None, typer.Option(min=1, help="request: the tokens a request generates")] = None,
    sparsity: Annotated[float, typer.Option(min=0.0, max=0.99, help="blocks with this fraction of their weights "
                                                                    "zero, as a chain's oBERT stage leaves them")]
    = 0.0,
    option: Annotated[list[str] | None, typer.Option(help="a runtime option as KEY=VALUE (repeatable), e.g. "
                                                          "device=cpu for runtime pytorch")] = None,
) -> None:
    """Build (or show the cached) latency table for a model shape in an inference environment."""
    if (TablePhase(phase) == TablePhase.decode) != (context_length is not None):
        raise BadInputError("--context-length is the cache length of --phase decode: give both or neither")
    if (TablePhase(phase) == TablePhase.request) != (new_tokens is not None):
        raise BadInputError("--new-tokens is the length of a --phase request: give both or neither")
    env = InferenceEnv(runtime=runtime, threads=threads, batch_size=batch_size, sequence_length=sequence_length,
                       precision=TablePrecision(precision).value, phase=TablePhase(phase).value,
                       context_length=context_length, new_tokens=new_tokens, sparsity=sparsity,
                       options=runtime_options(option or []))
    table, cached = get_or_build_table(load_config(model), env, group_size, policy(Effort(effort).value),
                                       progress=stage_progress("latency-table"), rebuild=rebuild)
    show_table(table)
    console.print(f"{'cached' if cached else 'built'} table {table.fingerprint}")
    if json_out is not None:
        write_json_atomic(json_out, table.to_json())


def teacher_summary(teacher: TeacherResult) -> dict[str, object]:
    return {"path": str(teacher.path), "metric": teacher.metric.to_json(), "fingerprint": teacher.fingerprint,
            "seconds": round(teacher.seconds, 1), "cached": teacher.cached}


def table_summary(table: LatencyTable) -> dict[str, object]:
    return {"fingerprint": table.fingerprint, "base_ms": table.base_ms,
            "correction": {"scale": table.correction.scale, "offset": table.correction.offset},
            "dense_predicted_ms": table.dense_ms()}


def show_table(table: LatencyTable) -> None:
    env = table.environment
    view = Table(title=f"latency table {table.fingerprint} ({env['name']} {env['version']}, {env['threads']} threads, "
                       f"batch {env['batch_size']}, sequence {env['sequence_length']}, {env['precision']}"
                       f"{phase_note(env)})")
    view.add_column("module")
    view.add_column("level", justify="right")
    view.add_column("ms over removed", justify="right")
    for units, ms in zip(table.unit_levels, table.attention_ms):
        view.add_row("attention", f"{units} units", f"{ms:.3f}")
    step = max(1, len(table.ffn_levels) // 12)
    for width, ms in list(zip(table.ffn_levels, table.ffn_ms))[::step]:
        view.add_row("ffn", f"{width} neurons", f"{ms:.3f}")
    console.print(view)
    console.print(f"base {table.base_ms:.3f} ms; correction: measured = {table.correction.scale:.4f} x predicted "
                  f"{table.correction.offset:+.3f} ms; dense predicted {table.dense_ms():.2f} ms; largest reachable "
                  f"speedup {table.max_speedup():.2f}x (every attention and FFN module removed)")


if __name__ == "__main__":  # pragma: no cover
    app()
