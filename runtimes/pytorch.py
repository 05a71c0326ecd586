"""PyTorch, for users who serve with PyTorch: the torch.export program written beside each ONNX file, on an NVIDIA
GPU (device cuda, the default) or the CPU.

A file this runtime times is `X.pt2` beside `X.onnx`: the same module traced by torch.export when the file was
exported (ziplm.stages.export.write_program; the pipeline writes it wherever the environment's runtime is this one),
so a latency table, a closed loop and a verdict time what a PyTorch service runs, with PyTorch's kernels, not ONNX.
Load one with `torch.export.load(path).module()`. FP32 only: the INT8 files are QuantizeLinear/DequantizeLinear
graphs that PyTorch would run as float fake-quant, with no integer kernels. Timed calls take numpy inputs and return
numpy outputs, so on the GPU a measured latency includes the copies to and from it (and the wait for the kernels),
as on onnxruntime-gpu.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.export.passes import move_to_device_pass

from ziplm.errors import BadInputError, MissingEngineError
from ziplm.runtimes.base import Runtime, RuntimeInfo, cpu_identity, register_runtime

DEVICES = ("cuda", "cpu")
PROGRAM_SUFFIX = ".pt2"
PROGRAM_META = "ziplm.json"  # extra file in the program archive: its inputs' names and declared shapes


def program_path(onnx_path: Path) -> Path:
    """Where the torch.export program of an exported ONNX file lies."""
    return Path(onnx_path).with_suffix(PROGRAM_SUFFIX)


def as_tuple(output: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A program's or module's output as a tuple of tensors (one tensor: a tuple of one)."""
    return (output,) if isinstance(output, torch.Tensor) else tuple(output)


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """torch's CPU threads set to `threads` for the block (a process-wide setting: restored after)."""
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if before != threads:
            torch.set_num_threads(before)


class ProgramSession:
    """A loaded program, called with the inputs in the order it was traced with."""

    def __init__(self, program: torch.nn.Module, inputs: dict[str, list[int | str]], device: torch.device,
                 threads: int) -> None:
        self.program, self.device, self.threads = program, device, threads
        self.input_shapes = {name: tuple(shape) for name, shape in inputs.items()}
        self.input_names = tuple(inputs)

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device) for name in self.input_names]
        with torch.inference_mode(), intra_op_threads(self.threads):
            return [output.cpu().numpy() for output in as_tuple(self.program(*args))]  # waits for the device


@register_runtime
class PyTorchRuntime(Runtime):
    """Options: `device` cuda (default) or cpu, `device_id` (cuda)."""

    name = "pytorch"
    precisions = ("fp32",)
    program = True

    def __init__(self, threads: int = 2, device: str = "cuda", device_id: int = 0) -> None:
        if device not in DEVICES:
            raise BadInputError(f"unknown device {device!r} for runtime pytorch; choose one of {', '.join(DEVICES)}")
        if device == "cuda" and not torch.cuda.is_available():
            raise MissingEngineError(
                f"runtime pytorch on device cuda needs an NVIDIA GPU and a CUDA build of torch; this torch "
                f"{torch.__version__} sees no CUDA device: install torch {torch.__version__.split('+')[0]} for CUDA "
                "on a machine with an NVIDIA GPU, or set the option device: cpu to time PyTorch on the CPU")
        if device == "cuda" and device_id >= torch.cuda.device_count():
            raise BadInputError(f"device_id {device_id} is not a GPU here: torch sees {torch.cuda.device_count()}")
        self.threads, self.device_name, self.device_id = threads, device, device_id
        self.device = torch.device(f"cuda:{device_id}" if device == "cuda" else "cpu")

    def load(self, onnx_path: Path) -> ProgramSession:
        path = program_path(onnx_path)
        if not path.is_file():
            raise BadInputError(f"runtime pytorch times the torch.export program beside each ONNX file, and {path} "
                                "is missing: build the artifact with environment runtime pytorch (ziplm run writes "
                                "the program there), or export with ziplm.stages.export.export_model(..., "
                                "program=True)")
        extra = {PROGRAM_META: ""}
        try:
            program = torch.export.load(str(path), extra_files=extra)
            inputs = json.loads(extra[PROGRAM_META])["inputs"]
        except Exception as error:  # torch raises several types for a damaged archive
            raise BadInputError(f"runtime pytorch cannot load {path}: {error}; export it again") from error
        # the pass moves the weights and rewrites the devices that tensors made inside the graph were traced on
        return ProgramSession(move_to_device_pass(program, self.device).module(), inputs, self.device, self.threads)

    def info(self) -> RuntimeInfo:
        device = (torch.cuda.get_device_name(self.device) if self.device_name == "cuda" else f"CPU ({cpu_identity()})")
        return RuntimeInfo(name=self.name, version=torch.__version__, device=device, threads=self.threads,
                           options={"device": self.device_name, "device_id": self.device_id})
