"""The chain behind `ziplm run`: teacher -> latency table -> dense reference -> calibration -> database -> per goal
(a speedup target or a latency SLA): search, stitch, export, verify (closed loop) -> member folders and the report.

Each stage after the teacher and the table (which keep their own caches) is one `StageCache.run` call keyed by a
fingerprint of exactly its inputs (ziplm/pipeline/cache.py): a killed run resumes where it stopped, and a changed
recipe rebuilds only the stages that depend on the change. The output folder gets the dense reference (`dense/`),
one folder per member (each written under a temporary name and renamed when complete) and the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ziplm.families import adapter_for
from ziplm.families.loading import load_config, load_model, save_model
from ziplm.pipeline.cache import StageCache, StageProgress, StageResult, atomic_directory, cache_root
from ziplm.pipeline.cache import write_json_atomic
from ziplm.pipeline.chain import finish
from ziplm.pipeline.errors import UnreachableTargetError
from ziplm.pipeline.recipe import Recipe
from ziplm.pipeline.report import DENSE_DIR, dense_manifest, dense_summary, manifest, runtime_json, write_report
from ziplm.pipeline.tasks import TaskData, load_task
from ziplm.runtimes import get_runtime
from ziplm.runtimes.base import Precision
from ziplm.runtimes.latency_table import LatencyTable, get_or_build_table
from ziplm.runtimes.timing import TimingStats
from ziplm.stages import ziplm as zipl
from ziplm.stages.calibrate import collect_hessians
from ziplm.stages.export import export_checked
from ziplm.stages.finetune import TeacherResult, evaluate_accuracy, finetune_teacher
from ziplm.stages.quantize import deployable, example_batches
from ziplm.stages.search import max_speedup
from ziplm.stages.verify import LatencySLA, Member, PairedVerifier, SessionClassifier, Stopwatch, closed_loop

Goal = tuple[float, LatencySLA | None]  # the speedup a member is solved for, and the SLA it serves (if any)


@dataclass
class Inputs:
    """What every family is built from: the task, the dense model (keyed by `dense_key`) and the latency table."""

    task: TaskData
    dense: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    table: LatencyTable
    dense_key: str
    teacher: TeacherResult | None = None


def prepare_inputs(recipe: Recipe, stage: StageProgress) -> Inputs:
    progress = stage("teacher")
    adapter_for(load_config(recipe.model))  # an unsupported architecture fails before anything is trained
    task = load_task(recipe.task)
    progress(f"task {task.name}: {len(task.train)} train / {len(task.validation)} validation / "
             f"{len(task.calibration)} calibration examples")
    teacher = finetune_teacher(recipe.model, task, recipe.teacher, progress=progress)
    progress(f"{'cached' if teacher.cached else 'trained'}: {teacher.path}")
    dense = load_model(str(teacher.path))
    tokenizer = AutoTokenizer.from_pretrained(str(teacher.path))
    table, cached = get_or_build_table(dense.config, recipe.environment, recipe.latency_table, progress=stage("table"))
    if cached:
        stage("table")(f"cached ({table.fingerprint})")
    return Inputs(task, dense, tokenizer, table, teacher.fingerprint, teacher)


def run_recipe(recipe: Recipe, out: Path, stage: StageProgress) -> dict[str, Any]:
    """Run the whole chain; write out/dense, one folder per member, out/report.json and out/report.md."""
    inputs = prepare_inputs(recipe, stage)
    family = build_family(recipe, inputs, StageCache(cache_root() / "stages", stage))
    return write_family(recipe, inputs, family, out)


@dataclass
class Family:
    refs: References
    members: list[Member]
    database: zipl.Database


def build_family(recipe: Recipe, inputs: Inputs, stages: StageCache) -> Family:
    """Export the dense references; then per goal, in increasing order: calibrate, build the database, run the closed
    loop and the chain's fine-tuning. One-shot ZipLM prunes every goal from the dense model (one set of Hessians,
    one database); gradual ZipLM prunes each goal from the previous member (calibrated and searched again)."""
    refs = references(recipe, inputs, stages)
    for target in recipe.targets:  # fail before the expensive work, and name the largest reachable speedup
        check_reachable(f"speedup {target:g}x", target, refs.reachable(inputs.table))
    goals = sorted([(target, None) for target in recipe.targets] + sla_goals(recipe, inputs, refs, stages),
                   key=lambda goal: goal[0])
    start, members, database = Start(inputs.dense, inputs.dense_key), [], None
    for goal in goals:
        if database is None or recipe.chain.gradual:
            database = database_stage(recipe, inputs, start, stages)
        member = member_stage(recipe, inputs, start, goal, database, refs, stages)
        members.append(member.value)
        if recipe.chain.gradual:
            start = Start(member.value.structured, member.key)
    return Family(refs, members, database.value)


@dataclass
class Start:
    """The model a goal is pruned from, and the cache key it is known by."""

    model: PreTrainedModel
    key: str


@dataclass
class References:
    """The dense models members are measured against, each exported in one precision and held by a verifier.

    `dense` is the one the goals' speedups are over (written to OUT/dense, where `ziplm verify` finds it). An INT8
    family is also measured against the dense model in the other precision (`cross`). `table_scale` turns the
    latency table's speedups (over the dense model in the environment's precision) into speedups over `dense`.
    """

    dense: StageResult[float]
    verifier: PairedVerifier
    cross: PairedVerifier | None = None
    table_scale: float = 1.0

    def reachable(self, table: LatencyTable) -> float:
        return max_speedup(table) * self.table_scale


def references(recipe: Recipe, inputs: Inputs, stages: StageCache) -> References:
    dense = dense_stage(recipe, inputs, recipe.reference_precision, stages)
    verifier = dense_verifier(recipe, inputs, dense)
    if recipe.cross_precision is None:
        return References(dense, verifier)
    cross_dense = dense_stage(recipe, inputs, recipe.cross_precision, stages)
    scale = (1.0 if recipe.reference_precision == recipe.environment.precision
             else table_scale(recipe, dense, cross_dense, verifier, stages))
    return References(dense, verifier, dense_verifier(recipe, inputs, cross_dense), scale)


def table_scale(recipe: Recipe, reference: StageResult[float], table_dense: StageResult[float],
                verifier: PairedVerifier, stages: StageCache) -> float:
    """How much faster the dense model in the table's precision runs than the reference, measured paired (cached).
    The closed loop corrects what this one measurement gets wrong."""
    measured: StageResult[float] = stages.run(
        "table-scale", {"reference": reference.key, "table_dense": table_dense.key,
                        "verification": recipe.verification.model_dump()},
        lambda _, progress: verifier.measure(table_dense.path / "model.onnx").speedup.value)
    stages.stage("table-scale")(f"dense {recipe.environment.precision} runs {measured.value:.3f}x dense "
                                f"{recipe.reference_precision}: the latency table is solved for the targets / that")
    return measured.value


def dense_stage(recipe: Recipe, inputs: Inputs, precision: Precision, stages: StageCache) -> StageResult[float]:
    env = recipe.environment
    return stages.run("dense", {"model": inputs.dense_key, "batch_size": env.batch_size,
                                "sequence_length": env.sequence_length, "max_length": recipe.teacher.max_length,
                                **_precision(recipe, precision)},
                      lambda folder, progress: export_dense(inputs, recipe, precision, folder, progress),
                      label="dense" if precision == recipe.reference_precision else f"dense {precision}")


def dense_verifier(recipe: Recipe, inputs: Inputs, dense: StageResult[float]) -> PairedVerifier:
    """Measures members against this dense reference, paired, in the recipe's environment."""
    env = recipe.environment
    return PairedVerifier(get_runtime(env), env, dense.path / "model.onnx", inputs.dense.config.vocab_size,
                          recipe.verification)


