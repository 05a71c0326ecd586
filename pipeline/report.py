"""Manifests and reports: the output contract of DESIGN.md (manifest.json per member, report.json, report.md)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from transformers import PreTrainedModel

from ziplm.families import ModelStructure, adapter_for
from ziplm.pipeline import plots
from ziplm.cache import file_digest, fingerprint, write_json_atomic, write_text_atomic
from ziplm.stages.latency_table import LatencyTable
from ziplm.runtimes.pytorch import program_path
from ziplm.runtimes.timing import MachineLoad, TimingStats

if TYPE_CHECKING:  # run.py imports this module; the types are only needed for annotations
    from ziplm.pipeline.recipe import Recipe
    from ziplm.runtimes.paired import LatencyCheck, SpeedFactor
    from ziplm.stages.closed_loop import Member
    from ziplm.tasks import Metric, Task

DENSE_DIR = "dense"  # the dense reference beside the members: what `ziplm verify` measures them against
OWN_DIR = "dense-int8"  # INT8 families with targets over FP32: the dense model in the members' own precision
OWN_REFERENCE = f"../{OWN_DIR}/model.onnx"


def runtime_json(table: LatencyTable) -> dict[str, Any]:
    env = table.environment
    keys = ("name", "version", "device", "threads", "batch_size", "sequence_length", "precision", "options")
    phase = env.get("phase", "sequence")  # tables of the whole-sequence phase may predate phases
    runtime = {key: env[key] for key in keys} | ({"sparsity": env["sparsity"]} if env.get("sparsity") else {})
    runtime |= {key: env[key] for key in ("fleet_device", "device_node") if key in env}  # measured on a fleet device
    if phase == "sequence":
        return runtime
    return {**runtime, "phase": phase, "context_length": env["context_length"],
            **({"new_tokens": env["new_tokens"]} if phase == "request" else {})}


def runtime_fingerprint(runtime: dict[str, Any]) -> str:
    """Names the environment a latency was measured in (runtime, version, device, threads, batch, sequence...)."""
    return fingerprint(runtime)


def environment_line(runtime: dict[str, Any]) -> str:
    """One sentence naming where something was measured (runtime json as in the reports and tables)."""
    return (f"{runtime['name']} {runtime['version']} on {runtime['device']}, {runtime['threads']} threads, batch "
            f"{runtime['batch_size']}, sequence {runtime['sequence_length']}, {runtime['precision']}"
            f"{sparsity_note(runtime)}{phase_note(runtime)}")


def sparsity_note(environment: dict[str, Any]) -> str:
    """", 80% sparse weights" where the served files are sparse ("" for dense ones and records that predate it)."""
    sparsity = environment.get("sparsity", 0.0)
    return f", {sparsity:.0%} sparse weights" if sparsity else ""


def phase_note(environment: dict[str, Any]) -> str:
    """", decode at context 512 (time per token)" for an environment (runtime json, or a latency table's) in a phase
    of generation; "" for the whole-sequence phase (and for records that predate phases)."""
    phase = environment.get("phase", "sequence")
    if phase == "sequence":
        return ""
    if phase == "request":
        return f", request of {environment['new_tokens']} new tokens ({PHASE_WORDS[phase]})"
    return f", {phase}{_at_context(environment)} ({PHASE_WORDS[phase]})"


PHASE_WORDS = {"prefill": "time to first token", "decode": "time per token", "request": "time to the last token"}


def _at_context(environment: dict[str, Any]) -> str:
    return f" at context {environment['context_length']}" if environment.get("phase") == "decode" else ""


ORIGINS = {"fine-tuned": "fine-tuned here on the task", "given": "the given model, used as it is (teacher: none)",
           "random": "random weights"}


def dense_summary(dense: PreTrainedModel, dense_onnx: Path, precision: str, metric: Metric,
                  latencies: list[TimingStats], origin: str, runtime: dict[str, Any]) -> dict[str, Any]:
    """A dense model (in `precision`): its latency is the median over the paired runs that timed the members beside
    it (`latencies`) in `runtime`; `origin` says how it came to be (a key of ORIGINS)."""
    medians = [stats.median_ms for stats in latencies]
    p90s = [stats.p90_ms for stats in latencies]
    return {
        "origin": origin,
        "precision": precision,
        "latency_ms": {"median": round(statistics.median(medians), 4), "p90": round(statistics.median(p90s), 4)},
        "metric": metric.to_json(),
        "parameters": parameter_count(dense),
        "file_bytes": dense_onnx.stat().st_size,
        "structure": structure_json(dense, ModelStructure.dense(adapter_for(dense.config).shape(dense.config))),
        "kv_cache": kv_cache_json(dense, runtime),
    }


def dense_manifest(runtime: dict[str, Any], dense_info: dict[str, Any], onnx_path: Path) -> dict[str, Any]:
    return {"name": DENSE_DIR, **dense_info, "runtime": runtime, "runtime_fingerprint": runtime_fingerprint(runtime),
            "sha256": file_digest(onnx_path), "program": program_record(onnx_path)}


def program_record(onnx_path: Path) -> dict[str, Any] | None:
    """The torch.export program beside the served file (runtime pytorch serves it): its name, size and sha256."""
    program = program_path(onnx_path)
    if not program.is_file():
        return None
    return {"file": program.name, "file_bytes": program.stat().st_size, "sha256": file_digest(program)}


def manifest(name: str, recipe: Recipe, runtime: dict[str, Any], member: Member, dense_info: dict[str, Any],
             onnx_path: Path, teacher_fingerprint: str, task: Task,
             factor: SpeedFactor | None) -> dict[str, Any]:
    check = member.final.check
    deviation = check.deviation(member.target)
    dense_latency = check.dense
    return {
        "name": name,
        "target_speedup": member.target,
        "measured_speedup": round(check.speedup.value, 4),
        "speedup_ci": check.speedup.to_json(),
        "machine_load": check.load_json(),
        "deviation": round(deviation, 4),
        "tolerance": recipe.verification.tolerance,
        "predicted_speedup": round(member.final.predicted_speedup, 4),
        "latency_ms": {"median": round(check.member.median_ms, 4), "p90": round(check.member.p90_ms, 4)},
        "dense_latency_ms": {"median": round(dense_latency.median_ms, 4), "p90": round(dense_latency.p90_ms, 4)},
        "sla": member.sla.to_json(check.member) if member.sla else None,
        "runtime": runtime,
        "runtime_fingerprint": runtime_fingerprint(runtime),
        "served_file": onnx_path.name,
        "dense_reference": f"../{DENSE_DIR}/{onnx_path.name}",
        "dense_own_precision": OWN_REFERENCE if recipe.int8_over_fp32 else None,
        "precision_factor": factor.to_json() if factor else None,
        "metric": {**member.metric.to_json(), "dense_value": dense_info["metric"]["value"],
                   "onnx_value": member.onnx_metric},
        "structure": structure_json(member.model, member.final.structure),
        "kv_cache": kv_cache_json(member.model, runtime),
        "sparsity": weight_sparsity(member.model),
        "parameters": parameter_count(member.model),
        "file_bytes": onnx_path.stat().st_size,
        "sha256": file_digest(onnx_path),
        "program": program_record(onnx_path),
        "passed": member.passed(recipe.verification.tolerance),
        "stages": recipe.stage_names,
        "speedup_reference": recipe.reference_precision,
        **speedups_by_precision(member, recipe),
        "rounds": [r.to_json(member.target) for r in member.rounds],
        "chosen_round": member.chosen,
        "teacher": {"fingerprint": teacher_fingerprint, "task": task.name, "task_fingerprint": task.fingerprint},
    }


def speedups_by_precision(member: Member, recipe: Recipe) -> dict[str, dict[str, Any] | None]:
    """INT8 members: the file timed beside the dense FP32 model and beside the dense INT8 model (the reference's is
    its verdict, the other the cross-check); FP32 members: neither (`measured_speedup` says it)."""
    if member.cross_check is None:
        return {"speedup_vs_dense_fp32": None, "speedup_vs_dense_int8": None}
    return {f"speedup_vs_dense_{recipe.reference_precision}": _speedup_json(member.final.check),
            f"speedup_vs_dense_{recipe.cross_check_precision}": _speedup_json(member.cross_check)}


def _speedup_json(check: LatencyCheck) -> dict[str, Any]:
    return {"measured_speedup": round(check.speedup.value, 4), "speedup_ci": check.speedup.to_json(),
            "measurements": [round(value, 4) for value in check.blocks], "machine_load": check.load_json(),
            "dense_latency_ms": {"median": round(check.dense.median_ms, 4), "p90": round(check.dense.p90_ms, 4)}}


def structure_json(model: PreTrainedModel, structure: ModelStructure) -> dict[str, list[int]]:
    shape = adapter_for(model.config).shape(model.config)
    return {"heads": [layer.units * shape.heads_per_unit for layer in structure.layers], **structure.to_json()}


def kv_cache_json(model: PreTrainedModel, runtime: dict[str, Any]) -> dict[str, int] | None:
    """A decoder's key/value cache (fp32 values): bytes per token of context, and at the environment's context
    (decode: its context_length; a request: its end, prompt and new tokens; else the sequence length); None for a
    model that keeps none."""
    per_token = adapter_for(model.config).kv_cache_bytes_per_token(model.config)
    if per_token is None:
        return None
    context = runtime.get("context_length") or runtime["sequence_length"] + runtime.get("new_tokens", 0)
    return {"bytes_per_token": per_token, "context_length": context, "bytes": per_token * context}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_sparsity(model: PreTrainedModel) -> float:
    """Fraction of zero weights in the prunable layers' linear projections."""
    weights = [linear.weight for linear in adapter_for(model.config).prunable_linears(model).values()]
    total = sum(w.numel() for w in weights)
    return round(sum(int((w == 0).sum()) for w in weights) / total, 6) if total else 0.0


def write_report(out: Path, recipe: Recipe, table: LatencyTable, dense_info: dict[str, Any],
                 manifests: list[dict[str, Any]], reachable: float, table_scale: float,
                 factor: SpeedFactor | None, sparsity_factor: SpeedFactor | None = None) -> dict[str, Any]:
    """`table_scale`: the table's speedups times this are speedups over the reference (verification.reference)."""
    report = {"runtime": runtime_json(table), "dense": dense_info, "members": manifests,
              "recipe": recipe.model_dump(mode="json"), "latency_table": table.fingerprint,
              "latency_table_load": table.machine_load,
              "speedup_reference": recipe.reference_precision, "table_scale": round(table_scale, 4),
              "precision_factor": factor.to_json() if factor else None,
              "sparsity_factor": sparsity_factor.to_json() if sparsity_factor else None,
              "max_reachable_speedup": round(reachable, 3),
              "fixed_cost": {"base_ms": round(table.base_ms, 3), "dense_predicted_ms": round(table.dense_ms(), 3)}}
    markdown = report_markdown(report, draw_figures(out, report))
    write_text_atomic(out / "report.md", markdown)
    write_json_atomic(out / "report.json", report)  # last: a report.json says the whole report is there
    return report


def _precision_factor_lines(report: dict[str, Any]) -> list[str]:
    factor = report["precision_factor"]
    if factor is None:
        return []
    aim = (" The INT8 latency table predicts speedups over dense INT8; the closed loop aims with them times this "
           "factor, and judges by the members timed directly beside dense FP32."
           if report["speedup_reference"] == "fp32" else "")
    return ["", f"Dense INT8 runs {factor['value']:.3f}x dense FP32 (the precision factor: median of "
                f"{factor['blocks']} paired measurements, {factor['min']:.3f}-{factor['max']:.3f}).{aim}"]


def _sparsity_factor_lines(report: dict[str, Any]) -> list[str]:
    factor = report.get("sparsity_factor")
    if factor is None:
        return []
    sparsity = report["runtime"]["sparsity"]
    return ["", f"The dense model at {sparsity:.0%} sparsity runs {factor['value']:.3f}x the dense model (the sparsity "
                f"factor: median of {factor['blocks']} paired measurements, {factor['min']:.3f}-{factor['max']:.3f}). "
                "The latency table is timed on blocks that sparse, so it predicts speedups over that model; the "
                "closed loop aims with them times this factor, and judges by the members timed beside the dense "
                "model."]


def verdict_split(member: dict[str, Any], factor: float) -> tuple[float, float]:
    """An INT8 member's verdict over dense FP32 in two parts (manifest keys): its speedup over dense INT8 times the
    precision factor, as a deviation from the target (how close the structure is in the precision it runs in), and
    the quotient of its two readings (dense INT8 over dense FP32 as they found it when it was judged)."""
    over_fp32 = member["speedup_vs_dense_fp32"]["measured_speedup"]
    over_int8 = member["speedup_vs_dense_int8"]["measured_speedup"]
    return over_int8 * factor / member["target_speedup"] - 1, over_fp32 / over_int8


def factor_drift_note(member: dict[str, Any], factor: dict[str, Any] | None) -> str:
    """A member judged over dense FP32: its verdict_split in words. A miss whose structure is on target is in how
    the machine ran dense FP32 against dense INT8 while the member was judged."""
    if factor is None or member["speedup_reference"] != "fp32":
        return ""
    in_own_precision, quotient = verdict_split(member, factor["value"])
    note = (f"; over dense INT8 times the precision factor {in_own_precision:+.1%} from the target, and by the "
            f"quotient of its two readings dense INT8 ran {quotient:.3f}x dense FP32 when it was judged "
            f"({quotient / factor['value'] - 1:+.1%} from the factor)")
    if not member["passed"] and abs(in_own_precision) <= member["tolerance"]:
        note += (": the structure is on target, and the miss is in how this machine ran dense FP32 against dense "
                 "INT8 while it was judged; verify it again on a quieter machine (`ziplm verify`)")
    return note


def draw_figures(out: Path, report: dict[str, Any]) -> list[str]:
    """<metric>_vs_speedup.png and structure.png beside report.md; returns their names."""
    members, dense = report["members"], report["dense"]
    metric = dense["metric"]["name"]
    points = [(m["measured_speedup"], m["metric"]["value"]) for m in members]
    figure = f"{metric}_vs_speedup.png"
    title = f"{report['recipe']['name']}: {metric} vs measured speedup"
    plots.metric_vs_speedup(out / figure, {"family": [(1.0, dense["metric"]["value"]), *points]},
                            dense["metric"]["value"], metric, title)
    kept = [plots.KeptStructure(m["name"], m["structure"]["heads"], m["structure"]["ffn"]) for m in members]
    dense_kept = plots.KeptStructure("dense", dense["structure"]["heads"], dense["structure"]["ffn"])
    plots.kept_per_layer(out / "structure.png", kept, dense_kept)
    return [figure, "structure.png"]


def _reachable_lines(report: dict[str, Any]) -> list[str]:
    """The largest reachable speedup, and the fixed cost it follows from (embeddings, output head: what no pruning of
    attention or FFN removes)."""
    cost = report.get("fixed_cost")
    if cost is None:  # a report written before the fixed cost was recorded
        return []
    return ["", f"The largest reachable speedup here is {report['max_reachable_speedup']:.2f}x: the latency table puts "
                f"{cost['base_ms']:.2f} ms of the dense model's {cost['dense_predicted_ms']:.2f} ms in what pruning "
                "attention and FFN modules cannot remove (embeddings, the output head)."]


def _table_load_lines(report: dict[str, Any]) -> list[str]:
    """A line when other work on the machine disturbed the latency table's timing (every member is aimed by it)."""
    loads = {timing: MachineLoad.from_json(load) for timing, load in report.get("latency_table_load", {}).items()}
    notes = [f"{timing}: {load.note('chunks')}" for timing, load in loads.items() if load.note("chunks")]
    if not notes:
        return []
    either_way = (" Some stayed busy however often they were timed again, so the table may aim members off either "
                  "way; rebuild it on a quiet machine (`ziplm latency-table --rebuild`, with the recipe's environment)."
                  if any(load.disturbed for load in loads.values()) else "")
    return ["", f"The latency table was timed while other work kept cores busy ({'; '.join(notes)}).{either_way}"]


def _extra_scores(metric: dict[str, Any]) -> str:
    """A metric's secondary scores, e.g. " (probe_accuracy 0.7820)" ("" when it has none)."""
    extra = metric.get("extra") or {}
    return f" ({', '.join(f'{name} {value:.4f}' for name, value in extra.items())})" if extra else ""


def _kv_cache_lines(report: dict[str, Any]) -> list[str]:
    dense = report["dense"].get("kv_cache")
    if dense is None:
        return []
    members = ", ".join(f"{m['name']} {m['kv_cache']['bytes_per_token'] / 1024:.1f} KiB "
                        f"({m['kv_cache']['bytes_per_token'] / dense['bytes_per_token']:.0%})"
                        for m in report["members"])
    return ["", f"Key/value cache (fp32) per token of context: dense {dense['bytes_per_token'] / 1024:.1f} KiB "
                f"({dense['bytes'] / 2**20:.1f} MiB at {dense['context_length']} tokens); {members}."]


def _other_phase_lines(report: dict[str, Any]) -> list[str]:
    """A family solved in one phase of generation, as each member does in the others (timed beside the dense
    model)."""
    lines = [f"- {m['name']}: {PHASE_WORDS[other['phase']]}{_at_context(other)} {other['measured_speedup']:.3f}x the "
             f"dense model's ({other['latency_ms']['p90']:.2f} ms p90)"
             for m in report["members"] for other in m.get("other_phases", [])]
    return ["", "In the other phases of generation:", *lines] if lines else []


def report_markdown(report: dict[str, Any], figures: list[str]) -> str:
    runtime, dense = report["runtime"], report["dense"]
    lines = [
        f"# ZipLM family: {report['recipe']['name']}",
        "",
        f"{environment_line(runtime)}. Speedups are measured end to end against the dense "
        f"{report['speedup_reference']} model, interleaved in one run: each the median of independent paired "
        "measurements, with the distribution-free interval of that median across them in brackets (at least 95% "
        "from 9 measurements on).",
        *_precision_factor_lines(report),
        *_sparsity_factor_lines(report),
        *_table_load_lines(report),
        "",
        f"Dense ({ORIGINS[dense['origin']]}): {dense['latency_ms']['median']:.2f} ms median, "
        f"{dense['metric']['name']} "
        f"{dense['metric']['value']:.4f}{_extra_scores(dense['metric'])} on "
        f"{dense['metric']['validation_size']} validation examples, {dense['parameters']:,} parameters.",
        *_reachable_lines(report),
        "",
        f"| member | target | measured speedup | deviation | rounds | p90 ms | {dense['metric']['name']} | kept heads "
        "| FFN width "
        "| passed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report["members"]:
        ci = m["speedup_ci"]
        lines.append(
            f"| {m['name']} | {m['target_speedup']:g}x | {m['measured_speedup']:.3f}x [{ci['ci_low']:.3f}, "
            f"{ci['ci_high']:.3f}] | {m['deviation']:+.1%} | {len(m['rounds'])} | {m['latency_ms']['p90']:.2f} "
            f"| {m['metric']['value']:.4f}{_extra_scores(m['metric'])} "
            f"| {' '.join(map(str, m['structure']['heads']))} "
            f"| {' '.join(map(str, m['structure']['ffn']))} | {'yes' if m['passed'] else 'NO'} |"
        )
    lines += _kv_cache_lines(report) + _other_phase_lines(report)
    lines += ["", f"Stages: {' -> '.join(report['members'][0]['stages'])}." if report["members"] else ""]
    lines += [f"- {m['name']}: {m['speedup_vs_dense_fp32']['measured_speedup']:.3f}x over the dense FP32 model, "
              f"{m['speedup_vs_dense_int8']['measured_speedup']:.3f}x over the dense INT8 model (each timed beside "
              f"it); weight sparsity {m['sparsity']:.1%}{factor_drift_note(m, report['precision_factor'])}"
              for m in report["members"] if m["speedup_vs_dense_fp32"]]
    lines += ["", *(f"![{name.removesuffix('.png')}]({name})" for name in figures)]
    return "\n".join(lines) + "\n"
