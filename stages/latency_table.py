"""Latency tables (ALGORITHMS.md section 2): what each attention and FFN level costs in the target runtime.

For a model shape and an inference environment, one layer is timed as ONNX in the runtime at every attention level
(units H..0, the FFN removed) and every FFN level (width I..0 in steps of G, the attention removed), through the
same export path, precision, sparsity and session settings as the final artifact (every block and model goes through
`ziplm.stages.quantize.deployable`: INT8 scales calibrated on random inputs; the environment's `sparsity`, the
chain's oBERT target, as that fraction of each block's smallest weights zeroed, for runtimes whose kernels skip
zeros). A level's entry is its time minus the time
of the removed block, so per-call overheads cancel; `base` is the whole model with every module removed (embeddings,
mask, residual norms, head), measured end to end.

    predicted(structure) = base + sum over layers (attention[units] + ffn[width])

Summed single-block times are biased against end-to-end time on these machines, so each table also measures a few
calibration models end to end (interleaved, in one run) and fits `measured = scale * predicted + offset` through
the all-removed model (measured directly, so left exact).

Both timings run in chunks of about a second, and a chunk during which other work kept cores busy is timed again
(the measurement policy's LoadGuard): the table aims every member solved from it, so a build measured under load
mis-aims them all. What other work did is recorded in `machine_load`.

A decoder's table can be timed in a phase of generation (InferenceEnv.phase): prefill times the same blocks and,
end to end, the generation artifact on an empty cache (the head computes the last position only); decode times each
block on one token with a cache of context_length (KV heads as the level keeps), and the generation artifact for one
token end to end. A whole request (prefill, then new_tokens - 1 decode steps) is not timed block by block: its table
is the prefill table plus the decode steps times the decode table at the request's mean cache length
(`request_table`), exact for the two tables' corrected predictions, since both are linear in the levels.

The table is cached per (CPU, runtime and its settings, batch, sequence, precision, sparsity, phase, model shape,
group size): `get_or_build_table`. How hard it is measured follows the recipe's `effort` (runtimes.policy).
"""

from __future__ import annotations

import json
import random
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from pydantic import BaseModel, ConfigDict, Field
from transformers import PretrainedConfig

from ziplm.cache import StageCache, default_stages, fingerprint, write_json_atomic
from ziplm.errors import BadInputError, UnreachableTargetError
from ziplm.families import FamilyAdapter, LayerStructure, ModelShape, ModelStructure, adapter_for
from ziplm.families.decoder import DecoderAdapter
from ziplm.families.loading import build_model
from ziplm.runtimes import fleet
from ziplm.runtimes.base import InferenceEnv, Runtime, Session, cpu_identity, get_runtime
from ziplm.runtimes.policy import TABLE_SEED, TABLE_WARMUP, MeasurementPolicy, policy
from ziplm.runtimes.timing import (BusyMachineWarning, Call, LoadGuard, MachineLoad, TimingStats,
                                  time_interleaved_guarded)
from ziplm.stages.export import export_module, writes_program
from ziplm.stages.generation import export_served, served_feeds
from ziplm.stages.quantize import deployable

SCHEMA_VERSION = 1
Progress = Callable[[str], None]


GROUP_SIZE = 32  # FFN neurons per level step (G) unless the recipe says otherwise: kernel-friendly shapes


