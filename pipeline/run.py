"""The chain behind `ziplm run`: teacher -> latency table -> dense reference -> calibration -> database -> per goal
(a speedup target or a latency SLA): search, stitch, export, verify (closed loop) -> member folders and the report.

Every stage (teacher, table, dense references, calibration, database, each member) is one `StageCache.run` call
keyed by a fingerprint of exactly its inputs, whose folder holds files only (ziplm/cache.py): a killed run resumes
where it stopped, and a changed recipe rebuilds only the stages that depend on the change. The output folder gets
the dense reference (`dense/`), one folder per member (each written under a temporary name and renamed when
complete) and the report.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ziplm.cache import (StageCache, StageProgress, StageResult, atomic_directory, cache_root, file_digest,
                         write_json_atomic)
from ziplm.errors import UnreachableTargetError
from ziplm.families import adapter_for
from ziplm.families.loading import load_config, load_model, save_model
from ziplm.pipeline import modeling_ziplm
from ziplm.pipeline.environments import run_environments
from ziplm.pipeline.recipe import Recipe
from ziplm.pipeline.report import (DENSE_DIR, OWN_DIR, dense_manifest, dense_summary, manifest, program_record,
                                   runtime_json, write_report)
from ziplm.runtimes import InferenceEnv, SessionModule, get_runtime
from ziplm.runtimes.base import Precision
from ziplm.runtimes import fleet
from ziplm.runtimes.paired import PairedVerifier, SpeedFactor, verifier_for
from ziplm.runtimes.policy import FINISH_ROUNDS, MeasurementPolicy, policy
from ziplm.runtimes.pytorch import PROGRAM_SUFFIX
from ziplm.runtimes.timing import TimingStats
from ziplm.stages import ziplm as zipl
from ziplm.stages.calibrate import collect_hessians, load_hessians, save_hessians
from ziplm.stages.chain import finish
from ziplm.stages.closed_loop import PHASE_LABELS, LatencySLA, Member, Stopwatch, closed_loop
from ziplm.stages.export import copy_served, with_program, writes_program
from ziplm.stages.finetune import TeacherResult, finetune_teacher, given_teacher
from ziplm.stages.generation import (GENERATION_ONNX, PARITY_TOKENS, check_generation, export_for_generation,
                                     export_served_checked, generation_prompt, served_feeds, served_file,
                                     serving_runtime)
from ziplm.stages.latency_table import LatencyTable, get_or_build_table
from ziplm.stages.quantize import deployable, example_batches
from ziplm.stages.quantize import load_model as load_deployed
from ziplm.tasks import Metric, Task, load_task

Goal = tuple[float, LatencySLA | None]  # the speedup a member is solved for, and the SLA it serves (if any)


@dataclass
class Inputs:
    """What every family is built from: the task, the dense model (keyed by `dense_key`) and the latency table."""

    task: Task
    dense: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    table: LatencyTable
    dense_key: str
    teacher: TeacherResult | None = None

    @property
    def dense_origin(self) -> str:
        """How the dense model came to be: "fine-tuned" here, "given" (`teacher: none`), or "random" weights."""
        if self.teacher is None:
            return "random"
        return "given" if self.teacher.given else "fine-tuned"


def prepare_inputs(recipe: Recipe, stages: StageCache) -> Inputs:
    """The task, the dense teacher (fine-tuned here, or the given model with `teacher: none`) and the latency table
    (the stages every family of the recipe shares)."""
    progress = stages.stage("task")
    adapter_for(load_config(recipe.model))  # an unsupported architecture fails before anything is trained
    task = load_task(recipe.task)
    if recipe.teacher == "none" or not recipe.task.fine_tunes:
        task, teacher = given_teacher(recipe.model, task, stages)  # the task as the model reads it (LM: its blocks)
    else:
        teacher = finetune_teacher(recipe.model, task, recipe.teacher, stages=stages)
    progress(f"{task.name}: {len(task.train)} train / {len(task.validation)} validation / "
             f"{len(task.calibration)} calibration examples")
    dense = load_model(str(teacher.path), task.head)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher.path))
    table, _ = get_or_build_table(dense.config, recipe.environment, recipe.latency_table.group_size,
                                  measurement(recipe), stages=stages)
    return Inputs(task, dense, tokenizer, table, teacher.fingerprint, teacher)


def run_recipe(recipe: Recipe, out: Path, stage: StageProgress) -> dict[str, Any]:
    """Run the whole chain; write out/dense, one folder per member, out/report.json and out/report.md (several
    environments: one such folder each, out/<environment>, and a comparison: pipeline/environments.py)."""
    stages = StageCache(cache_root() / "stages", stage)
    fleet.prepare(recipe.ray, [recipe.environment, *recipe.environments.values()])
    if recipe.environments:
        return run_environments(recipe, out, lambda variant, folder: run_family(variant, folder, stages),
                                stages.stage("environment"))
    return run_family(recipe, out, stages)


def run_family(recipe: Recipe, out: Path, stages: StageCache) -> dict[str, Any]:
    """The family of a recipe of one environment, written to `out`; its report."""
    inputs = prepare_inputs(recipe, stages)
    return write_family(recipe, inputs, build_family(recipe, inputs, stages), out)


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
        if database is None or recipe.ziplm.gradual:
            database = database_stage(recipe, inputs, start, stages)
        member = member_stage(recipe, inputs, start, goal, database, refs, stages)
        members.append(member.value)
        if recipe.ziplm.gradual:
            start = Start(member.value.structured, member.key)
    return Family(refs, members, database.value)


@dataclass
class Start:
    """The model a goal is pruned from, and the cache key it is known by."""

    model: PreTrainedModel
    key: str


@dataclass
class References:
    """The dense models members are measured against, and how.

    `dense` is the reference, the model the goals' speedups are over (written to OUT/dense, where `ziplm verify`
    finds it); every member is timed beside it, paired (`verifier`). INT8 families also have the dense model in the
    other precision, and time the chosen file beside it too (`cross`): its speedup over dense FP32 and over dense
    INT8 are both in its manifest. When the reference is dense FP32, the dense INT8 model is `own` (written to
    OUT/dense-int8) and the INT8 latency table's speedups are turned into speedups over FP32 with the precision
    factor. A chain that leaves the weights sparse has its table timed on sparse blocks: its speedups are over the
    dense model at that sparsity, turned into speedups over the dense model with the sparsity factor. The two make
    `table_scale`: it aims the closed loop, the direct measurements judge.
    """

    dense: StageResult[Metric]
    verifier: PairedVerifier
    own: StageResult[Metric] | None = None
    cross: PairedVerifier | None = None
    precision_factor: SpeedFactor | None = None
    sparsity_factor: SpeedFactor | None = None

    @property
    def table_scale(self) -> float:
        """The latency table's speedups (over the dense model in the environment's precision and sparsity) times
        this are speedups over the reference."""
        precision = self.precision_factor.value if self.own and self.precision_factor else 1.0
        return precision * (self.sparsity_factor.value if self.sparsity_factor else 1.0)

    def reachable(self, table: LatencyTable) -> float:
        return table.max_speedup() * self.table_scale


def references(recipe: Recipe, inputs: Inputs, stages: StageCache) -> References:
    env = recipe.environment
    own = dense_stage(recipe, inputs, env.precision, stages)
    beside_own = dense_verifier(recipe, inputs, own)
    sparsity = sparsity_factor(recipe, inputs, own, beside_own, stages) if env.sparsity else None
    if env.precision == "fp32":
        return References(own, beside_own, sparsity_factor=sparsity)
    fp32 = dense_stage(recipe, inputs, "fp32", stages)
    beside_fp32 = dense_verifier(recipe, inputs, fp32)
    factor = precision_factor(recipe, own, fp32, beside_fp32, stages)
    if recipe.int8_over_fp32:
        return References(fp32, beside_fp32, own, beside_own, factor, sparsity)
    return References(own, beside_own, None, beside_fp32, factor, sparsity)


def precision_factor(recipe: Recipe, int8: StageResult[Metric], fp32: StageResult[Metric], direct: PairedVerifier,
                     stages: StageCache) -> SpeedFactor:
    """Dense INT8 over dense FP32, the median of the policy's `precision_blocks` paired measurements (cached)."""
    return speed_factor(recipe, "precision-factor", {"int8": int8.key, "fp32": fp32.key}, direct,
                        lambda folder: int8.path / "model.onnx", "dense int8 runs {} dense fp32", stages)


