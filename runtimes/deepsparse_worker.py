"""The DeepSparse worker: a process in DeepSparse's own virtual environment (`ziplm runtimes install deepsparse`),
started by ziplm.runtimes.deepsparse_cpu, that serves its commands over stdin and stdout (runtimes.wire) until stdin
closes. It imports only the standard library, numpy, deepsparse and its two sibling modules below.

It holds the models the core loaded. DeepSparse compiles an engine for static input shapes, so each model is compiled
for the shapes it is first run on, and again for new ones (the last ENGINES_PER_MODEL kept). Timing runs here, in
the loop the core uses (runtimes.interleave), every engine compiled first: no pipe is inside a measurement.

    hello                                        -> {"version", "cpu"}
    load  {"path", "input_names", "cores"}       -> model id
    run   {"model", "feed"}                      -> outputs (encoded)
    time  {"calls": {name: (model, feed)}, "rounds", "warmup", "max_seconds", "min_rounds"} -> {name: [ms, ...]}
    drop  {"model"}                              -> None
"""

import importlib.util
import os
import sys
import traceback
from collections import OrderedDict
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the script's folder is the core package's: none of its other modules may shadow this environment's packages
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]

import deepsparse  # noqa: E402  (this environment's, after the path is cleaned)
from deepsparse.cpu import cpu_architecture  # noqa: E402

ENGINES_PER_MODEL = 4


def sibling(name):
    """One of the core package's standard-library modules, loaded by file (the package itself needs torch)."""
    spec = importlib.util.spec_from_file_location(f"ziplm_worker_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wire = sibling("wire")
interleave = sibling("interleave")


class Model:
    """One ONNX file and the engines compiled for it, by input shapes."""

    def __init__(self, path, input_names, cores):
        self.path, self.input_names, self.cores = path, list(input_names), cores
        self.engines = OrderedDict()

    def inputs(self, feed):
        return [feed[name] for name in self.input_names]

    def engine(self, inputs):
        shapes = tuple(tuple(value.shape) for value in inputs)
        if shapes not in self.engines:
            self.engines[shapes] = deepsparse.compile_model(
                self.path, batch_size=shapes[0][0], num_cores=self.cores, num_streams=1,
                input_shapes=[list(shape) for shape in shapes])
            while len(self.engines) > ENGINES_PER_MODEL:
                self.engines.popitem(last=False)
        self.engines.move_to_end(shapes)
        return self.engines[shapes]

    def runner(self, feed):
        inputs = self.inputs(feed)
        engine = self.engine(inputs)
        return lambda: engine.run(inputs)


class Worker:
    def __init__(self):
        self.models = {}
        self.next_id = 0

    def hello(self):
        architecture = cpu_architecture()
        return {"version": deepsparse.__version__, "cpu": {key: architecture[key] for key in ("isa", "vnni")}}

    def load(self, path, input_names, cores):
        self.next_id += 1
        self.models[self.next_id] = Model(path, input_names, cores)
        return self.next_id

    def run(self, model, feed):
        return [wire.encode(output) for output in self.models[model].runner(wire.decode_feed(feed))()]

    def time(self, calls, rounds, warmup, max_seconds, min_rounds):
        runners = {name: self.models[model].runner(wire.decode_feed(feed)) for name, (model, feed) in calls.items()}
        return interleave.interleaved_samples(runners, rounds, warmup, max_seconds, min_rounds)

    def drop(self, model):
        self.models.pop(model, None)


def serve():
    channel_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the engine prints goes to the log, never into the channel
    channel_in = os.fdopen(0, "rb")
    worker = Worker()
    while True:
        try:
            command, arguments = wire.receive(channel_in)
        except EOFError:
            return
        try:
            wire.send(channel_out, "ok", getattr(worker, command)(**arguments))
        except Exception as error:  # every failure goes back to the core, which raises it with the file named
            traceback.print_exc()
            wire.send(channel_out, "error", f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    serve()
