"""INT8 against FP32 on the dense MiniLM MR teacher: paired speedup in ONNX Runtime (for information).

Both files are exported from the cached teacher (INT8: fake-quant linears calibrated on the task's calibration
split, QDQ ONNX) and timed interleaved in one run with ziplm.runtimes.timing.time_paired at the recipe's environment
(batch 1, sequence 128, 2 threads). The machine is shared, so read the interval, not only the median.

    python -m benchmarks.int8_speedup

writes benchmarks/results/int8_speedup.md and .json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from benchmarks.common import progress, stage_cache, write_results
from ziplm.families import adapter_for
from ziplm.families.loading import load_model
from ziplm.pipeline.recipe import load_recipe
from ziplm.runtimes import get_runtime
from ziplm.runtimes.timing import time_paired
from ziplm.stages.export import export_model
from ziplm.stages.finetune import finetune_teacher
from ziplm.stages.quantize import deployable, example_batches
from ziplm.tasks import load_task

COMMAND = "python -m benchmarks.int8_speedup"


def run(rounds: int = 40) -> dict[str, Any]:
    recipe = load_recipe("minilm_mr")
    env = recipe.environment
    task = load_task(recipe.task)
    teacher = finetune_teacher(recipe.model, task, recipe.teacher, stages=stage_cache())
    dense = load_model(str(teacher.path))
    tokenizer = AutoTokenizer.from_pretrained(str(teacher.path))
    adapter = adapter_for(dense.config)
    quantized = deployable(dense, adapter.prunable_linears, "int8", example_batches(tokenizer, task))
    runtime = get_runtime(env)
    inputs = adapter.example_inputs(dense.config, env.batch_size, env.sequence_length)
    with tempfile.TemporaryDirectory(prefix="ziplm-int8-speed-") as work:
        fp32 = runtime.load(export_model(dense, Path(work) / "fp32.onnx", env.batch_size, env.sequence_length))
        int8 = runtime.load(export_model(quantized, Path(work) / "int8.onnx", env.batch_size, env.sequence_length))
        progress("timing")(f"{rounds} interleaved rounds (more while the interval is wide)")
        speedup, fp32_stats, int8_stats = time_paired(lambda: fp32.run(inputs), lambda: int8.run(inputs), rounds)
    return {"model": recipe.model, "speedup": speedup.to_json(), "fp32_ms": fp32_stats.to_json(),
            "int8_ms": int8_stats.to_json(), "runtime": runtime.info().to_json(),
            "environment": env.model_dump(exclude={"precision"}),
            "note": "shared machine, other engineers' jobs running: indicative only", "command": COMMAND}


def markdown(result: dict[str, Any]) -> str:
    s, env = result["speedup"], result["environment"]
    return "\n".join([
        "# INT8 vs FP32, dense MiniLM MR teacher, ONNX Runtime (for information)",
        "",
        f"Batch {env['batch_size']}, sequence {env['sequence_length']}, {env['threads']} threads, "
        f"{result['runtime']['device']}, onnxruntime {result['runtime']['version']}; paired, interleaved. "
        f"{result['note']}. Reproduce: `{result['command']}`.",
        "",
        f"- FP32 median {result['fp32_ms']['median']:.2f} ms (p90 {result['fp32_ms']['p90']:.2f}); "
        f"INT8 median {result['int8_ms']['median']:.2f} ms (p90 {result['int8_ms']['p90']:.2f})",
        f"- Speedup {s['value']:.2f}x, {s['confidence']:.0%} interval [{s['ci_low']:.2f}, {s['ci_high']:.2f}], "
        f"{s['rounds']} rounds",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds (more while the interval is wide)")
    result = run(parser.parse_args().rounds)
    write_results("int8_speedup", result, markdown(result))


if __name__ == "__main__":
    main()
