"""The chain with fine-tuning on MiniLM + MR (issue: the compound chain), each variant a real `ziplm run`.

1. gradual vs one-shot: ZipLM at 2x and 3x, one-shot (post-training) against gradual (each target pruned from the
   previous member, distilled from the teacher after each step).
2. compound: the built-in recipe minilm_mr_compound (gradual ZipLM on INT8 blocks for 3x, then 4x, over the dense
   FP32 model; distillation, gradual oBERT to 80%, INT8 QAT), each member's INT8 file timed directly beside dense
   FP32 (the verdict) and beside dense INT8 (the cross-check); the precision factor (dense INT8 over dense FP32) aims
   the INT8 table. It runs `--compound-runs` times (default 3), each with its own members and precision factor (a
   fresh stage cache that shares only the teacher, the latency table and the database built from the teacher), so
   the table says how often each target passes.

    python -m benchmarks.compound [--skip-gradual] [--skip-compound] [--compound-runs N] [--append]

writes benchmarks/results/compound.md and .json; a skipped part keeps the figures of the run that last measured it
(each part, and each compound run, records the commit it was measured at). Compound runs are kept and tabled per CPU
(kernels, and so speedups, differ between CPU generations; one table's tallies count one CPU): a new sitting replaces
the stored runs of this machine's CPU and keeps the others, or with `--append` adds to them. A gradual compound run
takes 60-100 minutes on 2 cores, so several runs can be gathered over several sittings (at one commit, or the table
says which runs were measured where). The stages are cached like any `ziplm run` (a second run reuses them); the
numbers are those of the run that built them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np

from benchmarks.common import RESULTS, head_commit, progress, write_results
from ziplm.cache import cache_root
from ziplm.pipeline.recipe import Recipe, load_recipe
from ziplm.pipeline.report import environment_line, verdict_split
from ziplm.pipeline.run import run_recipe
from ziplm.runtimes import get_runtime
from ziplm.runtimes.policy import policy
from ziplm.stages.chain import Distill
from ziplm.stages.ziplm import ZipLMSettings

COMMAND = "python -m benchmarks.compound"
ACCURACY_POINTS = 1.5  # the issue: the compound artifact within 1.5 points of the dense teacher
RESULT_KEYS = ("name", "target_speedup", "measured_speedup", "speedup_ci", "speedup_reference", "speedup_vs_dense_fp32",
               "speedup_vs_dense_int8", "metric", "structure", "sparsity", "passed", "stages", "file_bytes", "rounds")


def run_variant(recipe: Recipe) -> dict[str, Any]:
    start, commit = time.perf_counter(), head_commit()  # the code that runs, whatever is committed meanwhile
    with tempfile.TemporaryDirectory(prefix="ziplm-compound-") as out:
        report = run_recipe(recipe, Path(out), progress)
    return {"commit": commit, "recipe": recipe.model_dump(mode="json"), "runtime": report["runtime"],
            "dense": report["dense"],
            "table_scale": report["table_scale"], "precision_factor": report["precision_factor"],
            "members": [{key: member[key] for key in RESULT_KEYS} for member in report["members"]],
            "seconds": round(time.perf_counter() - start, 1)}


@contextmanager
def independent_members() -> Iterator[None]:
    """A fresh stage cache for one run, sharing the teacher, data, latency tables and the ZipLM database (which do
    not depend on timing) with the real one: the dense exports, the precision factor and the members are new."""
    shared = cache_root()
    with tempfile.TemporaryDirectory(prefix="ziplm-compound-cache-") as tmp:
        root = Path(tmp)
        for entry in shared.iterdir():
            if entry.name != "stages":
                (root / entry.name).symlink_to(entry)
        (root / "stages").mkdir()
        for stage in ("calibrate", "database"):
            (shared / "stages" / stage).mkdir(parents=True, exist_ok=True)
            (root / "stages" / stage).symlink_to(shared / "stages" / stage)
        with patch.dict(os.environ, {"ZIPLM_CACHE": str(root)}):
            yield


def compound_runs(count: int) -> list[dict[str, Any]]:
    runs = []
    for _ in range(count):
        with independent_members():
            runs.append(run_variant(load_recipe("minilm_mr_compound")))
    return runs


def this_device() -> str:
    """The device string this machine's runs record (the CPU's model, family and instruction sets)."""
    return get_runtime(load_recipe("minilm_mr_compound").environment).info().device


def by_device(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs grouped by the device they were measured on, in the order each device first appears."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["runtime"]["device"], []).append(run)
    return groups


def gradual_vs_oneshot() -> dict[str, Any]:
    oneshot = load_recipe("minilm_mr").model_copy(update={"targets": [2.0, 3.0]})
    gradual = oneshot.model_copy(update={"name": "minilm-mr-gradual", "ziplm": ZipLMSettings(gradual=True),
                                         "chain": [Distill()]})
    return {"oneshot": run_variant(oneshot), "gradual": run_variant(gradual)}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# The chain with fine-tuning: gradual ZipLM, and the compound INT8 artifact (MiniLM + MR)", ""]
    if "gradual_vs_oneshot" in result:
        lines += _gradual_markdown(result["gradual_vs_oneshot"])
    for runs in by_device(result.get("compound_runs", [])).values():
        lines += _compound_markdown(runs)
    return "\n".join(lines + [f"Reproduce: `{COMMAND}`.", ""])


def _gradual_markdown(result: dict[str, Any]) -> list[str]:
    oneshot, gradual = result["oneshot"], result["gradual"]
    dense = oneshot["dense"]["metric"]["value"]
    epochs = chain_summary(gradual["recipe"])["first"]["epochs"]
    lines = ["## Gradual ZipLM with distillation vs one-shot ZipLM", "",
             f"{environment_line(oneshot['runtime'])}. Dense teacher accuracy {dense:.4f} on 500 validation examples. "
             f"Gradual: each target pruned from the previous member, then distilled ({epochs} epochs, l2 = l3 = 0.5, "
             "T = 2); one-shot: pruned from the teacher, no fine-tuning.", "",
             "| target | one-shot speedup | one-shot accuracy | gradual speedup | gradual accuracy "
             "| gradual rounds (closed loop / fine-tuned) | gradual within 3% |",
             "|---|---|---|---|---|---|---|"]
    for o, g in zip(oneshot["members"], gradual["members"]):
        finished = sum(r["stage"] == "finished" for r in g["rounds"])
        lines.append(f"| {o['target_speedup']:g}x | {o['measured_speedup']:.3f}x | {o['metric']['value']:.4f} "
                     f"| {g['measured_speedup']:.3f}x | {g['metric']['value']:.4f} "
                     f"| {len(g['rounds']) - finished} / {finished} | {'yes' if g['passed'] else 'NO'} |")
    return lines + ["", f"Wall-clock with the teacher and table cached: one-shot {oneshot['seconds']:.0f} s, gradual "
                    f"{gradual['seconds']:.0f} s. Measured at commit {gradual['commit']}.", ""]


def chain_summary(recipe: dict[str, Any]) -> dict[str, Any]:
    """Whether a stored run was gradual, and the distillation right after structured pruning (`first`) and the one of
    the later stages (`later`), from its recipe as dumped: an ordered chain (now), or the chain mapping runs stored
    before the chain became a list (distillation, structured_distillation, gradual)."""
    chain = recipe["chain"]
    if isinstance(chain, dict):
        first = {**chain["distillation"], **chain.get("structured_distillation", {})}
        return {"gradual": chain["gradual"], "first": first, "later": chain["distillation"]}
    stages = {name: settings for entry in chain for name, settings in entry.items()}
    first = stages.get("distill", {})
    later = stages.get("obert", stages.get("qat", {})).get("distillation", first)
    return {"gradual": recipe["ziplm"]["gradual"], "first": first, "later": later}


def measurement(recipe: dict[str, Any]) -> dict[str, Any]:
    """How a stored run measured: the verification keys runs stored before `effort`, or the effort's policy."""
    if "effort" not in recipe:
        return recipe["verification"]
    used = policy(recipe["effort"])
    return {"round_repeats": used.round_repeats, "finished_repeats": used.verdict_repeats,
            "max_verdict_repeats": used.max_verdict_repeats, "verdict_width": used.verdict_width}