def sparsity_factor(recipe: Recipe, inputs: Inputs, own: StageResult[Metric], direct: PairedVerifier,
                    stages: StageCache) -> SpeedFactor:
    """The dense model at the environment's sparsity (its smallest weights zeroed, as the table's blocks) over the
    dense model, both in the environment's precision (cached, the file in the stage's folder)."""
    env = recipe.environment

    def sparse_dense(folder: Path) -> Path:
        onnx = folder / served_file(env)
        sparse = deployer(recipe, inputs, env.precision, env.sparsity)(inputs.dense)
        export_served_checked(inputs.task.served(sparse), onnx, env)
        return onnx

    return speed_factor(recipe, "sparsity-factor", {"dense": own.key, "sparsity": env.sparsity}, direct,
                        sparse_dense, f"the dense model at {env.sparsity:.0%} sparsity runs {{}} the dense model",
                        stages)


def speed_factor(recipe: Recipe, stage: str, key: dict[str, Any], slower: PairedVerifier,
                 faster: Callable[[Path], Path], words: str, stages: StageCache) -> SpeedFactor:
    """How much faster the file `faster(folder)` gives runs than `slower`'s dense model: the median of the policy's
    `precision_blocks` paired measurements, a cached stage."""
    blocks = measurement(recipe).precision_blocks
    measured: StageResult[SpeedFactor] = stages.run(
        stage, key | {"effort": recipe.effort},
        lambda folder, progress: write_json_atomic(folder / RECORD, SpeedFactor.measure(
            slower, faster(folder), blocks).to_record()),
        lambda folder: SpeedFactor.from_record(read_record(folder)))
    factor = measured.value
    stages.stage(stage)(f"{words.format(f'{factor.value:.3f}x')} (median of {len(factor.blocks)} paired blocks, "
                        f"{min(factor.blocks):.3f}-{max(factor.blocks):.3f})")
    return factor