class TableSettings(BaseModel):
    """The recipe's `latency_table:` section: what the table is (how hard it is measured is the recipe's `effort`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group_size: int = Field(GROUP_SIZE, ge=1, description="FFN neurons per level step (G)")


@dataclass(frozen=True)
class Correction:
    """measured_ms = scale * predicted_ms + offset, fitted on models measured end to end."""

    scale: float = 1.0
    offset: float = 0.0

    def apply(self, predicted_ms: float) -> float:
        return self.scale * predicted_ms + self.offset

    def invert(self, measured_ms: float) -> float:
        return (measured_ms - self.offset) / self.scale


@dataclass
class LatencyTable:
    fingerprint: str
    environment: dict[str, Any]
    shape: dict[str, Any]
    group_size: int
    unit_levels: list[int]
    attention_ms: list[float]
    ffn_levels: list[int]
    ffn_ms: list[float]
    base_ms: float
    correction: Correction
    calibration: list[dict[str, Any]]
    block_p90_ms: dict[str, list[float]]
    machine_load: dict[str, Any] = field(default_factory=dict)  # per timing ("blocks", "calibration"): MachineLoad

    @property
    def model_shape(self) -> ModelShape:
        return ModelShape(**self.shape)

    def dense_ms(self) -> float:
        """The corrected prediction for the dense model: the reference every speedup target divides."""
        return self.predict_ms(ModelStructure.dense(self.model_shape))

    def attention_cost(self, units: int) -> float:
        return self.attention_ms[self.unit_levels.index(units)]

    def ffn_cost(self, width: int) -> float:
        if width not in self.ffn_levels:
            raise BadInputError(f"FFN width {width} is not a level of this table (steps of {self.group_size})")
        return self.ffn_ms[self.ffn_levels.index(width)]

    def predict_ms(self, structure: ModelStructure, corrected: bool = True) -> float:
        raw = self.base_ms + sum(self.attention_cost(l.units) + self.ffn_cost(l.ffn) for l in structure.layers)
        return self.correction.apply(raw) if corrected else raw

    def max_speedup(self) -> float:
        """The predicted speedup with every module removed: nothing faster can be built from this table."""
        return self.dense_ms() / self.predict_ms(ModelStructure.uniform(self.model_shape, 0, 0))

    def module_budget(self, speedup: float) -> float:
        """Raw table ms the modules may take so that the corrected prediction is dense / speedup."""
        budget = self.correction.invert(self.dense_ms() / speedup) - self.base_ms
        reachable = self.max_speedup()
        if budget <= 0 or speedup > reachable:
            raise UnreachableTargetError(
                f"speedup {speedup:g}x cannot be reached in this environment: the latency table's largest reachable "
                f"speedup is {reachable:.2f}x (every module removed); lower the target")
        return budget

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["schema_version"] = SCHEMA_VERSION
        return payload

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> LatencyTable:
        if payload.get("schema_version") != SCHEMA_VERSION:
            raise BadInputError(f"latency table schema {payload.get('schema_version')} != {SCHEMA_VERSION}; rebuild it")
        fields = {k: v for k, v in payload.items() if k != "schema_version"}
        fields["correction"] = Correction(**fields["correction"])
        return cls(**fields)


def ffn_levels(ffn_size: int, group_size: int) -> list[int]:
    """0, G, 2G, ..., I (the full width is always a level, even when G does not divide it)."""
    return sorted({*range(0, ffn_size, group_size), ffn_size})


def table_fingerprint(shape: ModelShape, env: InferenceEnv, runtime: Runtime, group_size: int) -> dict[str, Any]:
    """Everything a table's numbers depend on: on a device of the fleet, its CPU and runtime, asked of it."""
    where = fleet.device_identity(env) if env.device else {"cpu": cpu_identity(), "runtime": runtime.info().to_json()}
    return {
        "schema_version": SCHEMA_VERSION,
        **where,
        "batch_size": env.batch_size,
        "sequence_length": env.sequence_length,
        "precision": env.precision,
        "shape": asdict(shape),
        "group_size": group_size,
        **({} if env.phase == "sequence" else {"phase": env.phase, "context_length": env.context_length}),
        **({"sparsity": env.sparsity} if env.sparsity else {}),
        **({"device": env.device} if env.device else {}),
    }


TABLE_FILE = "table.json"


def get_or_build_table(config: PretrainedConfig, env: InferenceEnv, group_size: int = GROUP_SIZE,
                       measure: MeasurementPolicy = policy(), progress: Progress = print, rebuild: bool = False,
                       stages: StageCache | None = None) -> tuple[LatencyTable, bool]:
    """The cached table for (shape, environment), a stage keyed by everything its numbers depend on, built first if
    needed (or when `rebuild`); a request's is combined from its phases' tables. Returns (table, was_cached)."""
    if env.phase == "request":
        (prefill, prefill_cached), (decode, decode_cached) = (
            get_or_build_table(config, phase, group_size, measure, progress, rebuild, stages)
            for phase in env.request_phases())
        return request_table(prefill, decode, env), prefill_cached and decode_cached
    adapter = adapter_for(config)
    identity = table_fingerprint(adapter.shape(config), env, get_runtime(env), group_size)
    result = (stages or default_stages(progress)).run(
        "table", identity, lambda folder, report: write_json_atomic(
            folder / TABLE_FILE, fleet.remote_table(build_table, config, env, group_size, measure) if env.device else
            build_table(config, env, group_size, measure, report).to_json()),
        lambda folder: LatencyTable.from_json(json.loads((folder / TABLE_FILE).read_text())), rebuild=rebuild)
    return result.value, result.cached


