"""ONNX export: one path for whole models and for the single blocks that latency tables time.

The TorchScript exporter (dynamo=False) at opset 17 is used throughout: it handles the eager attention of
transformers 5.x, and is the exporter that turns fake-quant into QuantizeLinear/DequantizeLinear pairs
(docs/measurement.md). Models are called through a small wrapper with keyword arguments, because positional calls
trip over transformers' `use_cache` argument. What a model takes (input names, example inputs) comes from its family
adapter; its exported output is the first field of what its head returns (`logits`, or `last_hidden_state` for a
model without a head). For a runtime that serves the PyTorch program (runtime pytorch), each file also gets its
torch.export program beside it (`write_program`).
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import warnings
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ziplm.errors import ZipLMError
from ziplm.families import adapter_for
from ziplm.runtimes.base import InferenceEnv, Precision, runtime_class
from ziplm.runtimes.pytorch import PROGRAM_META, as_tuple, program_path

OPSET = 17
# How far ONNX Runtime's outputs may lie from PyTorch's. INT8: ORT accumulates in int32 and torch in float, so a value
# near a rounding tie can land one integer apart and the flips compound through the layers
# (benchmarks/results/int8_parity.md); a wrong scale or a float file is far off this.
PARITY_ATOL: dict[str, float] = {"fp32": 1e-4, "int8": 0.3}
# An fp32 export is judged against the model computed in float64: ONNX Runtime may be this many times as far from it
# as PyTorch's own fp32 result is (plus the absolute tolerance). A language model's residual stream carries
# activations in the ten thousands (SmolLM2: up to 22,000), where fp32 rounding alone moves logits by 1e-2 to 4e-2,
# in other directions in the two runtimes (ONNX Runtime sums in another order): measured ratios 0.96 to 1.35. An
# export bug puts ONNX Runtime far from float64 while PyTorch stays close.
FP32_ERROR_RATIO = 4.0


class ExportParityError(ZipLMError):
    """The ONNX model's outputs differ from PyTorch's beyond tolerance."""

    exit_code = 1


class _KeywordCall(nn.Module):
    """Calls a Hugging Face model with keyword arguments and returns its first output tensor."""

    def __init__(self, model: nn.Module, input_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        output = self.model(**dict(zip(self.input_names, tensors)))
        if isinstance(output, torch.Tensor):
            return output
        return output.logits if hasattr(output, "logits") else output[0]


def export_module(module: nn.Module, path: Path, example: dict[str, np.ndarray],
                  dynamic_axes: dict[str, dict[int, str]], output_name: str,
                  output_axes: dict[int, str] | None = None, program: bool = False) -> Path:
    """Export `module(**example)` to `path` as one self-contained ONNX file (written atomically), its output's
    dynamic axes `output_axes` (default: batch first), and with `program` its torch.export program beside it; the
    module is left in eval mode."""
    names = list(example)
    return write_onnx(_KeywordCall(module, names), path, {name: torch.from_numpy(example[name]) for name in names},
                      [output_name], {**dynamic_axes, output_name: output_axes or {0: "batch"}}, program)


def write_onnx(call: nn.Module, path: Path, inputs: dict[str, torch.Tensor], output_names: Sequence[str],
               dynamic_axes: dict[str, dict[int, str]], program: bool = False) -> Path:
    """Trace `call(*inputs.values())` into one self-contained ONNX file at `path`, written atomically (the exporter
    leaves `call` in eval mode, and the modules inside it); with `program`, `write_program` too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with torch.no_grad(), warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(call.eval(), tuple(inputs.values()), str(tmp), input_names=list(inputs),
                          output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=OPSET,
                          dynamo=False, do_constant_folding=True)
    if program:
        write_program(call, program_path(path), inputs, dynamic_axes)
    else:
        program_path(path).unlink(missing_ok=True)  # never a program of an earlier file beside this one
    tmp.replace(path)
    return path