def database_stage(recipe: Recipe, inputs: Inputs, start: Start, stages: StageCache) -> StageResult[zipl.Database]:
    adapter = adapter_for(start.model.config)
    hessians = stages.run("calibrate", {"model": start.key, "task": inputs.task.fingerprint,
                                        "settings": recipe.calibration.model_dump()},
                          lambda _, progress: collect_hessians(start.model, inputs.tokenizer, adapter,
                                                               inputs.task.calibration, recipe.calibration, progress))
    group_size = inputs.table.group_size
    return stages.run("database", {"hessians": hessians.key, "settings": recipe.ziplm.model_dump(),
                                   "group_size": group_size},
                      lambda _, progress: zipl.build_database(start.model, adapter, hessians.value, group_size,
                                                              recipe.ziplm, progress))


def export_dense(inputs: Inputs, recipe: Recipe, precision: Precision, folder: Path,
                 progress: Callable[[str], None]) -> float:
    """The dense reference ONNX (folder/model.onnx) in the environment's shape; returns the dense accuracy."""
    env = recipe.environment
    deployed = deployer(recipe, inputs, precision)(inputs.dense)
    onnx = folder / "model.onnx"
    parity = export_checked(deployed, onnx, env.model_copy(update={"precision": precision}))
    progress(f"exported the dense reference in {precision} ({onnx.stat().st_size:,} bytes, "
             f"parity {parity.max_abs_diff:.1e})")
    return evaluate_accuracy(inputs.dense, inputs.tokenizer, inputs.task.validation, recipe.teacher.max_length)


