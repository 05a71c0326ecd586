"""What every benchmark script shares: where results go, how they are written, how progress is shown, and the
two subjects of the speed benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import AutoTokenizer, BertConfig, PreTrainedModel, PreTrainedTokenizerBase

from ziplm.families.loading import build_model
from ziplm.pipeline.assets import resolve_model
from ziplm.pipeline.cache import write_json_atomic
from ziplm.pipeline.recipe import Recipe, load_recipe
from ziplm.pipeline.run import prepare_inputs
from ziplm.pipeline.tasks import Example, TaskSpec, load_task
from ziplm.stages.calibrate import CalibrationSettings
from ziplm.stages.finetune import TeacherResult

RESULTS = Path(__file__).parent / "results"
MODELS = {"bert-base": "bert-base shape (random weights)", "minilm": "MiniLM fine-tuned on MR"}


def progress(stage: str) -> Callable[[str], None]:
    return lambda message: print(f"[{stage}] {message}", flush=True)


def write_results(name: str, result: Any, markdown: str) -> None:
    """benchmarks/results/NAME.json and NAME.md; the markdown is also printed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / f"{name}.json", asdict(result) if is_dataclass(result) else result)
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


class Subject(NamedTuple):
    """A model to build a family from, with its recipe and calibration data."""

    recipe: Recipe
    dense: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    calibration: Sequence[Example]
    teacher: TeacherResult | None  # None for the random-weight bert-base shape


def load_subject(model: str, targets: list[float]) -> Subject:
    """MiniLM: the MR teacher as `ziplm run minilm_mr` builds it. bert-base: the shape with random weights (latency
    does not depend on the values), calibrated on real MR sentences through MiniLM's tokenizer (the same vocabulary)."""
    if model == "minilm":
        recipe = load_recipe("minilm_mr").model_copy(update={"targets": targets})
        inputs = prepare_inputs(recipe, progress)
        return Subject(recipe, inputs.dense, inputs.tokenizer, inputs.task.calibration, inputs.teacher)
    recipe = Recipe(name="bert-base-random", model="bert-base", task=TaskSpec(data="mr"), targets=targets,
                    calibration=CalibrationSettings(samples=128))
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    return Subject(recipe, build_model(BertConfig()), tokenizer, load_task(recipe.task).calibration, None)