class _Positional(nn.Module):
    """`call(*tensors)`, whatever names its forward gives them: one flat argument list for torch.export."""

    def __init__(self, call: nn.Module) -> None:
        super().__init__()
        self.call = call

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self.call(*tensors)


def write_program(call: nn.Module, path: Path, inputs: dict[str, torch.Tensor],
                  dynamic_axes: dict[str, dict[int, str]]) -> Path:
    """Trace `call(*inputs.values())` with torch.export into a program archive at `path` (written atomically), the
    axes in `dynamic_axes` left dynamic where the trace allows, the inputs' names and declared shapes inside it
    (PROGRAM_META); checked to give what `call` gives (raises ExportParityError). Where every input has a batch axis
    of 1, it is traced at batch 2: torch.export fixes an axis traced at size 1."""
    declared = {name: [dynamic_axes.get(name, {}).get(axis, size) for axis, size in enumerate(tensor.shape)]
                for name, tensor in inputs.items()}
    if all(0 in dynamic_axes.get(name, {}) and tensor.shape[0] == 1 for name, tensor in inputs.items()):
        inputs = {name: torch.cat([tensor, tensor]) for name, tensor in inputs.items()}
    inputs = {name: tensor.contiguous() for name, tensor in inputs.items()}  # strides would be guarded too
    shapes = (tuple({axis: torch.export.Dim.AUTO for axis in dynamic_axes.get(name, {}) if tensor.shape[axis] != 1}
                    or None for name, tensor in inputs.items()),)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(_Positional(call.eval()), tuple(inputs.values()), dynamic_shapes=shapes,
                                      strict=False)
        expected, actual = (as_tuple(run(*inputs.values())) for run in (call, program.module()))
    diff = max(float((a - e).abs().max()) for a, e in zip(actual, expected))
    if diff > PARITY_ATOL["fp32"]:
        raise ExportParityError(f"the torch.export program for {path} differs from the module by {diff:.2e}")
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")  # torch.export.save wants the .pt2 ending
    torch.export.save(program, str(tmp), extra_files={PROGRAM_META: json.dumps({"inputs": declared})})
    tmp.replace(path)
    return path


def with_program(onnx_path: Path) -> list[Path]:
    """The ONNX file and, where one was written beside it, its torch.export program."""
    program = program_path(onnx_path)
    return [Path(onnx_path), *([program] if program.is_file() else [])]


def copy_served(onnx_path: Path, to: Path) -> None:
    """Copy an exported file to `to`, and its program (where it has one) beside the copy."""
    for file in with_program(onnx_path):
        shutil.copyfile(file, to.with_suffix(file.suffix))


def writes_program(env: InferenceEnv) -> bool:
    """Whether files timed or served in `env` need their torch.export program beside them."""
    return runtime_class(env.runtime).program


def export_model(model: PreTrainedModel, path: Path, batch_size: int = 1, sequence_length: int | None = None,
                 program: bool = False) -> Path:
    """Export a model of a registered family (with its head, or without) with dynamic batch and sequence axes, traced
    at `sequence_length` (default: the longest up to 128 that the model takes); with `program`, its torch.export
    program beside it."""
    example = adapter_for(model.config).example_inputs(model.config, batch_size,
                                                       sequence_length or longest_sequence(model.config))
    axes = {name: {0: "batch", 1: "sequence"} for name in example}
    return export_module(model, path, example, axes, *output_signature(model, example), program=program)


def export_checked(model: PreTrainedModel, path: Path, env: InferenceEnv) -> ParityReport:
    """Export at the environment's batch and sequence, then check parity at its precision's tolerance (raises
    ExportParityError): every artifact that is timed or shipped goes through here."""
    return verify_export(model, export_model(model, path, env.batch_size, env.sequence_length, writes_program(env)),
                         atol=parity_atol(env.precision), against_float64=env.precision == "fp32")