def dense_stage(recipe: Recipe, inputs: Inputs, precision: Precision, stages: StageCache) -> StageResult[Metric]:
    env = recipe.environment
    return stages.run("dense", {"model": inputs.dense_key, "batch_size": env.batch_size,
                                "sequence_length": env.sequence_length, "task": inputs.task.fingerprint,
                                **_precision(recipe, precision),
                                **({"served": served_file(env)} if env.phase != "sequence" else {}),
                                **({"program": True} if writes_program(env) else {})},  # its file has a program
                      lambda folder, progress: write_json_atomic(
                          folder / RECORD, export_dense(inputs, recipe, precision, folder, progress).to_json()),
                      lambda folder: Metric.from_json(read_record(folder)),
                      label="dense" if precision == recipe.reference_precision else f"dense {precision}")


def dense_verifier(recipe: Recipe, inputs: Inputs, dense: StageResult[Metric]) -> PairedVerifier:
    """Measures members timed beside this dense model, paired, in the recipe's environment."""
    env = recipe.environment
    return verifier_for(serving_runtime(env), env, dense.path / served_file(env),
                        served_feeds(inputs.dense.config, env), measurement(recipe), recipe.verification.tolerance)


def measurement(recipe: Recipe) -> MeasurementPolicy:
    """How hard the recipe's effort measures (runtimes.policy)."""
    return policy(recipe.effort)


def database_stage(recipe: Recipe, inputs: Inputs, start: Start, stages: StageCache) -> StageResult[zipl.Database]:
    adapter = adapter_for(start.model.config)
    hessians = stages.run("calibrate", {"model": start.key, "task": inputs.task.fingerprint,
                                        "settings": recipe.calibration.model_dump(), "records": "stream energy",
                                        "layout": "by layer"},
                          lambda folder, progress: save_hessians(collect_hessians(
                              start.model, inputs.tokenizer, adapter, inputs.task, recipe.calibration, progress),
                              folder), load_hessians)
    group_size = inputs.table.group_size
    return stages.run("database", {"hessians": hessians.key, "settings": recipe.ziplm.model_dump(exclude={"gradual"}),
                                   "group_size": group_size},
                      lambda folder, progress: zipl.save_database(zipl.build_database(
                          start.model, adapter, hessians.value, group_size, recipe.ziplm, progress,
                          fleet.run_passes if fleet.connected() else None), folder),
                      zipl.load_database)


def export_dense(inputs: Inputs, recipe: Recipe, precision: Precision, folder: Path,
                 progress: Callable[[str], None]) -> Metric:
    """The dense reference ONNX in the environment's shape, as its phase serves it (folder/model.onnx, or
    generation.onnx); returns the dense model's metric."""
    env = recipe.environment.model_copy(update={"precision": precision})
    deployed = deployer(recipe, inputs, precision)(inputs.dense)
    onnx = folder / served_file(env)
    checked = export_served_checked(inputs.task.served(deployed), onnx, env)
    progress(f"exported the dense reference in {precision} ({onnx.stat().st_size:,} bytes, {checked})")
    return inputs.task.evaluate(inputs.dense, inputs.tokenizer)