def by_stage(round_: dict[str, Any]) -> dict[str, float]:
    """A finished round's metric after each stage (stored as accuracy_by_stage before the task layer)."""
    return round_.get("metric_by_stage", round_.get("accuracy_by_stage", {}))


def _verdict_rule(runs: list[dict[str, Any]]) -> str:
    """How the runs' verdicts were taken, in words (runs from before verdicts settled took a fixed number)."""
    numbers: dict[str, list[int]] = {}
    for number, run in enumerate(runs, 1):
        verification = measurement(run["recipe"])
        rule = f"{verification['finished_repeats']} paired measurements"
        if "max_verdict_repeats" in verification:
            rule = (f"at least {rule}, two more at a time while the 95% interval of their median reaches further "
                    f"than {verification['verdict_width']:.0%} from it, at most {verification['max_verdict_repeats']}")
        numbers.setdefault(rule, []).append(number)
    if len(numbers) == 1:
        return next(iter(numbers))
    return "; ".join(f"{rule} (run{'s' if len(n) > 1 else ''} {', '.join(map(str, n))})" for rule, n in numbers.items())


def _compound_markdown(runs: list[dict[str, Any]]) -> list[str]:
    first = runs[0]
    dense = first["dense"]["metric"]["value"]
    members = [(i + 1, run, m) for i, run in enumerate(runs) for m in run["members"]]
    chain = chain_summary(first["recipe"])
    distillation, structured = chain["later"], chain["first"]
    verification = {**first["recipe"]["verification"], **measurement(first["recipe"])}
    confirmed = any("screening_measurements" in r for _, _, m in members for r in m["rounds"])
    confirmation = (", as does the fresh reading that confirms a closed-loop round before its structure is fine-tuned "
                    "(`screened`: the round's first reading)") if confirmed else ""
    targets = " then ".join(f"{t:g}x" for t in first["recipe"]["targets"])
    ziplm = "gradual ZipLM" if chain["gradual"] else "ZipLM"
    lines = [f"## Compound on {first['runtime']['device']}: {ziplm} (INT8 table) + distillation + gradual oBERT 80% "
             f"+ INT8 QAT, {targets} over dense FP32", "",
             f"{environment_line(first['runtime'])}. The target is the speedup over the dense FP32 model, and each "
             "INT8 file is timed directly beside it, paired: that reading is its verdict. The INT8 table is solved for "
             "the target divided by the precision factor (dense INT8 over dense FP32, the median of "
             f"{first['precision_factor']['blocks']} paired measurements), which only aims. A closed-loop round reads "
             f"the median of {verification.get('round_repeats', 1)} paired measurements, a fine-tuned file the median "
             f"of {_verdict_rule(runs)}{confirmation}. The chosen file is also timed beside dense INT8 the same way "
             "(the cross-check); times the factor, that is the product an earlier version judged by. "
             f"Distillation: {structured['epochs']} epochs at learning rate {structured['learning_rate']:g} after "
             f"structured pruning, {distillation['epochs']} at {distillation['learning_rate']:g} after each oBERT step "
             "and for QAT. "
             f"{len(runs)} independent run{'s' if len(runs) > 1 else ''} (own members, own precision factor): "
             f"{_tallies([m for _, _, m in members], dense, verification['tolerance'])}.", "",
             "| run | target | vs dense FP32 (95% CI) | deviation | vs dense INT8 (95% CI) | precision factor (range) "
             "| vs INT8 x factor | accuracy: torch fake-quant / ONNX INT8 | teacher | sparsity "
             "| closed-loop rounds / fine-tuned | passed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for index, run, m in members:
        fp32, int8, factor = m["speedup_vs_dense_fp32"], m["speedup_vs_dense_int8"], run["precision_factor"]
        finished = sum(r["stage"] == "finished" for r in m["rounds"])
        lines.append(f"| {index} | {m['target_speedup']:g}x | {_speedup(fp32)} "
                     f"| {fp32['measured_speedup'] / m['target_speedup'] - 1:+.1%} "
                     f"| {_speedup(int8)} | {factor['value']:.3f} ({factor['min']:.3f}-{factor['max']:.3f}) "
                     f"| {int8['measured_speedup'] * factor['value']:.3f}x "
                     f"| {m['metric']['value']:.4f} / {m['metric']['onnx_value']:.4f} | {dense:.4f} "
                     f"| {m['sparsity']:.1%} | {len(m['rounds']) - finished} / {finished} "
                     f"| {'yes' if m['passed'] else 'NO'} |")
    lines += ["", "Rounds (speedups over dense FP32):", "",
              "| run | target | stage | solved for | predicted | screened | measured | heads | FFN "
              "| accuracy after each stage |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for index, _, m in members:
        for r in m["rounds"]:
            heads = " ".join(str(u) for u in r["structure"]["units"])
            screening = r.get("screening_measurements")
            screened = f"{sorted(screening)[len(screening) // 2]:.3f}x" if screening else ""
            lines.append(f"| {index} | {m['target_speedup']:g}x | {r['stage']} | {r['solved_for']:.3f}x "
                         f"| {r['predicted_speedup']:.3f}x "
                         f"| {screened} | {r['measured_speedup']:.3f}x | {heads} "
                         f"| {' '.join(map(str, r['structure']['ffn']))} "
                         f"| {' / '.join(f'{v:.3f}' for v in by_stage(r).values())} |")
    lines += _reread_markdown(members)
    lines += _factor_markdown(members, verification["tolerance"])
    seconds = ", ".join(f"{run['seconds']:.0f} s" for run in runs)
    commits = [run["commit"] for run in runs]
    measured = (f"commit {commits[0]}" if len(set(commits)) == 1
                else "commits " + ", ".join(f"{commit} (run {i + 1})" for i, commit in enumerate(commits)))
    if any(by_stage(r) for _, _, m in members for r in m["rounds"]):
        lines += ["", "Accuracy after each stage (finished rounds): distillation / gradual oBERT / INT8 calibration "
                  "(post-training, before QAT) / INT8 QAT."]
    databases = "the first database" if chain["gradual"] else "the database"
    return lines + ["", f"Stages: {' -> '.join(first['members'][0]['stages'])}. Wall-clock per run with the teacher, "
                    f"table and {databases} cached: {seconds}. Measured at {measured}.", ""]


def _reread_markdown(members: list[tuple[int, dict[str, Any], dict[str, Any]]]) -> list[str]:
    """Each finished file beside the closed-loop reading that chose its structure: the same structure (its speed does
    not depend on the weights) read twice, a fine-tuning (25-45 min) apart."""
    lines = ["", "The same structure read twice: the closed-loop reading that chose it for fine-tuning, and its "
             "finished file's verdict, a fine-tuning apart. No aim puts a finished file closer to the target than this "
             "spread, which is the host's, not the table's:", "",
             "| run | target | chosen on | finished | change |", "|---|---|---|---|---|"]
    changes = []
    for index, _, m in members:
        for i, finished in enumerate(m["rounds"]):
            if finished["stage"] != "finished":
                continue
            chosen = next(r for r in reversed(m["rounds"][:i])
                          if r["stage"] == "closed loop" and r["structure"] == finished["structure"])
            changes.append(finished["measured_speedup"] / chosen["measured_speedup"] - 1)
            lines.append(f"| {index} | {m['target_speedup']:g}x | {_reading(chosen)} | {_reading(finished)} "
                         f"| {changes[-1]:+.1%} |")
    if len(changes) > 1:
        lines += ["", f"Root mean square change: {_rms(changes):.1%} over "
                  f"{len(changes)} structures."]
    return lines


def _factor_markdown(members: list[tuple[int, dict[str, Any], dict[str, Any]]], tolerance: float) -> list[str]:
    """Each chosen file's verdict split in two: its speedup over dense INT8 (the cross-check) times the run's
    precision factor, and the quotient of its two readings (dense INT8 over dense FP32 as it read when judged)."""
    lines = ["", "Where the misses come from: a chosen file's speedup over dense INT8 (the cross-check) times the "
             "precision factor measured at the start of its run says how close its structure is to the target in the "
             "precision it runs in; its verdict over its cross-check is dense INT8 over dense FP32 as the two readings "
             "found it, which carries both how the machine's relative speed of the two moved and the scatter of the "
             "reading beside dense FP32. The two readings are minutes apart, or a later fine-tuning apart where the "
             "member fine-tuned another structure after the chosen one (`apart`). Block scatter: the SD of the log "
             "speedups of a reading's measurements:", "",
             "| run | target | vs INT8 x factor at start: deviation | factor at start | verdict / cross-check | change "
             "| apart | block scatter beside FP32 / INT8 | verdict: deviation |",
             "|---|---|---|---|---|---|---|---|---|"]
    on_target, changes, scatter, by_run = [], [], {"fp32": [], "int8": []}, {}
    for index, run, m in members:
        start = run["precision_factor"]["value"]
        deviation, quotient = verdict_split(m, start)
        on_target.append(deviation)
        changes.append(quotient / start - 1)
        by_run.setdefault(index, []).append(quotient)
        for precision in scatter:
            scatter[precision].append(float(np.std(np.log(m[f"speedup_vs_dense_{precision}"]["measurements"]))))
        verdict = m["speedup_vs_dense_fp32"]["measured_speedup"] / m["target_speedup"] - 1
        lines.append(f"| {index} | {m['target_speedup']:g}x | {deviation:+.1%} | {start:.3f} | {quotient:.3f} "
                     f"| {changes[-1]:+.1%} | {_apart(m)} | {scatter['fp32'][-1]:.1%} / {scatter['int8'][-1]:.1%} "
                     f"| {verdict:+.1%} |")
    within_run = [max(quotients) / min(quotients) - 1 for quotients in by_run.values() if len(quotients) > 1]
    between_members = (f", and differed by up to {max(within_run):.1%} between the files of one run" if within_run
                       else "")
    return lines + ["", f"Against dense INT8 times the starting factor, every chosen file is within "
                    f"{max(map(abs, on_target)):.1%} of its target ({sum(abs(d) <= tolerance for d in on_target)} of "
                    f"{len(on_target)} within {tolerance:.0%}). The quotient sat {_rms(changes):.1%} root mean square "
                    f"from the starting factor ({max(map(abs, changes)):.1%} at most){between_members}; the blocks "
                    f"beside dense FP32 scattered {np.median(scatter['fp32']):.1%} (median over these files), those "
                    f"beside dense INT8 {np.median(scatter['int8']):.1%}. A file exactly on target against dense INT8 "
                    "reads against dense FP32 with that spread."]


def _apart(member: dict[str, Any]) -> str:
    """How long the member's rounds after the one it chose took: the time between its verdict and the cross-check
    (which is taken once the member is done)."""
    rounds = member["rounds"]
    chosen = max(i for i, r in enumerate(rounds)
                 if r["stage"] == "finished" and abs(r["measured_speedup"] - member["measured_speedup"]) < 1e-4)
    minutes = sum(sum(r["seconds"].values()) for r in rounds[chosen + 1:]) / 60
    return f"{minutes:.0f} min" if minutes >= 1 else "minutes"


def _rms(values: list[float]) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


def _reading(round_: dict[str, Any]) -> str:
    return f"{round_['measured_speedup']:.3f}x ({len(round_['measurements'])} measurements)"


def _tallies(members: list[dict[str, Any]], dense: float, tolerance: float) -> str:
    """Per target: how many members are at or over it, within tolerance of it (`passed`), and within ACCURACY_POINTS
    of the teacher."""
    tallies = []
    for target in sorted({m["target_speedup"] for m in members}):
        at = [m for m in members if m["target_speedup"] == target]
        over = sum(m["speedup_vs_dense_fp32"]["measured_speedup"] >= target for m in at)
        close = sum(dense - m["metric"]["value"] <= ACCURACY_POINTS / 100 for m in at)
        passed = sum(m["passed"] for m in at)
        tallies.append(f"**{target:g}x: {over} of {len(at)} at or over the target, {passed} of {len(at)} within "
                       f"{tolerance:.0%} of it, {close} of {len(at)} within {ACCURACY_POINTS:g} points of the "
                       "teacher's accuracy**")
    return "; ".join(tallies)


def _speedup(check: dict[str, Any]) -> str:
    ci = check["speedup_ci"]
    return f"{check['measured_speedup']:.3f}x ({ci['ci_low']:.3f}-{ci['ci_high']:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-gradual", action="store_true")
    parser.add_argument("--skip-compound", action="store_true")
    parser.add_argument("--compound-runs", type=int, default=3)
    parser.add_argument("--append", action="store_true", help="add the compound runs to the stored ones")
    args = parser.parse_args()
    previous = RESULTS / "compound.json"  # a skipped part keeps its figures from the last run, marked as such
    result: dict[str, Any] = json.loads(previous.read_text()) if previous.exists() else {}
    result.pop("compound", None)  # one run of the compound recipe, measured directly beside FP32 (before 2026-11-22)
    result["command"] = COMMAND
    if not args.skip_compound:
        here = this_device()
        kept = [run for run in result.get("compound_runs", []) if args.append or run["runtime"]["device"] != here]
        result["compound_runs"] = kept + compound_runs(args.compound_runs)
    if not args.skip_gradual:
        result["gradual_vs_oneshot"] = gradual_vs_oneshot()
    RESULTS.mkdir(exist_ok=True)
    write_results("compound", result, markdown(result))


if __name__ == "__main__":
    main()
