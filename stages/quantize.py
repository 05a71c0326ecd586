"""INT8 quantization-aware training with hand-written fake-quant (ALGORITHMS.md section 6).

Every matmul projection of the encoder that the family adapter lists (`prunable_linears`: attention Q/K/V/O and FFN
in/out) becomes a `QuantLinear`: its weight is fake-quantized to int8, symmetric, per output channel (zero point 0, so a
pruned weight stays exactly zero; `weight_bits: 7` keeps it within -63..63, where ONNX Runtime's integer kernels on x86
without VNNI would otherwise saturate), and its INPUT is fake-quantized to uint8 per tensor with a scale calibrated on
data and then frozen. Residual branches and LayerNorm inputs stay in float: the quantizer sits inside the linear, so
only the matmul sees the quantized activation (the sparseml trap, ALGORITHMS.md section 6). The straight-through
estimator of `torch.fake_quantize_*` lets the model train with plain autograd and any optimizer; weights that are zero
when the model is prepared (an oBERT mask) get no gradient and stay zero.

The TorchScript exporter at opset 17 (ziplm.stages.export) turns each fake-quant into a QuantizeLinear /
DequantizeLinear pair, which ONNX Runtime fuses into integer kernels (MatMulIntegerToFloat, QLinearMatMul).

Recipe snippet::

    quantization:
      observer: minmax          # running min/max of each matmul input; or `ema`
      weight_bits: 8            # or 7; by default 7 where the CPU's integer kernels saturate (x86 without VNNI)

Typical use: `prepare_qat(model, adapter, settings)`, `calibrate_activations(model, tokenizer, task, settings)`
(observes the task's calibration examples, then freezes the scales), optionally fine-tune (distillation), then
`export_model`. A saved member records `ziplm_quantization` in its config.json and its scales as buffers, so
`load_model` here rebuilds it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ziplm.errors import BadInputError, ZipLMError
from ziplm.families import FamilyAdapter
from ziplm.families import loading
from ziplm.runtimes.base import Precision
from ziplm.runtimes.onnxruntime_cpu import int8_pair_sums_saturate
from ziplm.stages.masks import at_sparsity
from ziplm.tasks import Task, batches

QUANTIZATION_KEY = "ziplm_quantization"
INT8_MIN, INT8_MAX = -128, 127  # the range ONNX's QuantizeLinear writes weights in, whatever `weight_bits` uses
ACTIVATION_QMIN, ACTIVATION_QMAX = 0, 255  # uint8 activations: ONNX Runtime's fastest CPU kernels are u8 x s8
_TINY = 1e-8  # scale floor: an all-zero row or a constant activation still gets a valid (positive) scale
EMA_DECAY = 0.99  # the `ema` observer's weight of the running extremes against one batch's
CALIBRATION_EXAMPLES = 256  # task calibration examples that set the activation scales: a few batches cover the range

Batch = Mapping[str, torch.Tensor]


class QuantizationError(ZipLMError):
    """A quantized model is used in a state that cannot give correct results (for instance never calibrated)."""


def default_weight_bits() -> Literal[7, 8]:
    return 7 if int8_pair_sums_saturate() else 8


class QuantSettings(BaseModel):
    """How activations are observed, how much data calibrates them, and how wide the weights' integer range is."""

    model_config = ConfigDict(extra="forbid")

    observer: Literal["minmax", "ema"] = "minmax"
    weight_bits: Literal[7, 8] = Field(default_factory=default_weight_bits, description=(
        "weights within -127..127 (8) or -63..63 (7); by default 7 on x86 CPUs without VNNI, where ONNX Runtime's "
        "u8 x s8 kernels add pairs of products in 16 bits and saturate, so the file would not compute what was "
        "trained (chosen when the settings are made, and saved with the model)"))

    @property
    def weight_qmax(self) -> int:
        return 2 ** (self.weight_bits - 1) - 1


