"""The chain behind `ziplm run`: teacher -> latency table -> calibration -> database -> per target: search, stitch,
export, verify (closed loop) -> member folders and the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ziplm.families import FamilyAdapter, ModelStructure, adapter_for
from ziplm.families.loading import load_model, save_model
from ziplm.pipeline.cache import atomic_directory, write_json_atomic
from ziplm.pipeline.recipe import Recipe
from ziplm.pipeline.report import dense_summary, manifest, runtime_json, write_report
from ziplm.pipeline.tasks import TaskData, load_task
from ziplm.runtimes import get_runtime
from ziplm.runtimes.latency_table import LatencyTable, get_or_build_table
from ziplm.stages import ziplm as zipl
from ziplm.stages.calibrate import collect_hessians
from ziplm.stages.export import export_model, verify_export
from ziplm.stages.finetune import TeacherResult, evaluate_accuracy, finetune_teacher
from ziplm.stages.search import max_speedup, module_budget
from ziplm.stages.verify import LatencyCheck, PairedVerifier

StageProgress = Callable[[str], Callable[[str], None]]


@dataclass
class Round:
    """One solve-stitch-measure round of the closed loop for one target."""

    solved_for: float
    structure: ModelStructure
    predicted_speedup: float
    check: LatencyCheck

    def to_json(self, target: float) -> dict[str, Any]:
        return {"solved_for": round(self.solved_for, 4), "predicted_speedup": round(self.predicted_speedup, 4),
                "measured_speedup": round(self.check.speedup.value, 4), "speedup_ci": self.check.speedup.to_json(),
                "deviation": round(self.check.deviation(target), 4), "structure": self.structure.to_json()}


@dataclass
class Member:
    """A target's family member: every round of its closed loop, and the chosen one (closest to the target)."""

    target: float
    rounds: list[Round]
    models: list[PreTrainedModel]
    onnx_paths: list[Path]
    accuracy: float = float("nan")

    @property
    def chosen(self) -> int:
        return min(range(len(self.rounds)), key=lambda i: abs(self.rounds[i].check.deviation(self.target)))

    @property
    def final(self) -> Round:
        return self.rounds[self.chosen]

    @property
    def model(self) -> PreTrainedModel:
        return self.models[self.chosen]

    @property
    def onnx_path(self) -> Path:
        return self.onnx_paths[self.chosen]


def run_recipe(recipe: Recipe, out: Path, stage: StageProgress) -> dict[str, Any]:
    """Run the whole chain; write out/report.json, out/report.md and one folder per member. Returns the report."""
    task = load_task(recipe.task)
    teacher = finetune_teacher(recipe.model, task, recipe.teacher, progress=stage("teacher"))
    dense = load_model(str(teacher.path))
    tokenizer = AutoTokenizer.from_pretrained(str(teacher.path))
    adapter = adapter_for(dense.config)
    table, _ = get_or_build_table(dense.config, recipe.environment, recipe.latency_table, progress=stage("table"))
    reachable = max_speedup(table)
    for target in recipe.targets:  # fail before the expensive work, and name the largest reachable speedup
        module_budget(table, target)

    work = out / ".work"
    dense_onnx = export_model(dense, work / "dense.onnx", recipe.environment.batch_size,
                              recipe.environment.sequence_length)
    verify_export(dense, dense_onnx)
    hessians = collect_hessians(dense, tokenizer, adapter, task.calibration, recipe.calibration, stage("calibrate"))
    database = zipl.build_database(dense, adapter, hessians, table.group_size, recipe.ziplm, stage("database"))

    verifier = PairedVerifier(get_runtime(recipe.environment), recipe.environment, dense_onnx,
                              dense.config.vocab_size, recipe.verification)
    dense_accuracy = evaluate_accuracy(dense, tokenizer, task.validation, recipe.teacher.max_length)
    members = [build_member(recipe, target, dense, adapter, database, table, verifier, work, stage(f"{target:g}x"))
               for target in recipe.targets]
    for member in members:
        member.accuracy = evaluate_accuracy(member.model, tokenizer, task.validation, recipe.teacher.max_length)

    dense_info = dense_summary(dense, dense_onnx, dense_accuracy, len(task.validation), members)
    manifests = [write_member(recipe, runtime_json(table), member, tokenizer, teacher, task, dense_info, out)
                 for member in members]
    return write_report(out, recipe, table, dense_info, manifests, reachable)


def build_member(recipe: Recipe, target: float, dense: PreTrainedModel, adapter: FamilyAdapter,
                 database: zipl.Database, table: LatencyTable, verifier: PairedVerifier, work: Path,
                 progress: Callable[[str], None]) -> Member:
    """Solve, stitch, export and measure; re-solve with a corrected target until within tolerance (bounded)."""
    settings = recipe.verification
    member = Member(target, [], [], [])
    solved_for = target
    for index in range(settings.max_rounds):
        structure = zipl.solve(database, table, min(solved_for, max_speedup(table)))
        model = zipl.stitch(dense, adapter, database, structure)
        onnx_path = export_model(model, work / f"{target:g}x-round{index}.onnx", recipe.environment.batch_size,
                                 recipe.environment.sequence_length)
        verify_export(model, onnx_path)
        check = verifier.measure(onnx_path)
        predicted = table.predict_ms(ModelStructure.dense(table.model_shape)) / table.predict_ms(structure)
        member.rounds.append(Round(solved_for, structure, predicted, check))
        member.models.append(model)
        member.onnx_paths.append(onnx_path)
        progress(f"round {index + 1}: solved for {solved_for:.3f}x, predicted {predicted:.3f}x, measured "
                 f"{check.speedup.value:.3f}x [{check.speedup.ci_low:.3f}, {check.speedup.ci_high:.3f}]")
        if abs(check.deviation(target)) <= settings.tolerance:
            break
        solved_for *= target / check.speedup.value  # the table was off by this factor here: aim that much further
    return member


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
