"""How well does a latency table predict end-to-end time? (issue: foundation, item 7)

For the bert-base shape (random weights: latency does not depend on them), the table's additive prediction
(base + per-layer entries) is compared with end-to-end measurement for random non-uniform per-layer structures that
the table's own correction never saw. Every model is timed interleaved with the dense model in one run, and both
sides are compared as ratios to dense: predicted t_model / t_dense against measured t_model / t_dense.

    python -m benchmarks.latency_prediction [--models 12] [--rounds 30] [--rebuild-table]

writes benchmarks/results/latency_prediction.md and .json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import BertConfig

from benchmarks.common import write_results
from ziplm.families import ModelStructure, adapter_for
from ziplm.pipeline.report import environment_line
from ziplm.runtimes import InferenceEnv, get_runtime
from ziplm.runtimes.timing import speedup_of
from ziplm.stages.latency_table import LatencyTable, get_or_build_table, measure_structures, random_structure

COMMAND = "python -m benchmarks.latency_prediction"


@dataclass(frozen=True)
class BenchmarkConfig:
    models: int = 12
    rounds: int = 30
    warmup: int = 3
    seed: int = 2024  # differs from the table's calibration seed: these structures are held out
    env: InferenceEnv = InferenceEnv(runtime="onnxruntime", threads=2, batch_size=1, sequence_length=128)


@dataclass(frozen=True)
class Row:
    model: str
    structure: dict[str, list[int]]
    measured_ratio: float  # t_model / t_dense, median of per-round ratios
    ratio_ci: tuple[float, float]
    predicted_ratio_raw: float
    predicted_ratio_corrected: float
    error_raw: float  # predicted / measured - 1
    error_corrected: float
    measured_ms: float
    predicted_ms_corrected: float


@dataclass(frozen=True)
class Result:
    runtime: dict
    table_fingerprint: str
    correction: dict[str, float]
    dense_ms: float
    rows: list[Row]
    median_abs_error_raw: float
    median_abs_error_corrected: float
    worst_abs_error_raw: float
    worst_abs_error_corrected: float
    command: str

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> Result:
        """A stored result (benchmarks/results/latency_prediction.json) as the dataclass it was written from."""
        return cls(**{**payload, "rows": [Row(**row) for row in payload["rows"]]})


def run(config: BenchmarkConfig, rebuild_table: bool = False) -> Result:
    model_config = BertConfig()  # the bert-base shape: 12 layers, hidden 768, 12 heads, FFN 3072
    table, _ = get_or_build_table(model_config, config.env, progress=print, rebuild=rebuild_table)
    shape = adapter_for(model_config).shape(model_config)
    rng = random.Random(config.seed)
    structures = {"dense": ModelStructure.dense(shape)}
    structures |= {f"random-{i}": random_structure(shape, table.ffn_levels, rng) for i in range(config.models)}
    print(f"measuring {len(structures)} models x {config.rounds} rounds, interleaved")
    with tempfile.TemporaryDirectory(prefix="ziplm-bench-") as workdir:
        stats, _ = measure_structures(model_config, structures, config.env, get_runtime(config.env), config.rounds,
                                      config.warmup, Path(workdir))
    rows = [_row(name, structure, table, stats) for name, structure in structures.items() if name != "dense"]
    raw = [abs(r.error_raw) for r in rows]
    corrected = [abs(r.error_corrected) for r in rows]
    return Result(
        runtime=table.environment, table_fingerprint=table.fingerprint, correction=asdict(table.correction),
        dense_ms=stats["dense"].median_ms, rows=rows,
        median_abs_error_raw=statistics.median(raw), median_abs_error_corrected=statistics.median(corrected),
        worst_abs_error_raw=max(raw), worst_abs_error_corrected=max(corrected), command=COMMAND,
    )


def _row(name: str, structure: ModelStructure, table: LatencyTable, stats: dict) -> Row:
    dense = ModelStructure.dense(table.model_shape)
    speedup = speedup_of(stats["dense"], stats[name])  # dense / model, per round
    measured = 1.0 / speedup.value
    raw = table.predict_ms(structure, corrected=False) / table.predict_ms(dense, corrected=False)
    corrected = table.predict_ms(structure) / table.predict_ms(dense)
    return Row(
        model=name, structure=structure.to_json(), measured_ratio=measured,
        ratio_ci=(1.0 / speedup.ci_high, 1.0 / speedup.ci_low),
        predicted_ratio_raw=raw, predicted_ratio_corrected=corrected,
        error_raw=raw / measured - 1.0, error_corrected=corrected / measured - 1.0,
        measured_ms=stats[name].median_ms, predicted_ms_corrected=table.predict_ms(structure),
    )


def markdown(result: Result) -> str:
    env = result.runtime
    lines = [
        "# Latency prediction: latency table vs end-to-end measurement",
        "",
        f"bert-base shape (12 layers, hidden 768, 12 heads, FFN 3072, random weights), {environment_line(env)}. "
        f"Table `{result.table_fingerprint}`.",
        "",
        "Each model was timed interleaved with the dense model in one run; both columns are t_model / t_dense "
        f"(dense median {result.dense_ms:.1f} ms in this run). The correction "
        f"(measured = {result.correction['scale']:.4f} x predicted {result.correction['offset']:+.2f} ms) was fitted "
        "when the table was built, on other models: these structures are held out.",
        "",
        "| summary | raw additive | corrected |",
        "|---|---|---|",
        f"| median abs relative error | {result.median_abs_error_raw:.1%} | {result.median_abs_error_corrected:.1%} |",
        f"| worst abs relative error | {result.worst_abs_error_raw:.1%} | {result.worst_abs_error_corrected:.1%} |",
        "",
        "| model | heads per layer | FFN width per layer | measured ratio (95% CI) | predicted raw | error raw "
        "| predicted corrected | error corrected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        lines.append(
            f"| {r.model} | {' '.join(map(str, r.structure['units']))} | {' '.join(map(str, r.structure['ffn']))} "
            f"| {r.measured_ratio:.3f} ({r.ratio_ci[0]:.3f}-{r.ratio_ci[1]:.3f}) | {r.predicted_ratio_raw:.3f} "
            f"| {r.error_raw:+.1%} | {r.predicted_ratio_corrected:.3f} | {r.error_corrected:+.1%} |"
        )
    lines += ["", f"Reproduce: `{result.command}` (from the repository root, in the project's environment).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=BenchmarkConfig.models)
    parser.add_argument("--rounds", type=int, default=BenchmarkConfig.rounds)
    parser.add_argument("--rebuild-table", action="store_true")
    args = parser.parse_args()
    result = run(BenchmarkConfig(models=args.models, rounds=args.rounds), rebuild_table=args.rebuild_table)
    write_results("latency_prediction", result, markdown(result))


if __name__ == "__main__":
    main()