# --- the math: pure functions ---------------------------------------------------------------------------------------
def weight_scale(W: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-output-channel symmetric scale s_i = max_j |W_ij| / qmax (127 for 8-bit weights, 63 for 7-bit)."""
    return (W.abs().amax(dim=1) / qmax).clamp_min(_TINY)


def fake_quant_weight(W: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """s_i * clamp(round(W_ij / s_i)); zero point 0, so W_ij = 0 maps to exactly 0. The scale bounds the integers
    (|round(W_ij / s_i)| <= qmax), so the int8 clamp only matches what ONNX's QuantizeLinear does."""
    zero_point = torch.zeros_like(s, dtype=torch.int32)
    if torch.onnx.is_in_onnx_export():  # exported as QuantizeLinear / DequantizeLinear
        return torch.fake_quantize_per_channel_affine(W, s, zero_point, 0, INT8_MIN, INT8_MAX)
    return _round_trip(W, s[:, None], 0, INT8_MIN, INT8_MAX)


def activation_qparams(x_min: torch.Tensor, x_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine uint8 (scale, zero point) covering [min(x_min, 0), max(x_max, 0)], so 0 is exactly representable."""
    lo, hi = x_min.clamp_max(0.0), x_max.clamp_min(0.0)
    s = ((hi - lo) / (ACTIVATION_QMAX - ACTIVATION_QMIN)).clamp_min(_TINY)
    z = (ACTIVATION_QMIN - torch.round(lo / s)).clamp(ACTIVATION_QMIN, ACTIVATION_QMAX).to(torch.int32)
    return s, z


def fake_quant_activation(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    if torch.onnx.is_in_onnx_export():  # exported as QuantizeLinear / DequantizeLinear
        return torch.fake_quantize_per_tensor_affine(x, s, z, ACTIVATION_QMIN, ACTIVATION_QMAX)
    return _round_trip(x, s, z, ACTIVATION_QMIN, ACTIVATION_QMAX)


def _round_trip(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | int, q_min: int, q_max: int) -> torch.Tensor:
    """s * (clamp(round(x / s) + z) - z) with a straight-through gradient inside the range.

    Divides by s as ONNX Runtime's QuantizeLinear does: torch.fake_quantize_* multiplies by 1/s, which rounds some
    values the other way and made the torch model's accuracy differ from the deployed file's by about a point.
    """
    q = torch.round(x.detach() / s) + z
    inside = (q >= q_min) & (q <= q_max)
    x_hat = (q.clamp(q_min, q_max) - z) * s
    return x_hat + (x - x.detach()) * inside  # value x_hat; gradient 1 where not clipped (STE)


def observe(x_min: torch.Tensor, x_max: torch.Tensor, x: torch.Tensor, seen: int, observer: str,
            decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Update the observed range with one batch: running min/max, or an EMA of the batch extremes."""
    batch_min, batch_max = x.min(), x.max()
    if seen == 0:
        return batch_min, batch_max
    if observer == "minmax":
        return torch.minimum(x_min, batch_min), torch.maximum(x_max, batch_max)
    return decay * x_min + (1 - decay) * batch_min, decay * x_max + (1 - decay) * batch_max


def sparsity_mask(W: torch.Tensor) -> torch.Tensor | None:
    """Where W is nonzero, or None for a weight without zeros (nothing to keep)."""
    mask = W != 0
    return None if bool(mask.all()) else mask


# --- the module -----------------------------------------------------------------------------------------------------
class QuantLinear(nn.Linear):
    """A linear layer with fake-quantized int8 weights and a fake-quantized uint8 input.

    While `observing`, the input is recorded (and passed on in float); once frozen, `input_scale` and
    `input_zero_point` (buffers, saved with the weights) quantize it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, settings: QuantSettings) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.observer, self.weight_qmax = settings.observer, settings.weight_qmax
        self.observing = False
        self.register_buffer("input_min", torch.tensor(0.0))
        self.register_buffer("input_max", torch.tensor(0.0))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("observed_batches", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("weight_mask", None, persistent=False)

    @classmethod
    def wrap(cls, linear: nn.Linear, settings: QuantSettings) -> QuantLinear:
        """A QuantLinear sharing `linear`'s parameters (an optimizer or mask holding them keeps working)."""
        quant = cls(linear.in_features, linear.out_features, linear.bias is not None, settings)
        quant.weight, quant.bias = linear.weight, linear.bias
        quant.weight_mask = sparsity_mask(linear.weight.detach())
        return quant.to(linear.weight.device)

    @property
    def calibrated(self) -> bool:
        return int(self.observed_batches) > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x.detach())
        else:
            x = fake_quant_activation(x, self.input_scale, self.input_zero_point)
        W = self.weight if self.weight_mask is None else self.weight * self.weight_mask
        return F.linear(x, fake_quant_weight(W, weight_scale(W.detach(), self.weight_qmax)), self.bias)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        x_min, x_max = observe(self.input_min, self.input_max, x, int(self.observed_batches), self.observer,
                               EMA_DECAY)
        self.input_min.copy_(x_min)
        self.input_max.copy_(x_max)
        self.observed_batches += 1

    @torch.no_grad()
    def freeze(self) -> None:
        """Stop observing and fix the input's quantization parameters from the observed range."""
        if not self.calibrated:
            raise QuantizationError("a quantized linear was never calibrated: run calibrate_activations first")
        s, z = activation_qparams(self.input_min, self.input_max)
        self.input_scale.copy_(s)
        self.input_zero_point.copy_(z)
        self.observing = False


# --- orchestration --------------------------------------------------------------------------------------------------
def quant_linears(module: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, QuantLinear)}


