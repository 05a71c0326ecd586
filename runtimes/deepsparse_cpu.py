"""DeepSparse on the CPU, where unstructured sparsity buys speed: its kernels skip the zeros of sparse weights, which
ONNX Runtime densifies. deepsparse 1.8.0 pins numpy<2 and onnx<1.15, so it runs in a worker process in its own
environment (runtimes.worker; `ziplm runtimes install deepsparse`), which loads, runs and times the models itself.

DeepSparse is licensed for evaluation, not production (Neural Magic's DeepSparse Community License): a family solved
in it says how fast a sparse model can run, and deploying it is the user's licence to settle.

Files: DeepSparse rewrites the file it compiles, so it is given a temporary copy, converted (opset 17) where the file is
newer than it accepts (ONNX IR version <= 9, opset <= 19). Its engines take static shapes, so each model is compiled
for the input shapes it is run on (runtimes.deepsparse_worker): it serves whole-sequence files (phase sequence), not a
decoder's growing KV cache. Settings: `threads` cores, one stream, its default scheduler; the CPU's instruction set
as DeepSparse reads it (its sparse INT8 kernels need VNNI) is recorded in `info().options`, and so in every latency
table's fingerprint.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import version_converter

from ziplm.errors import BadInputError
from ziplm.runtimes import wire
from ziplm.runtimes.base import Runtime, RuntimeInfo, cpu_identity, register_runtime
from ziplm.runtimes.worker import EngineEnvironment, Worker, WorkerError

DEEPSPARSE = EngineEnvironment("deepsparse", ("deepsparse==1.8.0",), ("3.11", "3.10", "3.9"))
WORKER_SCRIPT = Path(__file__).with_name("deepsparse_worker.py")
MAX_IR_VERSION, MAX_OPSET, CONVERTED_OPSET = 9, 19, 17
_worker: Worker | None = None


def shared_worker() -> Worker:
    """This process's one DeepSparse worker, started on first use (again if it ended)."""
    global _worker
    if _worker is None or not _worker.alive():
        _worker = Worker(DEEPSPARSE, WORKER_SCRIPT)
    return _worker


def private_copy(onnx_path: Path, header: onnx.ModelProto, workdir: Path) -> Path:
    """A copy of the file (whose `header` is the file without its external data) in `workdir`, in a form DeepSparse
    accepts. DeepSparse rewrites the file it compiles (its input-shape override is saved into it), so it never gets
    the caller's; newer IR versions and opsets are converted (IR 9, opset 17)."""
    opset = next((entry.version for entry in header.opset_import if entry.domain in ("", "ai.onnx")), 0)
    external = any(weight.data_location == onnx.TensorProto.EXTERNAL for weight in header.graph.initializer)
    copy = workdir / onnx_path.name
    if header.ir_version <= MAX_IR_VERSION and opset <= MAX_OPSET and not external:
        shutil.copyfile(onnx_path, copy)
        return copy
    model = onnx.load(str(onnx_path))
    if opset > MAX_OPSET:
        model = version_converter.convert_version(model, CONVERTED_OPSET)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.save(model, str(copy), save_as_external_data=external)
    return copy


def declared_inputs(graph: onnx.GraphProto) -> dict[str, tuple[int | str, ...]]:
    """The graph's inputs (initializers excluded) and their declared shapes, a name for a dynamic axis."""
    weights = {initializer.name for initializer in graph.initializer}
    return {value.name: tuple(dim.dim_value if dim.HasField("dim_value") else dim.dim_param or "?"
                              for dim in value.type.tensor_type.shape.dim)
            for value in graph.input if value.name not in weights}


class DsSession:
    """A model the worker holds. `run` crosses the pipe (for scores and parity); timing hands its Calls to `timer`,
    the worker's own loop."""

    def __init__(self, worker: Worker, onnx_path: Path, cores: int) -> None:
        self._files = tempfile.TemporaryDirectory(prefix="ziplm-deepsparse-")
        header = onnx.load(str(onnx_path), load_external_data=False)
        path = private_copy(onnx_path, header, Path(self._files.name))
        self.input_shapes = declared_inputs(header.graph)  # a conversion keeps the graph's inputs
        self.input_names = tuple(self.input_shapes)
        self.worker = worker
        self.model = worker.call("load", path=str(path), input_names=list(self.input_names), cores=cores)
        weakref.finalize(self, _drop, worker, self.model)
        self.timer = worker.time_calls

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        feed = wire.encode_feed({name: inputs[name] for name in self.input_names})
        return [wire.decode(output) for output in self.worker.call("run", model=self.model, feed=feed)]


def _drop(worker: Worker, model: int) -> None:
    if worker.alive():
        worker.call("drop", model=model)


@register_runtime
class DeepSparseCPU(Runtime):
    """DeepSparse on `threads` cores, one stream (no options)."""

    name = "deepsparse"
    phases = ("sequence",)
    environment = DEEPSPARSE

    def __init__(self, threads: int = 2) -> None:
        self.threads = threads
        DEEPSPARSE.require()
        self.worker = shared_worker()
        self.engine = self.worker.call("hello")

    def load(self, onnx_path: Path) -> DsSession:
        try:
            return DsSession(self.worker, onnx_path, self.threads)
        except (OSError, DecodeError, WorkerError) as error:
            raise BadInputError(f"deepsparse cannot load {onnx_path}: {error}") from error

    def info(self) -> RuntimeInfo:
        cpu = self.engine["cpu"]
        return RuntimeInfo(name=self.name, version=self.engine["version"], device=f"CPU ({cpu_identity()})",
                           threads=self.threads, options={"num_streams": 1, "isa": cpu["isa"], "vnni": cpu["vnni"]})
