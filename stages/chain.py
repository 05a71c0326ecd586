"""The fine-tuning stages after ZipLM, as an ordered list in the recipe (ALGORITHMS.md sections 4-7).

    chain:
      - distill: {epochs: 6, learning_rate: 1.6e-4}      # token-level distillation from the dense teacher
      - obert: {sparsity: 0.8, distillation: {epochs: 2}} # gradual oBERT, distillation after each pruning step
      - qat: {distillation: {epochs: 2}}                  # INT8 quantization-aware distillation (precision int8)

Each entry names one registered stage and its settings; the stages run in the order given, on the member the closed
loop chose, and learn from the dense teacher. An empty chain (the default) is one-shot, post-training ZipLM. The
structure is fixed before any of this runs: fine-tuning, sparsity without sparse kernels and the INT8 scales do not
change which kernels run, and the finished file is measured again against the dense reference.

A stage is registered with its name, its settings model, whether it leaves a dense float model (gradual ZipLM prunes
the next target from the member as it stood before the first stage that does not), and its `run`. docs/extending.md
shows how to add one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ziplm.families import adapter_for
from ziplm.stages import obert
from ziplm.stages.distill import DistillSettings, distill
from ziplm.stages.masks import Masks
from ziplm.stages.obert import OBertSettings
from ziplm.stages.quantize import QuantSettings, calibrate_activations, prepare_qat
from ziplm.tasks import Task

Progress = Callable[[str], None]


@dataclass
class FineTuning:
    """What the chain's stages share while they fine-tune one member (in place)."""

    model: PreTrainedModel
    teacher: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    task: Task
    quantization: QuantSettings
    progress: Progress
    masks: Masks | None = None  # sparsity masks, once a stage prunes; every later stage keeps them
    metric_by_stage: dict[str, float] = field(default_factory=dict)

    def scored(self, stage: str) -> None:
        """Record the task's validation metric after a stage (reported only: nothing is chosen by it)."""
        metric = self.task.evaluate(self.model, self.tokenizer)
        self.metric_by_stage[stage] = metric.value
        self.progress(f"{stage}: {metric.name} {metric.value:.4f}")


class ChainStage(BaseModel):
    """One registered stage of the chain: its settings are the model's fields; `run` fine-tunes in place."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str]
    keeps_float_weights: ClassVar[bool] = True  # False: it sparsifies or quantizes (see the module docstring)
    needs_int8: ClassVar[bool] = False

    @property
    def final_sparsity(self) -> float:
        """The fraction of the prunable weights this stage leaves zero (0: it prunes none)."""
        return 0.0

    def run(self, state: FineTuning) -> None:
        raise NotImplementedError(f"chain stage {self.name} does not define run")

    def cache_key(self) -> dict[str, Any]:
        return {self.name: self.model_dump()}


STAGES: dict[str, type[ChainStage]] = {}


def register_stage(cls: type[ChainStage]) -> type[ChainStage]:
    if cls.name in STAGES:
        raise ValueError(f"chain stage {cls.name!r} is registered twice")
    STAGES[cls.name] = cls
    return cls


@register_stage
class Distill(DistillSettings, ChainStage):
    """Token-level distillation from the dense teacher (stages.distill), masks kept."""

    name = "distill"

    def run(self, state: FineTuning) -> None:
        state.progress(f"distillation: {self.epochs} epochs on {len(state.task.train)} examples")
        distill(state.model, state.teacher, state.tokenizer, state.task, state.task.train, self, state.progress,
                state.masks)
        state.scored(self.name)


@register_stage
class OBert(OBertSettings, ChainStage):
    """Gradual oBERT to `sparsity` in `pruning_steps` steps, with `distillation` after each (stages.obert)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name = "obert"
    keeps_float_weights = False

    pruning_steps: int = Field(4, ge=1, description="pruning steps, distillation after each")
    distillation: DistillSettings = Field(default_factory=DistillSettings)

    @property
    def final_sparsity(self) -> float:
        return self.sparsity

    def run(self, state: FineTuning) -> None:
        state.progress(f"oBERT: gradual to {self.sparsity:.0%} sparsity in {self.pruning_steps} steps")
        settings = OBertSettings(**self.model_dump(exclude={"pruning_steps", "distillation"}))
        state.masks = obert.gradual(state.model, state.teacher, state.tokenizer, state.task, settings,
                                    self.distillation, state.progress, state.masks, self.pruning_steps)
        state.scored(self.name)


@register_stage
class Qat(ChainStage):
    """INT8 quantization-aware training: calibrate the activation scales on the task, then distil through the
    fake-quant model (stages.quantize); needs `environment.precision: int8`."""

    name = "qat"
    keeps_float_weights = False
    needs_int8 = True

    distillation: DistillSettings = Field(default_factory=DistillSettings)

    def run(self, state: FineTuning) -> None:
        state.progress("INT8 QAT: calibrate the activation scales, then distill through the fake-quant model")
        prepare_qat(state.model, adapter_for(state.model.config), state.quantization)
        calibrate_activations(state.model, state.tokenizer, state.task)
        state.scored("int8-calibration")
        distill(state.model, state.teacher, state.tokenizer, state.task, state.task.train, self.distillation,
                state.progress, state.masks)
        state.scored(self.name)


def parse_stage(entry: Any) -> ChainStage:
    """A recipe's chain entry (a mapping of one stage name to its settings) as its registered stage."""
    if isinstance(entry, ChainStage):
        return entry
    if not (isinstance(entry, dict) and len(entry) == 1):
        raise ValueError(f"each chain entry names one stage and its settings, e.g. '- distill: {{epochs: 2}}'; got "
                         f"{entry!r} (stages: {', '.join(STAGES)})")
    ((name, settings),) = entry.items()
    if name not in STAGES:
        raise ValueError(f"unknown chain stage {name!r}; registered stages: {', '.join(STAGES)}")
    try:
        return STAGES[name].model_validate(settings or {})
    except ValidationError as error:
        raise ValueError(f"chain stage {name}: " + "; ".join(_problem(e, STAGES[name]) for e in error.errors())) \
            from None


def _problem(error: Any, stage: type[ChainStage]) -> str:
    where = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key '{where}' (allowed: {', '.join(stage.model_fields)})"
    return f"{where}: {error['msg']}"


@dataclass
class Finished:
    """A member after the chain: the model to deploy, the model as it stood before the first stage that sparsifies
    or quantizes (where gradual ZipLM prunes the next target from), and the metric after each stage."""

    model: PreTrainedModel
    structured: PreTrainedModel
    metric_by_stage: dict[str, float]


def finish(model: PreTrainedModel, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task,
           chain: list[ChainStage], quantization: QuantSettings, progress: Progress) -> Finished:
    """Run the chain's stages in order on a stitched member, in place."""
    state = FineTuning(model, teacher, tokenizer, task, quantization, progress)
    structured = None
    for stage in chain:
        if structured is None and not stage.keeps_float_weights:
            structured = copy.deepcopy(state.model).eval()
        stage.run(state)
    return Finished(state.model.eval(), structured or copy.deepcopy(state.model).eval(), state.metric_by_stage)


def stage_names(chain: list[ChainStage], gradual: bool, int8: bool, given_teacher: bool = False) -> list[str]:
    """The stages a member went through, in order (its manifest's `stages`)."""
    names = ["teacher-given" if given_teacher else "teacher-finetune", "ziplm-gradual" if gradual else "ziplm-oneshot",
             *(stage.name for stage in chain)]
    names += [] if not int8 or any(stage.needs_int8 for stage in chain) else ["int8-calibration"]
    return names + ["onnx-export", "paired-verification"]