def _precision(recipe: Recipe, precision: Precision) -> dict[str, Any]:
    """What a stage's output depends on through the deployed precision (part of its cache key)."""
    return {"precision": precision, "quantization": recipe.quantization.model_dump() if precision == "int8" else None}


def deployer(recipe: Recipe, inputs: Inputs, precision: Precision,
             sparsity: float = 0.0) -> Callable[[PreTrainedModel], PreTrainedModel]:
    """A model as it is deployed in `precision` with `sparsity` zeros (INT8: activation scales calibrated on the task's
    calibration split; ziplm.stages.quantize.deployable is the one place that decides)."""
    batches = example_batches(inputs.tokenizer, inputs.task) if precision == "int8" else []
    adapter = adapter_for(inputs.dense.config)
    return lambda model: deployable(model, adapter.prunable_linears, precision, batches, recipe.quantization,
                                    sparsity)


def sla_goals(recipe: Recipe, inputs: Inputs, refs: References, stages: StageCache) -> list[Goal]:
    """Each SLA as a speedup target over the reference, from its latency measured alone in the environment."""
    if not recipe.slas:
        return []
    settings = recipe.verification
    latency: StageResult[TimingStats] = stages.run(
        "dense-latency", {"dense": refs.dense.key, "table": inputs.table.fingerprint, "effort": recipe.effort},
        lambda folder, progress: write_json_atomic(folder / RECORD, refs.verifier.measure_dense().to_record()),
        lambda folder: TimingStats(tuple(read_record(folder))))
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
    adapter, deploy = adapter_for(start.model.config), deployer(recipe, inputs, env.precision, env.sparsity)
    stitch = lambda structure: zipl.stitch(start.model, adapter, database.value, structure)  # noqa: E731

    # a round read within the tolerance is confirmed by a verdict of fresh measurements (the loop stops on the first
    # reading near the target, so that reading is biased toward it); a structure the chain fine-tunes is accepted when
    # that verdict is within half the tolerance: its fine-tuned file is measured again and has the whole tolerance to
    # land in
    fine_tunes = bool(recipe.chain)
    accept = recipe.verification.tolerance / (2 if fine_tunes else 1)

    def build(folder: Path, progress: Callable[[str], None]) -> None:
        def loop(member: Member | None = None) -> Member:
            return closed_loop(target, lambda speedup: zipl.solve(database.value, inputs.table, speedup),
                               lambda structure: deploy(stitch(structure)),
                               lambda model, path: export_served_checked(inputs.task.served(model), path, env),
                               inputs.table, refs.verifier,
                               recipe.verification, folder, progress, sla, refs.table_scale, member, accept,
                               confirm=True)

        member = loop()
        for finishing in range(FINISH_ROUNDS if fine_tunes else 0):
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
        save_member(member, folder)

    return stages.run("member", {"database": database.key, "start": start.key, "dense": refs.dense.key,
                                   "table": inputs.table.fingerprint, "table_scale": refs.table_scale,
                                   "target": target, "sla": sla.model_dump() if sla else None,
                                   "verification": recipe.verification.model_dump(), "effort": recipe.effort,
                                   **_precision(recipe, env.precision), "task": inputs.task.fingerprint,
                                   "chain": [stage.cache_key() for stage in recipe.chain]},
                        build, lambda folder: load_member(folder, inputs.task.head),
                        label=sla.label if sla else f"{target:g}x")


MEMBER_RECORD, MEMBER_MODEL, MEMBER_STRUCTURED, MEMBER_ONNX = "member.json", "model", "structured", "model.onnx"


def save_member(member: Member, folder: Path) -> None:
    """A member stage's files: its record, the chosen model (and the structured one gradual ZipLM goes on from) as
    saved models, and the chosen ONNX file (with its program, where one was written); the other rounds' files are
    dropped."""
    write_json_atomic(folder / MEMBER_RECORD, member.to_record())
    save_model(member.model, folder / MEMBER_MODEL)
    if member.structured is not None:
        save_model(member.structured, folder / MEMBER_STRUCTURED)
    for file in with_program(member.onnx_path):
        file.replace((folder / MEMBER_ONNX).with_suffix(file.suffix))
    for scratch in [*folder.glob("*.onnx"), *folder.glob(f"*{PROGRAM_SUFFIX}")]:
        if scratch.stem != Path(MEMBER_ONNX).stem:
            scratch.unlink()