def _precision(recipe: Recipe, precision: Precision) -> dict[str, Any]:
    """What a stage's output depends on through the deployed precision (part of its cache key)."""
    return {"precision": precision, "quantization": recipe.quantization.model_dump() if precision == "int8" else None}


def deployer(recipe: Recipe, inputs: Inputs, precision: Precision) -> Callable[[PreTrainedModel], PreTrainedModel]:
    """A model as it is deployed in `precision` (INT8: activation scales calibrated on the task's calibration split;
    ziplm.stages.quantize.deployable is the one place that decides)."""
    batches = (example_batches(inputs.tokenizer, inputs.task.calibration, recipe.quantization)
               if precision == "int8" else [])
    adapter = adapter_for(inputs.dense.config)
    return lambda model: deployable(model, adapter.prunable_linears, precision, batches)


def sla_goals(recipe: Recipe, inputs: Inputs, refs: References, stages: StageCache) -> list[Goal]:
    """Each SLA as a speedup target over the reference, from its latency measured alone in the environment."""
    if not recipe.slas:
        return []
    settings = recipe.verification
    latency: StageResult[TimingStats] = stages.run(
        "dense-latency", {"dense": refs.dense.key, "table": inputs.table.fingerprint, "rounds": settings.timing_rounds,
                          "warmup": settings.warmup},
        lambda _, progress: refs.verifier.measure_dense())
    goals = [(max(sla.speedup_target(latency.value, settings.tolerance), 1.0), sla) for sla in recipe.slas]
    for target, sla in goals:
        check_reachable(f"SLA {sla.label} needs a {target:.2f}x speedup over the dense model (measured {sla.metric} "
                        f"{sla.ms * target * (1 - settings.tolerance):.2f} ms), but it", target,
                        refs.reachable(inputs.table), "relax the SLA or serve with more threads")
    return goals  # a target of 1: the dense model already meets a looser SLA


def check_reachable(goal: str, target: float, reachable: float, fix: str = "lower the target") -> None:
    if target > reachable:
        raise UnreachableTargetError(
            f"{goal} cannot be reached in this environment: the largest reachable speedup is {reachable:.2f}x "
            f"(every module removed, as the latency table predicts); {fix}")


def member_stage(recipe: Recipe, inputs: Inputs, start: Start, goal: Goal, database: StageResult[zipl.Database],
                 refs: References, stages: StageCache) -> StageResult[Member]:
    """One member, cached: the closed loop from `start`, the chain's fine-tuning, accuracy; its ONNX files live in
    the stage folder."""
    target, sla = goal
    env = recipe.environment
    adapter, deploy = adapter_for(start.model.config), deployer(recipe, inputs, env.precision)
    stitch = lambda structure: zipl.stitch(start.model, adapter, database.value, structure)  # noqa: E731

    def build(folder: Path, progress: Callable[[str], None]) -> Member:
        def loop(member: Member | None = None) -> Member:
            return closed_loop(target, lambda speedup: zipl.solve(database.value, inputs.table, speedup),
                               lambda structure: deploy(stitch(structure)), inputs.table, refs.verifier, folder,
                               progress, sla, refs.table_scale, member)

        member = loop()
        for finishing in range(recipe.verification.finish_rounds if recipe.chain.fine_tunes else 0):
            if finishing > 0:  # the fine-tuned file missed: measure on from every round so far, then fine-tune again
                progress("the fine-tuned file missed the target: the closed loop goes on")
                loop(member)
            if member.to_finish is None:
                break  # no structure left that was not fine-tuned (and measured) already
            finish_member(member, stitch(member.to_finish.structure), recipe, inputs, deploy, refs.verifier, folder,
                          progress)
            if member.passed(recipe.verification.tolerance):
                break
        score_member(member, recipe, inputs, refs, progress)
        member.onnx_paths = [path.relative_to(folder) for path in member.onnx_paths]  # the folder gets renamed
        return member

    result = stages.run("member", {"database": database.key, "start": start.key, "dense": refs.dense.key,
                                   "table": inputs.table.fingerprint, "table_scale": refs.table_scale,
                                   "target": target, "sla": sla.model_dump() if sla else None,
                                   "verification": recipe.verification.model_dump(),
                                   **_precision(recipe, env.precision), "chain": recipe.chain.model_dump(),
                                   "max_length": recipe.teacher.max_length},
                        build, label=sla.label if sla else f"{target:g}x")
    member = dataclasses.replace(result.value, onnx_paths=[result.path / p for p in result.value.onnx_paths])
    return dataclasses.replace(result, value=member)


