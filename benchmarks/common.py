"""What every benchmark script shares: where results go, how they are written, how progress is shown, and the
two subjects of the speed benchmarks."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from ziplm.assets import gpt2_tokenizer_folder, resolve_model
from ziplm.cache import StageCache, cache_root, fingerprint, write_json_atomic
from ziplm.families import adapter_for
from ziplm.families.loading import RANDOM_SHAPES, build_model, load_config
from ziplm.pipeline.recipe import Recipe, load_recipe
from ziplm.pipeline.run import Inputs, prepare_inputs
from ziplm.runtimes import InferenceEnv
from ziplm.runtimes.base import Phase
from ziplm.runtimes.policy import policy
from ziplm.stages.calibrate import CalibrationSettings
from ziplm.stages.latency_table import get_or_build_table
from ziplm.tasks import CausalLMSpec, TaskSpec, load_task

RESULTS = Path(__file__).parent / "results"
MODELS = {"bert-base": "bert-base shape (random weights)", "minilm": "MiniLM fine-tuned on MR"}
MODELS |= {name: f"{name} shape (random weights)" for name in RANDOM_SHAPES if name not in MODELS}


def progress(stage: str) -> Callable[[str], None]:
    return lambda message: print(f"[{stage}] {message}", flush=True)


def stage_cache() -> StageCache:
    """The product's stage cache, with benchmark-style progress lines: benchmarks reuse `ziplm run`'s stages."""
    return StageCache(cache_root() / "stages", progress)


def head_commit() -> str:
    """The checked-out commit (short hash) a result was measured at; "unknown" outside a git checkout."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return head.stdout.strip() or "unknown"


def write_results(name: str, result: Any, markdown: str) -> None:
    """benchmarks/results/NAME.json and NAME.md; the markdown is also printed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / f"{name}.json", asdict(result) if is_dataclass(result) else result)
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def load_subject(model: str, targets: list[float], phase: Phase = "sequence") -> tuple[Recipe, Inputs]:
    """MiniLM: the MR teacher as `ziplm run minilm_mr` builds it. A random shape (bert-base, roberta-base, ...):
    random weights (latency does not depend on the values), calibrated on real text: an encoder on MR sentences
    through MiniLM's tokenizer (the BERT vocabulary, within every such shape's), fed only the inputs the family takes;
    a decoder (gpt2-small) on blocks of Shakespeare through GPT-2's tokenizer, in the whole-sequence phase or, with
    `phase`, in a phase of generation."""
    if model == "minilm":
        recipe = load_recipe("minilm_mr").model_copy(update={"targets": targets})
        return recipe, prepare_inputs(recipe, stage_cache())
    torch.manual_seed(0)
    dense = build_model(load_config(model))
    decoder = adapter_for(dense.config).default_head == "causal-lm"
    spec = CausalLMSpec(type="causal_lm", data="shakespeare", max_examples=256) if decoder else TaskSpec(data="mr")
    recipe = Recipe(name=f"{model}-random", model=model, task=spec, targets=targets,
                    calibration=CalibrationSettings(samples=128), environment=InferenceEnv().in_phase(phase))
    tokenizer = (AutoTokenizer.from_pretrained(gpt2_tokenizer_folder()) if decoder else AutoTokenizer.from_pretrained(
        resolve_model("minilm"), model_input_names=list(adapter_for(dense.config).input_names(dense.config))))
    task = load_task(recipe.task)
    table, _ = get_or_build_table(dense.config, recipe.environment, recipe.latency_table.group_size,
                                  policy(recipe.effort), stages=stage_cache())
    return recipe, Inputs(task.cut(tokenizer) if decoder else task, dense, tokenizer, table,
                          fingerprint({"random": model, "seed": 0}))