def output_signature(model: nn.Module, example: dict[str, np.ndarray]) -> tuple[str, dict[int, str]]:
    """The name of the first field of the model's output on `example` (what `_KeywordCall` returns) and its dynamic
    axes: batch, and sequence where it has one value per token (a language model's logits)."""
    with torch.no_grad():
        output = model.eval()(**{name: torch.from_numpy(value) for name, value in example.items()})
    name = "output" if isinstance(output, torch.Tensor) else next(iter(output.keys()))
    tensor = output if isinstance(output, torch.Tensor) else output[name]
    per_token = tensor.dim() == 3 and tensor.shape[1] == example["input_ids"].shape[1]
    return name, {0: "batch", 1: "sequence"} if per_token else {0: "batch"}


def longest_sequence(config: PretrainedConfig) -> int:
    """The longest sequence up to 128 that a model of `config` takes: what export and parity checks use by default."""
    return min(128, adapter_for(config).max_sequence_length(config))


@dataclass
class ParityReport:
    max_abs_diff: float
    checked_shapes: list[tuple[int, int]]
    failures: list[str] = field(default_factory=list)
    fp32_error: float = 0.0  # PyTorch fp32's largest distance from the float64 result, where it was computed


def _torch_output(model: nn.Module, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The model's exported output on `feed`, as float64 numbers."""
    with torch.no_grad():
        return _KeywordCall(model.eval(), list(feed))(*(torch.from_numpy(v) for v in feed.values())).double().numpy()


def parity_atol(precision: Precision) -> float:
    return PARITY_ATOL[precision]


def verify_export(model: PreTrainedModel, onnx_path: Path, atol: float = PARITY_ATOL["fp32"],
                  shapes: Sequence[tuple[int, int]] | None = None, against_float64: bool = False) -> ParityReport:
    """Run PyTorch and ONNX Runtime on several input shapes; raise with every failure at once. An output passes where
    max |onnx - torch| <= atol, or, `against_float64`, where ONNX Runtime is no farther from the model computed in
    float64 than atol + FP32_ERROR_RATIO x PyTorch fp32's own distance from it.

    Default shapes: batch 1 at the longest sequence up to 128 the model takes, and batch 2 at a short, odd length.
    """
    import onnxruntime as ort  # the runtime of record for parity, whatever runtime serves latency

    adapter = adapter_for(model.config)
    longest = longest_sequence(model.config)
    shapes = shapes or ((1, longest), (2, min(17, longest)))
    exact = copy.deepcopy(model).double() if against_float64 else None

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    session_inputs = {i.name for i in session.get_inputs()}
    report = ParityReport(max_abs_diff=0.0, checked_shapes=list(shapes))
    for batch, sequence in shapes:
        example = adapter.example_inputs(model.config, batch, sequence, seed=batch * 1000 + sequence)
        if batch > 1:
            example["attention_mask"][-1, sequence * 3 // 4:] = 0  # one padded row, so masking is checked too
        feed = {name: value for name, value in example.items() if name in session_inputs}
        (actual,) = session.run(None, feed)
        expected = _torch_output(model, feed)
        if actual.shape != expected.shape:
            report.failures.append(f"shape {batch}x{sequence}: ONNX {actual.shape} vs torch {expected.shape}")
            continue
        diff = float(np.abs(actual - expected).max())
        report.max_abs_diff = max(report.max_abs_diff, diff)
        if exact is None:
            if diff > atol:
                report.failures.append(f"shape {batch}x{sequence}: max |diff| {diff:.2e} > {atol:.0e}")
            continue
        reference = _torch_output(exact, feed)
        onnx_error, fp32_error = (float(np.abs(output - reference).max()) for output in (actual, expected))
        report.fp32_error = max(report.fp32_error, fp32_error)
        if diff > atol and onnx_error > atol + FP32_ERROR_RATIO * fp32_error:
            report.failures.append(f"shape {batch}x{sequence}: max |diff| {diff:.2e}; ONNX Runtime is {onnx_error:.2e} "
                                   f"from float64, PyTorch fp32 {fp32_error:.2e}")
    if report.failures:
        raise ExportParityError(f"ONNX export of {onnx_path} does not match PyTorch: " + "; ".join(report.failures))
    return report
