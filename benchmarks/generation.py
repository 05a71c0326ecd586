"""Generation-phase speedup guarantees on SmolLM2-135M (Shakespeare): families solved for time per output token
(decode, one token on a KV cache of `--context-length` tokens), for time to first token (prefill of the recipe's
256-token prompt) and for a whole request (the prompt, then `--new-tokens` greedy tokens), all from one database.

Each member goes through the closed loop in the phase it is solved for, timed on generation.onnx paired and
interleaved beside the dense model's. Beside it: its speedup in the other phases (each the median of `round_repeats`
paired measurements, as `ziplm run` reports them), its perplexity on the recipe's validation blocks and its
key/value-cache bytes.

    python -m benchmarks.generation [--phases decode prefill request] [--targets 1.25 1.5 2] [--context-length 512]
        [--new-tokens 32] [--recipe smollm2_shakespeare]

writes benchmarks/results/generation.md and .json; the stored families of phases not run again are kept.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, head_commit, progress, stage_cache, write_results
from ziplm.cache import StageCache
from ziplm.families import adapter_for
from ziplm.pipeline.recipe import Recipe, load_recipe
from ziplm.pipeline.report import environment_line, runtime_json
from ziplm.pipeline.run import Family, Inputs, build_family, other_phases, prepare_inputs
from ziplm.runtimes.policy import policy
from ziplm.stages.closed_loop import PHASE_LABELS, Member

COMMAND = "python -m benchmarks.generation"
PHASES = ["decode", "prefill", "request"]


def run(recipe_name: str, phases: list[str], targets: list[float], context_length: int,
        new_tokens: int) -> dict[str, Any]:
    recipe = load_recipe(recipe_name).model_copy(update={"targets": targets})
    environments = {"decode": recipe.environment.in_phase("decode", context_length),
                    "prefill": recipe.environment.in_phase("prefill"),
                    "request": recipe.environment.in_phase("request", new_tokens=new_tokens)}
    commit, results = head_commit(), []
    with tempfile.TemporaryDirectory(prefix="ziplm-generation-") as work:
        stages = StageCache(Path(work), progress)  # members measured afresh; one database for every phase
        for phase in phases:
            variant = recipe.model_copy(update={"environment": environments[phase]})
            start = time.perf_counter()
            inputs = prepare_inputs(variant, stage_cache())  # the tables are the product's, cached
            table_seconds = time.perf_counter() - start
            family = build_family(variant, inputs, stages)
            results.append({**phase_result(variant, inputs, family, table_seconds, time.perf_counter() - start),
                            "commit": commit})
    return {"recipe": recipe.name, "model": recipe.model, "targets": targets, "phases": results,
            "tolerance": recipe.verification.tolerance, "max_rounds": recipe.verification.max_rounds,
            "round_repeats": policy(recipe.effort).round_repeats}


def phase_result(recipe: Recipe, inputs: Inputs, family: Family, table_seconds: float,
                 seconds: float) -> dict[str, Any]:
    dense = inputs.dense
    per_token = adapter_for(dense.config).kv_cache_bytes_per_token(dense.config)
    return {"phase": recipe.environment.phase, "label": PHASE_LABELS[recipe.environment.phase],
            "runtime": runtime_json(inputs.table), "table": inputs.table.fingerprint,
            "max_reachable_speedup": round(family.refs.reachable(inputs.table), 3),
            "dense": {"perplexity": family.refs.dense.value.value, "kv_bytes_per_token": per_token,
                      "latency_ms": round(family.members[0].final.check.dense.median_ms, 4)},
            "rows": [row(recipe, inputs, family, member) for member in family.members],
            "seconds": {"inputs": round(table_seconds), "total": round(seconds)}}


def row(recipe: Recipe, inputs: Inputs, family: Family, member: Member) -> dict[str, Any]:
    check, tolerance = member.final.check, recipe.verification.tolerance
    model = member.model
    assert member.metric is not None  # scored by build_family
    return {"target_speedup": member.target, "measured_speedup": round(check.speedup.value, 4),
            "ci": [round(check.speedup.ci_low, 4), round(check.speedup.ci_high, 4)],
            "deviation": round(check.deviation(member.target), 4),
            "within_tolerance": abs(check.deviation(member.target)) <= tolerance, "rounds": len(member.rounds),
            "latency_ms": round(check.member.median_ms, 4),
            "other_phases": other_phases(recipe, inputs, family.refs, member),
            "perplexity": member.metric.value,
            "kv_bytes_per_token": adapter_for(model.config).kv_cache_bytes_per_token(model.config),
            "structure": member.final.structure.to_json()}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Generation: time per output token, time to first token and whole requests, recipe "
             f"{result['recipe']}", "",
             "Families from one database, each solved in one phase of generation and verified there: a member's "
             "generation.onnx is timed paired and interleaved beside the dense model's (median of per-round ratios, "
             f"95% interval), re-solved until within {result['tolerance']:.0%} (at most {result['max_rounds']} "
             "rounds). Each other phase is the median of "
             f"{result['round_repeats']} paired measurements of the same files. Perplexity on the recipe's validation "
             "blocks; key/value cache in fp32.", ""]
    for phase in result["phases"]:
        lines += _phase_lines(phase)
    return "\n".join(lines + [f"Reproduce: `{result['command']}` (defaults: every phase, targets 1.25 1.5 2, context "
                               "512, 32 new tokens).", ""])


def _phase_lines(phase: dict[str, Any]) -> list[str]:
    label, dense = phase["label"], phase["dense"]
    others = [(PHASE_LABELS[other["phase"]] + _at(other), other) for other in phase["rows"][0]["other_phases"]]
    runtime = phase["runtime"]
    context = runtime.get("context_length") or runtime["sequence_length"] + runtime.get("new_tokens", 0)
    kv = dense["kv_bytes_per_token"]
    dense_others = ", ".join(f"{name} {other['dense_latency_ms']['median']:.2f} ms" for name, other in others)
    lines = [f"## Solved for {label}", "", f"{environment_line(runtime)}.", "",
             f"Dense: {label} {dense['latency_ms']:.2f} ms (median), {dense_others}, perplexity "
             f"{dense['perplexity']:.2f}, key/value cache {kv / 1024:.1f} KiB per token "
             f"({kv * context / 2**20:.1f} MiB at {context} tokens). The largest reachable {label} speedup is "
             f"{phase['max_reachable_speedup']:.2f}x.",
             "", f"| target | {label} speedup (95% CI) | deviation | rounds | {label} ms | "
             + " | ".join(f"{name} speedup" for name, _ in others) + " | perplexity | KV cache per token |",
             "|---|---|---|---|---|" + "---|" * len(others) + "---|---|"]
    for r in phase["rows"]:
        kv_member = r["kv_bytes_per_token"]
        lines.append(
            f"| {r['target_speedup']:g}x | {r['measured_speedup']:.3f}x ({r['ci'][0]:.3f}-{r['ci'][1]:.3f}) "
            f"| {r['deviation']:+.1%}{'' if r['within_tolerance'] else ' (outside)'} | {r['rounds']} "
            f"| {r['latency_ms']:.2f} | " + "".join(f"{o['measured_speedup']:.2f}x | " for o in r["other_phases"])
            + f"{r['perplexity']:.2f} | {kv_member / 1024:.1f} KiB ({kv_member / kv:.0%}) |")
    within = sum(r["within_tolerance"] for r in phase["rows"])
    return lines + ["", f"{within} of {len(phase['rows'])} members within the tolerance. Task, model and latency table "
                    f"ready in {phase['seconds']['inputs']} s (the table is cached after its first build); "
                    f"{phase['seconds']['total']} s with the family, at commit {phase['commit']}.", ""]


def _at(other: dict[str, Any]) -> str:
    return f" at context {other['context_length']}" if other["phase"] == "decode" else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=PHASES, help="the families to build")
    parser.add_argument("--targets", type=float, nargs="+", default=[1.25, 1.5, 2])
    parser.add_argument("--context-length", type=int, default=512, help="decode: the cache a token is timed on")
    parser.add_argument("--new-tokens", type=int, default=32, help="request: the tokens a request generates")
    parser.add_argument("--recipe", default="smollm2_shakespeare", help="a decoder recipe (built-in name or file)")
    args = parser.parse_args()
    result = run(args.recipe, args.phases, sorted(args.targets), args.context_length, args.new_tokens)
    stored = RESULTS / "generation.json"
    if stored.exists() and set(args.phases) != set(PHASES):  # keep the stored families of phases not run again
        kept = [p for p in json.loads(stored.read_text())["phases"] if p["phase"] not in args.phases]
        result["phases"] = sorted(kept + result["phases"], key=lambda p: PHASES.index(p["phase"]))
    result["command"] = COMMAND
    write_results("generation", result, markdown(result))


if __name__ == "__main__":
    main()