def build_table(config: PretrainedConfig, env: InferenceEnv, group_size: int = GROUP_SIZE,
                measure: MeasurementPolicy = policy(), progress: Progress = print) -> LatencyTable:
    """Time every attention and FFN level of one layer, and the calibration models end to end (module docstring)."""
    adapter = adapter_for(config)
    if env.phase == "request":
        raise ValueError("a request's table is combined from its phases' tables (get_or_build_table), not timed")
    if env.phase != "sequence" and not isinstance(adapter, DecoderAdapter):
        raise BadInputError(f"phase {env.phase} times a decoder generating over its KV cache; {config.model_type} is "
                            "not a decoder: use phase sequence")
    shape = adapter.shape(config)
    runtime = get_runtime(env)
    identity = table_fingerprint(shape, env, runtime, group_size)
    widths = ffn_levels(shape.ffn_size, group_size)
    units = list(range(shape.num_units + 1))
    torch.manual_seed(TABLE_SEED)
    with tempfile.TemporaryDirectory(prefix="ziplm-table-") as workdir:
        phase = f" ({env.describe_phase()})" if env.phase != "sequence" else ""
        progress(f"latency table{phase}: exporting {len(units)} attention and {len(widths)} FFN blocks")
        levels = {f"attention/{k}": LayerStructure(k, 0) for k in units} | {f"ffn/{w}": LayerStructure(0, w)
                                                                            for w in widths}
        feeds = {name: block_inputs(adapter, config, env, level) for name, level in levels.items()}
        sessions = {name: runtime.load(export_block(adapter, config, level, env, Path(workdir), feeds[name]))
                    for name, level in levels.items()}
        progress(f"latency table: timing {len(sessions)} blocks x {measure.block_rounds} rounds, interleaved")
        block_stats, block_load = time_sessions(sessions, feeds, measure.block_rounds, TABLE_WARMUP, measure.guard)
        _report_load("blocks", block_load, measure, progress)
        attention = [block_stats[f"attention/{k}"].median_ms - block_stats["attention/0"].median_ms for k in units]
        ffn = [block_stats[f"ffn/{w}"].median_ms - block_stats["ffn/0"].median_ms for w in widths]
        table = LatencyTable(
            fingerprint=fingerprint(identity), environment={**identity["runtime"], **env.record()},
            shape=asdict(shape), group_size=group_size, unit_levels=units, attention_ms=attention,
            ffn_levels=widths, ffn_ms=ffn, base_ms=0.0, correction=Correction(), calibration=[],
            block_p90_ms={"attention": [block_stats[f"attention/{k}"].p90_ms for k in units],
                          "ffn": [block_stats[f"ffn/{w}"].p90_ms for w in widths]},
            machine_load={"blocks": block_load.to_json()},
        )
        progress("latency table: measuring calibration models end to end")
        _calibrate(table, config, shape, env, runtime, measure, Path(workdir), progress)
    progress(f"latency table: base {table.base_ms:.2f} ms, correction x{table.correction.scale:.3f} "
             f"{table.correction.offset:+.2f} ms")
    return table