def finish_member(member: Member, stitched: PreTrainedModel, recipe: Recipe, inputs: Inputs,
                  deploy: Callable[[PreTrainedModel], PreTrainedModel], verifier: PairedVerifier, folder: Path,
                  progress: Callable[[str], None]) -> None:
    """The chain's fine-tuning of the structure the closed loop chose; the file is measured again (a finished round)."""
    clock = Stopwatch()
    finished = clock.time("fine-tune", finish, stitched, inputs.dense, inputs.tokenizer, inputs.task, recipe.chain,
                          recipe.quantization, progress)
    model = clock.time("build", deploy, finished.model)
    onnx = folder / f"finished{len(member.rounds)}.onnx"
    clock.time("export", export_checked, model, onnx, recipe.environment)
    check = clock.time("verify", verifier.measure, onnx, recipe.verification.finished_repeats)
    member.finish(model, finished.structured, onnx, check, clock.seconds)
    progress(f"finished: measured {member.rounds[-1].check.speedup.value:.3f}x")


def score_member(member: Member, recipe: Recipe, inputs: Inputs, refs: References,
                 progress: Callable[[str], None]) -> None:
    """Accuracy in torch; for INT8 also the file's own accuracy (integer kernels round differently) and its speedup
    against the dense model in the other precision."""
    def accuracy(model: nn.Module) -> float:
        return evaluate_accuracy(model, inputs.tokenizer, inputs.task.validation, recipe.teacher.max_length)

    member.accuracy = accuracy(member.model)
    if refs.cross:
        member.cross_check = refs.cross.measure(member.onnx_path)
        member.onnx_accuracy = accuracy(SessionClassifier(refs.verifier.runtime.load(member.onnx_path)))
        progress(f"against the dense {recipe.cross_precision} model: {member.cross_check.speedup.value:.3f}x; "
                 f"accuracy {member.accuracy:.4f} in torch, {member.onnx_accuracy:.4f} as ONNX")


def write_family(recipe: Recipe, inputs: Inputs, family: Family, out: Path) -> dict[str, Any]:
    """The dense reference folder, the member folders and the report."""
    runtime = runtime_json(inputs.table)
    dense_onnx = family.refs.dense.path / "model.onnx"
    dense_info = dense_summary(inputs.dense, dense_onnx, recipe.reference_precision, family.refs.dense.value,
                               len(inputs.task.validation), family.members)
    with atomic_directory(out / DENSE_DIR) as folder:
        (folder / "model.onnx").write_bytes(dense_onnx.read_bytes())
        write_json_atomic(folder / "manifest.json", dense_manifest(runtime, dense_info, folder / "model.onnx"))
    manifests = [write_member(recipe, runtime, member, inputs, dense_info, out) for member in family.members]
    return write_report(out, recipe, inputs.table, dense_info, manifests, family.refs.reachable(inputs.table),
                        family.refs.table_scale)


def member_name(recipe: Recipe, member: Member) -> str:
    goal = f"{member.sla.metric}-{member.sla.ms:g}ms" if member.sla else f"{member.target:g}x"
    return f"{recipe.name}-{goal}"


def write_member(recipe: Recipe, runtime: dict[str, Any], member: Member, inputs: Inputs, dense_info: dict[str, Any],
                 out: Path) -> dict[str, Any]:
    """The member folder (model.onnx, weights, config.json, tokenizer, manifest.json), written atomically."""
    name = member_name(recipe, member)
    with atomic_directory(out / name) as folder:
        save_model(member.model, folder)
        inputs.tokenizer.save_pretrained(folder)
        (folder / "model.onnx").write_bytes(member.onnx_path.read_bytes())
        payload = manifest(name, recipe, runtime, member, dense_info, folder / "model.onnx", inputs.dense_key,
                           inputs.task)
        write_json_atomic(folder / "manifest.json", payload)
    return payload
