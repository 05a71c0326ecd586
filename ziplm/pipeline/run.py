"""The chain behind `ziplm run`: teacher -> latency table -> calibration -> database -> per target: search, stitch,
export, verify (closed loop) -> member folders and the report.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ziplm.families import adapter_for
from ziplm.families.loading import load_model, save_model
from ziplm.pipeline.cache import atomic_directory, write_json_atomic
from ziplm.pipeline.recipe import Recipe
from ziplm.pipeline.report import dense_summary, manifest, runtime_json, write_report
from ziplm.pipeline.tasks import Example, TaskData, load_task
from ziplm.runtimes import get_runtime
from ziplm.runtimes.latency_table import LatencyTable, get_or_build_table
from ziplm.stages import ziplm as zipl
from ziplm.stages.calibrate import collect_hessians
from ziplm.stages.export import export_model, parity_atol, verify_export
from ziplm.stages.finetune import TeacherResult, evaluate_accuracy, finetune_teacher
from ziplm.stages.quantize import QuantSettings, deployable, example_batches
from ziplm.stages.search import max_speedup, module_budget
from ziplm.stages.verify import Member, PairedVerifier, closed_loop

StageProgress = Callable[[str], Callable[[str], None]]


@dataclass
class Inputs:
    """What every family is built from: the task, the dense teacher and the latency table (all cached)."""

    task: TaskData
    teacher: TeacherResult
    dense: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    table: LatencyTable


def prepare_inputs(recipe: Recipe, stage: StageProgress) -> Inputs:
    progress = stage("teacher")
    task = load_task(recipe.task)
    progress(f"task {task.name}: {len(task.train)} train / {len(task.validation)} validation / "
             f"{len(task.calibration)} calibration examples")
    teacher = finetune_teacher(recipe.model, task, recipe.teacher, progress=progress)
    progress(f"{'cached' if teacher.cached else 'trained'}: {teacher.path}")
    dense = load_model(str(teacher.path))
    tokenizer = AutoTokenizer.from_pretrained(str(teacher.path))
    table, _ = get_or_build_table(dense.config, recipe.environment, recipe.latency_table, progress=stage("table"))
    return Inputs(task, teacher, dense, tokenizer, table)


def run_recipe(recipe: Recipe, out: Path, stage: StageProgress) -> dict[str, Any]:
    """Run the whole chain; write out/report.json, out/report.md and one folder per member. Returns the report."""
    inputs = prepare_inputs(recipe, stage)
    task, teacher, dense, tokenizer, table = inputs.task, inputs.teacher, inputs.dense, inputs.tokenizer, inputs.table
    family = build_family(recipe, dense, tokenizer, task.calibration, table, out / ".work", stage)
    dense_accuracy = evaluate_accuracy(dense, tokenizer, task.validation, recipe.teacher.max_length)
    for member in family.members:
        member.accuracy = evaluate_accuracy(member.model, tokenizer, task.validation, recipe.teacher.max_length)
    dense_info = dense_summary(dense, family.dense_onnx, dense_accuracy, len(task.validation), family.members)
    manifests = [write_member(recipe, runtime_json(table), member, tokenizer, teacher, task, dense_info, out)
                 for member in family.members]
    report = write_report(out, recipe, table, dense_info, manifests, max_speedup(table))
    shutil.rmtree(out / ".work")  # every round's ONNX file: the chosen ones now live in the member folders
    return report


@dataclass
class Family:
    dense_onnx: Path
    verifier: PairedVerifier
    database: zipl.Database
    members: list[Member]


def build_family(recipe: Recipe, dense: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 calibration: Sequence[Example], table: LatencyTable, work: Path, stage: StageProgress) -> Family:
    """Export the dense model, calibrate, build the database, and run the closed loop for every target."""
    for target in recipe.targets:  # fail before the expensive work, and name the largest reachable speedup
        module_budget(table, target)
    adapter = adapter_for(dense.config)
    env = recipe.environment
    quant_batches = example_batches(tokenizer, calibration, QuantSettings()) if env.precision == "int8" else []

    def deploy(model: PreTrainedModel) -> PreTrainedModel:  # INT8: post-training calibration on the task's data
        return deployable(model, adapter.prunable_linears, env.precision, quant_batches)

    deployed_dense = deploy(dense)
    dense_onnx = export_model(deployed_dense, work / "dense.onnx", env.batch_size, env.sequence_length)
    verify_export(deployed_dense, dense_onnx, atol=parity_atol(env.precision))
    hessians = collect_hessians(dense, tokenizer, adapter, calibration, recipe.calibration, stage("calibrate"))
    database = zipl.build_database(dense, adapter, hessians, table.group_size, recipe.ziplm, stage("database"))
    verifier = PairedVerifier(get_runtime(env), env, dense_onnx, dense.config.vocab_size, recipe.verification)
    members = [closed_loop(target, lambda speedup: zipl.solve(database, table, speedup),
                           lambda structure: deploy(zipl.stitch(dense, adapter, database, structure)), table, verifier,
                           work / f"{target:g}x", stage(f"{target:g}x"))
               for target in recipe.targets]
    return Family(dense_onnx, verifier, database, members)


def write_member(recipe: Recipe, runtime: dict[str, Any], member: Member, tokenizer: PreTrainedTokenizerBase,
                 teacher: TeacherResult, task: TaskData, dense_info: dict[str, Any], out: Path) -> dict[str, Any]:
    """The member folder (model.onnx, weights, config.json, tokenizer, manifest.json), written atomically."""
    name = f"{recipe.name}-{member.target:g}x"
    with atomic_directory(out / name) as folder:
        save_model(member.model, folder)
        tokenizer.save_pretrained(folder)
        (folder / "model.onnx").write_bytes(member.onnx_path.read_bytes())
        payload = manifest(name, recipe, runtime, member, dense_info, folder / "model.onnx", teacher, task)
        write_json_atomic(folder / "manifest.json", payload)
    return payload