def load_member(folder: Path, head: str) -> Member:
    structured = folder / MEMBER_STRUCTURED
    return Member.from_record(read_record(folder, MEMBER_RECORD), load_deployed(str(folder / MEMBER_MODEL), head),
                              load_deployed(str(structured), head) if structured.is_dir() else None,
                              folder / MEMBER_ONNX)


RECORD = "record.json"  # a stage's value, where it is one JSON document


def read_record(folder: Path, name: str = RECORD) -> Any:
    return json.loads((folder / name).read_text())


def finish_member(member: Member, stitched: PreTrainedModel, recipe: Recipe, inputs: Inputs,
                  deploy: Callable[[PreTrainedModel], PreTrainedModel], verifier: PairedVerifier, folder: Path,
                  progress: Callable[[str], None]) -> None:
    """The chain's fine-tuning of the structure the closed loop chose; the file is measured again (a finished round)."""
    clock = Stopwatch()
    finished = clock.time("fine-tune", finish, stitched, inputs.dense, inputs.tokenizer, inputs.task, recipe.chain,
                          recipe.quantization, progress)
    model = clock.time("build", deploy, finished.model)
    onnx = folder / f"finished{len(member.rounds)}.onnx"
    clock.time("export", export_served_checked, inputs.task.served(model), onnx, recipe.environment)
    check = clock.time("verify", verifier.verdict, onnx)
    member.finish(model, finished.structured, onnx, check, clock.seconds, finished.metric_by_stage)
    progress(f"finished: measured {check.speedup.value:.3f}x ({check.interval_note()}){check.load_note()}")


def score_member(member: Member, recipe: Recipe, inputs: Inputs, refs: References,
                 progress: Callable[[str], None]) -> None:
    """The task's metric in torch; for INT8 also the file's own (integer kernels round differently) and its speedup
    over the dense model in the other precision."""
    task, tokenizer = inputs.task, inputs.tokenizer
    member.metric = task.evaluate(member.model, tokenizer)
    if refs.cross:
        member.cross_check = refs.cross.verdict(member.onnx_path)
        member.onnx_metric = task.evaluate(SessionModule(refs.verifier.runtime.load(member.onnx_path)), tokenizer).value
        progress(f"timed beside the dense {recipe.cross_check_precision} model: "
                 f"{member.cross_check.speedup.value:.3f}x; {member.metric.name} {member.metric.value:.4f} in torch, "
                 f"{member.onnx_metric:.4f} as ONNX")


def write_family(recipe: Recipe, inputs: Inputs, family: Family, out: Path) -> dict[str, Any]:
    """The dense reference folder, the member folders and the report."""
    runtime = runtime_json(inputs.table)
    refs = family.refs
    dense_info = write_dense(out / DENSE_DIR, refs.dense, recipe.reference_precision,
                             [member.final.check.dense for member in family.members], inputs, runtime,
                             served_file(recipe.environment), writes_program(recipe.environment))
    if refs.own:
        write_dense(out / OWN_DIR, refs.own, recipe.environment.precision,
                    [member.cross_check.dense for member in family.members if member.cross_check], inputs, runtime)
    manifests = [write_member(recipe, runtime, member, inputs, dense_info, refs, out) for member in family.members]
    return write_report(out, recipe, inputs.table, dense_info, manifests, refs.reachable(inputs.table),
                        refs.table_scale, refs.precision_factor, refs.sparsity_factor)


def write_dense(folder_path: Path, dense: StageResult[Metric], precision: Precision, latencies: list[TimingStats],
                inputs: Inputs, runtime: dict[str, Any], served: str = "model.onnx",
                program: bool = False) -> dict[str, Any]:
    """A dense model's folder (the file its phase serves: model.onnx or generation.onnx, with its program where the
    runtime serves one; a decoder's generation.onnx; manifest.json); returns its summary."""
    dense_onnx = dense.path / served
    info = dense_summary(inputs.dense, dense_onnx, precision, dense.value, latencies, inputs.dense_origin, runtime)
    with atomic_directory(folder_path) as folder:
        copy_served(dense_onnx, folder / served)
        generation = write_generation_artifact(inputs.dense, folder, precision, program)
        write_json_atomic(folder / "manifest.json",
                          {**dense_manifest(runtime, info, folder / served), "generation": generation})
    return info


def member_name(recipe: Recipe, member: Member) -> str:
    sla = member.sla
    if sla is None:
        return f"{recipe.name}-{member.target:g}x"
    phase = f"{PHASE_LABELS[sla.phase].lower()}-" if sla.phase else ""  # e.g. name-tpot-p90-25ms
    return f"{recipe.name}-{phase}{sla.metric}-{sla.ms:g}ms"