def quantize_linears(root: nn.Module, linears: Mapping[str, nn.Linear],
                     settings: QuantSettings) -> dict[str, QuantLinear]:
    """Swap each of `linears` (modules inside `root`) for a QuantLinear sharing its parameters, in place."""
    already = [name for name, linear in linears.items() if isinstance(linear, QuantLinear)]
    if already:
        raise BadInputError(f"{already[0]} is already quantized; prepare a model for QAT once")
    swapped = {name: QuantLinear.wrap(linear, settings) for name, linear in linears.items()}
    by_id = {id(linear): swapped[name] for name, linear in linears.items()}
    for parent in list(root.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in by_id:
                setattr(parent, child_name, by_id[id(child)])
    return swapped


def prepare_qat(model: PreTrainedModel, adapter: FamilyAdapter, settings: QuantSettings = QuantSettings()
                ) -> dict[str, QuantLinear]:
    """Make `model` a fake-quant model in place (the adapter's prunable linears) and record it in its config."""
    swapped = quantize_linears(model, adapter.prunable_linears(model), settings)
    record_quantization(model.config, settings, swapped)
    return swapped


def set_observing(module: nn.Module, on: bool) -> None:
    for quant in quant_linears(module).values():
        quant.observing = on


def freeze_observers(module: nn.Module) -> None:
    for quant in quant_linears(module).values():
        quant.freeze()


@torch.no_grad()
def calibrate(module: nn.Module, inputs: Iterable[Batch]) -> None:
    """Observe every quantized linear's input on `inputs` (module(**batch) each), then freeze the scales."""
    if not quant_linears(module):
        raise BadInputError("nothing to calibrate: the module has no quantized linears (call prepare_qat first)")
    was_training = module.training
    module.eval()
    set_observing(module, True)
    try:
        for batch in inputs:
            module(**batch)
    finally:
        set_observing(module, False)
        module.train(was_training)
    freeze_observers(module)


def example_batches(tokenizer: PreTrainedTokenizerBase, task: Task, device: torch.device | str = "cpu") -> list[Batch]:
    """The task's first CALIBRATION_EXAMPLES calibration examples, encoded in batches (a list: it can be replayed)."""
    if not task.calibration:
        raise BadInputError("cannot calibrate activations without calibration examples: give the task a "
                            "calibration_fraction above 0")
    chosen = task.calibration[:CALIBRATION_EXAMPLES]
    return [task.encode(tokenizer, batch, device) for batch in batches(chosen, task.batch_size)]


def calibrate_activations(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task) -> None:
    """Post-training calibration of a prepared model's activation scales on the task's data; freezes them."""
    calibrate(model, example_batches(tokenizer, task, model.device))


def is_quantized(module: nn.Module) -> bool:
    return bool(quant_linears(module))


def deployable(module: nn.Module, find_linears: Callable[[nn.Module], Mapping[str, nn.Linear]], precision: Precision,
               calibration_inputs: Iterable[Batch], settings: QuantSettings = QuantSettings(),
               sparsity: float = 0.0) -> nn.Module:
    """`module` as it is deployed in `precision` with `sparsity` zeros: the one place that decides what gets exported
    and timed.

    sparsity: a float module with fewer zeros in its linears is first copied with its smallest weights zeroed to it
    (masks.at_sparsity; the chain's final sparsity, for files timed before oBERT has run). fp32: the module itself
    (it must not be fake-quantized). int8: an already quantized module itself, which must be calibrated; for a float
    module, a quantized copy (`find_linears(copy)` swapped for QuantLinears) calibrated on `calibration_inputs`,
    which are consumed only then (random inputs are fine where only latency matters).
    """
    if sparsity and not is_quantized(module):
        module = at_sparsity(module, find_linears, sparsity)
    if precision == "fp32":
        if is_quantized(module):
            raise BadInputError("the model is INT8-quantized but the environment's precision is fp32; "
                                "set environment.precision: int8")
        return module
    if is_quantized(module):
        uncalibrated = [name for name, quant in quant_linears(module).items() if not quant.calibrated]
        if uncalibrated:
            raise QuantizationError(f"{uncalibrated[0]} was never calibrated: run calibrate_activations before export")
        return module
    quantized = copy.deepcopy(module)
    linears = find_linears(quantized)
    if not linears:  # every matmul removed: nothing runs in INT8
        return module
    swapped = quantize_linears(quantized, linears, settings)
    if isinstance(quantized, PreTrainedModel):
        record_quantization(quantized.config, settings, swapped)
    calibrate(quantized, calibration_inputs)
    return quantized


# --- saving and reloading -------------------------------------------------------------------------------------------
def record_quantization(config: PretrainedConfig, settings: QuantSettings, swapped: Mapping[str, QuantLinear]) -> None:
    setattr(config, QUANTIZATION_KEY, {"settings": settings.model_dump(), "modules": sorted(swapped)})


def recorded_quantization(config: PretrainedConfig) -> dict[str, Any] | None:
    return getattr(config, QUANTIZATION_KEY, None)


def restore_quantization(model: PreTrainedModel, adapter: FamilyAdapter, record: Mapping[str, Any]) -> None:
    """Re-apply a recorded quantization to a freshly built model whose float weights are already loaded.

    The scales themselves are buffers: load the saved state dict afterwards.
    """
    linears = adapter.prunable_linears(model)
    if sorted(linears) != sorted(record["modules"]):
        raise BadInputError(f"the recorded {QUANTIZATION_KEY} lists modules {record['modules'][:3]}..., the model has "
                            f"{sorted(linears)[:3]}...: the config does not belong to these weights")
    # members saved before `weight_bits` existed were trained with 8-bit weights, whatever this CPU's default is
    recorded = {key: value for key, value in record["settings"].items() if key in QuantSettings.model_fields}
    prepare_qat(model, adapter, QuantSettings(**{"weight_bits": 8, **recorded}))


def load_model(name_or_path: str, head: str | None = None) -> PreTrainedModel:
    """Load any model the pipeline writes, with `head` (default: its family's): dense, ZipLM-shrunk, or INT8
    fake-quant (whose recorded quantization is re-applied after the float weights are in, because it keeps the zeros
    it finds, then its scales are loaded)."""
    return loading.load_model(name_or_path, head, {QUANTIZATION_KEY: restore_quantization})
