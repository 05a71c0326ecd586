"""What follows a member's structured step (ALGORITHMS.md sections 4-7): distillation, oBERT, INT8 QAT.

    chain:
      gradual: true              # ZipLM targets in increasing order, each pruned from the previous member (s. 4)
      distillation: {epochs: 2}  # fine-tune every member from the dense teacher (see DistillSettings)
      structured_distillation: {epochs: 6, learning_rate: 1.6e-4}  # the first distillation, right after structured
                                 # pruning: these keys replace those of `distillation` (default: none)
      obert: {sparsity: 0.8}     # then gradual oBERT to that sparsity, distillation between steps (OBertSettings)
      qat: true                  # then INT8 quantization-aware fine-tuning (needs environment.precision: int8)

Everything is off by default: the family is then one-shot ZipLM, post-training. The fine-tuning stages all learn
from the dense teacher with the distillation loss, so each of them needs `distillation`. The structure of a member
is fixed by its closed loop before any of this runs: fine-tuning, sparsity without sparse kernels and the INT8
scales do not change which kernels run, and the finished file is measured again against the dense reference.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ziplm.families import adapter_for
from ziplm.runtimes.base import Precision
from ziplm.tasks import Task
from ziplm.stages import obert
from ziplm.stages.distill import DistillSettings, distill
from ziplm.stages.obert import OBertSettings
from ziplm.stages.quantize import QuantSettings, calibrate_activations, prepare_qat


class ChainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gradual: bool = False
    distillation: DistillSettings | None = None
    # keys of `distillation` replaced for the first distillation, right after structured pruning: where a compound
    # member lost most of its accuracy with the settings of the later stages (see the compound recipe)
    structured_distillation: dict[str, Any] = Field(default_factory=dict)
    obert: OBertSettings | None = None
    qat: bool = False

    @model_validator(mode="after")
    def _fine_tuning_needs_distillation(self) -> ChainSettings:
        wanting = [name for name, on in (("gradual", self.gradual), ("obert", self.obert), ("qat", self.qat),
                                         ("structured_distillation", self.structured_distillation)) if on]
        if wanting and self.distillation is None:
            raise ValueError(f"chain.{wanting[0]} fine-tunes with distillation from the teacher: add "
                             "chain.distillation (for example distillation: {epochs: 2})")
        return self

    @model_validator(mode="after")
    def _structured_distillation_replaces_distillation_keys(self) -> ChainSettings:
        unknown = sorted(set(self.structured_distillation) - set(DistillSettings.model_fields))
        if unknown:
            raise ValueError(f"chain.structured_distillation replaces keys of chain.distillation; unknown: {unknown} "
                             f"(allowed: {', '.join(DistillSettings.model_fields)})")
        try:
            self.first_distillation  # built from both, so a bad value fails here, with the recipe
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise ValueError(f"chain.structured_distillation: {problems}") from error
        return self

    @property
    def fine_tunes(self) -> bool:
        return self.distillation is not None

    @property
    def first_distillation(self) -> DistillSettings | None:
        """The settings of the distillation right after structured pruning: `distillation` with the keys of
        `structured_distillation` replaced."""
        if self.distillation is None or not self.structured_distillation:
            return self.distillation
        return DistillSettings.model_validate({**self.distillation.model_dump(), **self.structured_distillation})

    def stage_names(self, precision: Precision) -> list[str]:
        """The stages a member of this chain went through, in order (its manifest's `stages`)."""
        names = ["teacher-finetune", "ziplm-gradual" if self.gradual else "ziplm-oneshot"]
        names += ["distillation"] if self.distillation else []
        names += ["obert-gradual"] if self.obert else []
        names += (["int8-qat"] if self.qat else ["int8-calibration"]) if precision == "int8" else []
        return names + ["onnx-export", "paired-verification"]


@dataclass
class Finished:
    """A member after the chain: the model to deploy, the structured model before oBERT and QAT (the point gradual
    ZipLM prunes the next target from), and the task's validation metric after each fine-tuning stage."""

    model: PreTrainedModel
    structured: PreTrainedModel
    metric_by_stage: dict[str, float]


def finish(model: PreTrainedModel, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task,
           chain: ChainSettings, quantization: QuantSettings, progress: Callable[[str], None]) -> Finished:
    """Fine-tune a stitched member in place: distillation, then gradual oBERT, then QAT, as the chain says; score it
    on the task after each (reported only: nothing is chosen by it)."""
    first = chain.first_distillation
    if chain.distillation is None or first is None:
        raise ValueError("the chain fine-tunes nothing without chain.distillation")
    metric_by_stage: dict[str, float] = {}

    def done(stage: str) -> None:
        metric = task.evaluate(model, tokenizer)
        metric_by_stage[stage] = metric.value
        progress(f"{stage}: {metric.name} {metric.value:.4f}")

    progress(f"distillation: {first.epochs} epochs on {len(task.train)} examples")
    distill(model, teacher, tokenizer, task, task.train, first, progress)
    done("distillation")
    structured = copy.deepcopy(model).eval()
    masks = None
    if chain.obert:
        progress(f"oBERT: gradual to {chain.obert.sparsity:.0%} sparsity in {chain.obert.pruning_steps} steps")
        masks = obert.gradual(model, teacher, tokenizer, task, chain.obert, chain.distillation, progress)
        done("obert-gradual")
    if chain.qat:
        progress("INT8 QAT: calibrate the activation scales, then distill through the fake-quant model")
        prepare_qat(model, adapter_for(model.config), quantization)
        calibrate_activations(model, tokenizer, task)
        done("int8-calibration")
        distill(model, teacher, tokenizer, task, task.train, chain.distillation, progress, masks)
        done("int8-qat")
    return Finished(model.eval(), structured, metric_by_stage)