def loadable_with_transformers(folder: Path, head: str) -> None:
    """Make a saved member load with transformers' Auto class of its head (`trust_remote_code=True`): a copy of
    pipeline/modeling_ziplm.py in the folder, named in config.json's `auto_map`."""
    auto_class, loader = modeling_ziplm.AUTO_CLASSES[head]
    shutil.copyfile(modeling_ziplm.__file__, folder / "modeling_ziplm.py")
    config = json.loads((folder / "config.json").read_text())
    write_json_atomic(folder / "config.json", {**config, "auto_map": {auto_class: f"modeling_ziplm.{loader}"}})


def write_member(recipe: Recipe, runtime: dict[str, Any], member: Member, inputs: Inputs, dense_info: dict[str, Any],
                 refs: References, out: Path) -> dict[str, Any]:
    """The member folder (the file its phase serves: model.onnx or generation.onnx; weights, config.json, tokenizer,
    manifest.json), written atomically."""
    name = member_name(recipe, member)
    served = served_file(recipe.environment)
    with atomic_directory(out / name) as folder:
        save_model(member.model, folder)
        loadable_with_transformers(folder, inputs.task.head)
        inputs.tokenizer.save_pretrained(folder)
        copy_served(member.onnx_path, folder / served)
        payload = manifest(name, recipe, runtime, member, dense_info, folder / served, inputs.dense_key,
                           inputs.task, refs.precision_factor)
        payload["generation"] = write_generation_artifact(member.model, folder, recipe.environment.precision,
                                                          writes_program(recipe.environment))
        payload["other_phases"] = other_phases(recipe, inputs, refs, member)
        write_json_atomic(folder / "manifest.json", payload)
    return payload


def other_phases(recipe: Recipe, inputs: Inputs, refs: References, member: Member) -> list[dict[str, Any]]:
    """A member solved in one phase of generation, timed in the others beside the dense model, each the median of
    `round_repeats` paired measurements: solved for prefill, the decode step right after the prompt (a cache of
    sequence_length); for decode, the prefill of sequence_length tokens; for a whole request, both (the decode
    step at the request's mean cache length). Empty in the whole-sequence phase."""
    env = recipe.environment
    others = {"sequence": [], "prefill": [env.in_phase("decode", env.decode_context)],
              "decode": [env.in_phase("prefill")], "request": list(env.request_phases())}[env.phase]
    return [phase_timing(recipe, inputs, refs, member, other) for other in others]


def phase_timing(recipe: Recipe, inputs: Inputs, refs: References, member: Member,
                 env: InferenceEnv) -> dict[str, Any]:
    """The member's generation artifact timed in `env` (a phase of generation) beside the dense model's."""
    verifier = verifier_for(get_runtime(env), env, refs.dense.path / GENERATION_ONNX,
                            served_feeds(inputs.dense.config, env), measurement(recipe), recipe.verification.tolerance)
    check = verifier.measure(member.onnx_path, verifier.policy.round_repeats)
    return {"phase": env.phase, "context_length": env.context_length,
            "measured_speedup": round(check.speedup.value, 4), "speedup_ci": check.speedup.to_json(),
            "latency_ms": {"median": round(check.member.median_ms, 4), "p90": round(check.member.p90_ms, 4)},
            "dense_latency_ms": {"median": round(check.dense.median_ms, 4), "p90": round(check.dense.p90_ms, 4)}}


def write_generation_artifact(model: PreTrainedModel, folder: Path, precision: Precision,
                              program: bool = False) -> dict[str, Any] | None:
    """A decoder's generation.onnx (ziplm.stages.generation: KV cache in and out; with `program`, its torch.export
    program beside it), exported unless the folder holds it already (the file a generation phase serves), and checked
    by greedy generation in ONNX Runtime against transformers' generate; its manifest entry. None for a model without
    a KV cache, and for INT8 members, whose generation artifact is not built yet."""
    if adapter_for(model.config).kv_cache_bytes_per_token(model.config) is None or precision != "fp32":
        return None
    path = folder / GENERATION_ONNX
    if not path.is_file():
        export_for_generation(model, path, program)
    parity = check_generation(model, path, generation_prompt(model), PARITY_TOKENS)
    return {"file": GENERATION_ONNX, "file_bytes": path.stat().st_size, "sha256": file_digest(path),
            "program": program_record(path), "greedy_parity_tokens": parity.new_tokens}