def request_table(prefill: LatencyTable, decode: LatencyTable, env: InferenceEnv) -> LatencyTable:
    """The table of a request (`env`, phase request): time = prefill + decode_steps x decode, each the table's
    corrected prediction. A corrected prediction is affine in the raw one, which is a sum over levels, so the sum of
    the two is one table whose levels are the scaled sums and whose base is the two corrected bases (correction
    identity); it predicts every structure exactly as the two tables do together."""
    if (prefill.unit_levels, prefill.ffn_levels) != (decode.unit_levels, decode.ffn_levels):
        raise ValueError("the prefill and decode tables of a request must have the same levels")
    steps, p, d = env.decode_steps, prefill.correction, decode.correction

    def combined(prefill_ms: list[float], decode_ms: list[float]) -> list[float]:
        return [p.scale * a + steps * d.scale * b for a, b in zip(prefill_ms, decode_ms)]

    calibration = [{**a, "predicted_ms": round(p.apply(a["predicted_ms"]) + steps * d.apply(b["predicted_ms"]), 4),
                    "measured_ms": round(a["measured_ms"] + steps * b["measured_ms"], 4)}
                   for a, b in zip(prefill.calibration, decode.calibration)]
    return LatencyTable(
        fingerprint=fingerprint({"prefill": prefill.fingerprint, "decode": decode.fingerprint, "decode_steps": steps}),
        environment={**prefill.environment, **env.record()}, shape=prefill.shape, group_size=prefill.group_size,
        unit_levels=prefill.unit_levels, attention_ms=combined(prefill.attention_ms, decode.attention_ms),
        ffn_levels=prefill.ffn_levels, ffn_ms=combined(prefill.ffn_ms, decode.ffn_ms),
        base_ms=p.apply(prefill.base_ms) + steps * d.apply(decode.base_ms), correction=Correction(),
        calibration=calibration, block_p90_ms={},  # the p90 of a sum is no sum of p90s: only the phases' tables have
        machine_load={f"{phase} {timing}": load for phase, table in (("prefill", prefill), ("decode", decode))
                      for timing, load in table.machine_load.items()})


class LayerBlock(nn.Module):
    """One layer of a family, called with its adapter's block inputs (keyword tensors) for export."""

    def __init__(self, adapter: FamilyAdapter, layer: nn.Module) -> None:
        super().__init__()
        self.adapter = adapter
        self.layer = layer

    def forward(self, **block_inputs: torch.Tensor) -> torch.Tensor:
        output = self.adapter.run_layer(self.layer, **block_inputs)
        return output[0] if isinstance(output, tuple) else output


def block_inputs(adapter: FamilyAdapter, config: PretrainedConfig, env: InferenceEnv,
                 structure: LayerStructure) -> dict[str, np.ndarray]:
    """What a block of `structure` is timed on in the environment's phase: the sequence (or prompt) through one
    layer, or, decoding, one token on a cache of context_length (a decoder's adapter)."""
    if env.phase != "decode":
        return adapter.block_inputs(config, env.batch_size, env.sequence_length)
    return adapter.decode_block_inputs(config, env.batch_size, env.context_length, structure.units)


def export_block(adapter: FamilyAdapter, config: PretrainedConfig, structure: LayerStructure, env: InferenceEnv,
                 workdir: Path, inputs: dict[str, np.ndarray] | None = None) -> Path:
    """One freshly initialised layer shrunk to `structure`, deployed in the environment's precision, as ONNX, traced
    on `inputs` (default: the block inputs of the environment's phase)."""
    layer = adapter.new_layer(config).eval()
    adapter.shrink_layer(layer, adapter.shape(config), structure)
    path = workdir / f"block-u{structure.units}-f{structure.ffn}.onnx"
    inputs = block_inputs(adapter, config, env, structure) if inputs is None else inputs
    block = deployable(LayerBlock(adapter, layer), lambda b: adapter.prunable_linears(b, [b.layer]), env.precision,
                       [_as_tensors(inputs)], sparsity=env.sparsity)
    return export_module(block, path, inputs, adapter.block_axes(), "hidden_states_out", {0: "batch", 1: "sequence"},
                         writes_program(env))


def _as_tensors(inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(value) for name, value in inputs.items()}


def time_sessions(sessions: dict[str, Session], inputs: dict[str, dict[str, np.ndarray]], rounds: int, warmup: int,
                  guard: LoadGuard) -> tuple[dict[str, TimingStats], MachineLoad]:
    """Time loaded sessions, each on its own inputs, interleaved in one run, in chunks that are timed again while
    other work keeps cores busy (`guard`)."""
    return time_interleaved_guarded({name: Call(session, inputs[name]) for name, session in sessions.items()}, rounds,
                                    warmup, guard)


def _report_load(timing: str, load: MachineLoad, measure: MeasurementPolicy, progress: Progress) -> None:
    """Say what other work on the machine did to one of the table's timings, and warn when it stayed busy."""
    note = load.note("chunks")
    if note:
        progress(f"latency table ({timing}): {note}")
    if load.disturbed:
        worst = max(value for value in load.other_loads if value is not None)
        warnings.warn(f"latency table ({timing}): {load.disturbed} of {len(load.other_loads)} timing chunks were "
                      f"taken while other work kept {worst:.2f} cores busy (limit {measure.max_other_load:g}), after "
                      f"{measure.retakes} retakes each; every member is solved from this table: rebuild it with "
                      "nothing else running (`ziplm latency-table --rebuild`, same environment)", BusyMachineWarning,
                      stacklevel=2)


def calibration_structures(shape: ModelShape, widths: list[int], count_random: int,
                           seed: int) -> dict[str, ModelStructure]:
    """Uniform structures at 100/75/50/25/0% plus seeded random non-uniform ones."""
    structures = {}
    for fraction in (1.0, 0.75, 0.5, 0.25, 0.0):
        units = round(shape.num_units * fraction)
        width = min(widths, key=lambda w: abs(w - shape.ffn_size * fraction))
        structures[f"uniform-{int(fraction * 100)}"] = ModelStructure.uniform(shape, units, width)
    rng = random.Random(seed)
    for index in range(count_random):
        structures[f"random-{index}"] = random_structure(shape, widths, rng)
    return structures


def random_structure(shape: ModelShape, widths: list[int], rng: random.Random) -> ModelStructure:
    return ModelStructure(tuple(LayerStructure(rng.randint(0, shape.num_units), rng.choice(widths))
                                for _ in range(shape.num_layers)))


def _calibrate(table: LatencyTable, config: PretrainedConfig, shape: ModelShape, env: InferenceEnv,
               runtime: Runtime, measure: MeasurementPolicy, workdir: Path, progress: Progress) -> None:
    """Measure calibration models end to end in one interleaved run; set base and fit the correction."""
    structures = calibration_structures(shape, table.ffn_levels, measure.random_calibration_models, TABLE_SEED)
    stats, load = measure_structures(config, structures, env, runtime, measure.calibration_rounds, TABLE_WARMUP,
                                     workdir, measure.guard)
    _report_load("calibration", load, measure, progress)
    table.machine_load["calibration"] = load.to_json()
    table.base_ms = stats["uniform-0"].median_ms
    predicted = np.array([table.predict_ms(s, corrected=False) for s in structures.values()])
    measured = np.array([stats[name].median_ms for name in structures])
    table.correction = anchored_fit(predicted, measured, table.base_ms)
    table.calibration = [
        {"name": name, "structure": s.to_json(), "predicted_ms": round(float(p), 4), "measured_ms": round(float(m), 4)}
        for (name, s), p, m in zip(structures.items(), predicted, measured)
    ]


def anchored_fit(predicted: np.ndarray, measured: np.ndarray, base_ms: float) -> Correction:
    """Least squares of measured - base = scale * (predicted - base): a line through the all-removed model.

    That model is measured end to end, so the correction leaves it exact; a free affine fit on a handful of noisy
    points can tilt far enough to predict a negative time for it (and so a negative largest reachable speedup).
    """
    x, y = predicted - base_ms, measured - base_ms
    scale = float(x @ y / (x @ x))
    return Correction(scale, base_ms * (1.0 - scale))


def measure_structures(config: PretrainedConfig, structures: dict[str, ModelStructure], env: InferenceEnv,
                       runtime: Runtime, rounds: int, warmup: int, workdir: Path,
                       guard: LoadGuard = LoadGuard()) -> tuple[dict[str, TimingStats], MachineLoad]:
    """Export a random-weight model (with the config's head) per structure, in the environment's precision (INT8
    scales from random tokens), as it is served in the environment's phase, and time them all interleaved in one run
    (guarded: time_sessions)."""
    adapter = adapter_for(config)
    inputs = adapter.example_inputs(config, env.batch_size, env.sequence_length)
    sessions = {}
    for name, structure in structures.items():
        model = deployable(build_model(config, structure=structure), adapter.prunable_linears, env.precision,
                           [_as_tensors(inputs)], sparsity=env.sparsity)
        sessions[name] = runtime.load(export_served(model, workdir / f"{name}.onnx", env))
    feeds = served_feeds(config, env)
    return time_sessions(sessions, {name: feeds(session) for name, session in sessions.items()}, rounds, warmup,
                         guard)
