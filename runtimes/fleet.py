"""Target devices as Ray resources (docs/scale-out.md): an environment that names `device: NAME` is measured on a
node of a Ray cluster that advertises the custom resource `device:NAME`, never on the machine that runs the pipeline.

One `DeviceHost` actor per device holds that node's one `device:NAME` resource for the whole run, so measurements on
a device never overlap (a Ray actor runs its calls one at a time). It builds the latency tables of that device's
environments and holds the dense session of each of its paired verifiers; the files it times travel to it as bytes
through Ray's object store, and what comes back (a table, a check) is small. The driver keeps the stage cache.

On the driver, `get_runtime` of such an environment is a `DeviceRuntime`: its info is the device's, and a file it
loads runs on the device (`RemoteSession`: the accuracy of a member's file is scored in the runtime it is served in),
so the driver needs none of the device's engines. Sent to the device, it is that device's own runtime again.

`connect(address)` joins a cluster for the rest of the process; without it nothing here runs, and an environment that
names a device is refused (`require`). Ray is the `fleet` extra, imported only here and only when connected.
"""

from __future__ import annotations

import os
import socket
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ziplm.errors import BadInputError, MissingEngineError, ZipLMError
from ziplm.runtimes.base import InferenceEnv, Runtime, RuntimeInfo, Session, cpu_identity
from ziplm.runtimes.policy import MeasurementPolicy
from ziplm.runtimes.timing import TimingStats


class FleetSettings(BaseModel):
    """`ray:` in a recipe (or --ray): the cluster whose nodes measure the environments that name a device."""

    model_config = ConfigDict(extra="forbid")

    address: str = Field(description="the Ray cluster's address, e.g. 10.0.0.5:6379 (or auto)")


RESOURCE_PREFIX = "device:"
POLL_SECONDS = 1.0  # how often a waiting call checks that some node still offers its device


class DeviceLostError(ZipLMError):
    """The node of a device went away while it measured, and no other node offers the device."""


def resource(device: str) -> str:
    return f"{RESOURCE_PREFIX}{device}"


def start_command(address: str, device: str) -> str:
    """The command that starts a node offering `device` on the cluster at `address` (run on the device)."""
    return f"`ray start --address {address} --resources '{{\"{resource(device)}\": 1}}'`"


class DeviceHost:
    """The actor on a device's node: builds tables and times files there. Files arrive as {name: bytes} and are
    written to a folder of its own, so that a file and what sits beside it (a program, external data) load together."""

    def __init__(self, device: str) -> None:
        global _ON_DEVICE
        _ON_DEVICE = self.device = device  # this process measures on the device itself
        self.folder = Path(tempfile.mkdtemp(prefix=f"ziplm-device-{device}-"))
        self.verifiers: dict[str, Any] = {}
        self.sessions: dict[str, Session] = {}
        self.received = 0

    def node(self) -> dict[str, Any]:
        """Where a call ran: the Ray node, host and process (recorded with every table and check a device makes)."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
                "device": self.device}

    def identity(self, env: InferenceEnv) -> dict[str, Any]:
        return local_identity(env)

    def build_table(self, build: Callable[..., Any], config: dict[str, Any], env: InferenceEnv, group_size: int,
                    measure: MeasurementPolicy) -> tuple[dict[str, Any], dict[str, Any]]:
        """`build` (stages.latency_table.build_table, given by the caller) run here on the config."""
        from transformers import AutoConfig

        config = AutoConfig.for_model(**config)
        return build(config, env, group_size, measure, progress=lambda _: None).to_json(), self.node()

    def open_verifier(self, key: str, runtime: Runtime, env: InferenceEnv, files: dict[str, bytes], dense: str,
                      inputs: Any, policy: MeasurementPolicy, tolerance: float) -> dict[str, Any]:
        """A PairedVerifier here; `runtime` is the caller's (a DeviceRuntime, or one wrapping it as a phase serves
        files), which arrives as this device's own."""
        from ziplm.runtimes.paired import PairedVerifier

        path = self._receive(key, files, dense)
        self.verifiers[key] = PairedVerifier(runtime, env, path, inputs, policy, tolerance)
        return self.node()

    def open_session(self, key: str, env: InferenceEnv, files: dict[str, bytes],
                     main: str) -> tuple[tuple[str, ...], dict[str, tuple[int | str, ...]]]:
        """Load a file in the environment's runtime here; its input names and shapes."""
        from ziplm.runtimes import get_runtime

        session = self.sessions[key] = get_runtime(env).load(self._receive(key, files, main))
        return session.input_names, session.input_shapes

    def run_session(self, key: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[key].run(inputs)

    def close_session(self, key: str) -> None:
        self.sessions.pop(key, None)

    def call(self, key: str, method: str, files: dict[str, bytes], member: str | None,
             *arguments: Any) -> tuple[Any, dict[str, Any]]:
        """`method` of verifier `key` on the member file among `files` (or on nothing: measure_dense)."""
        verifier = self.verifiers[key]
        self.received += 1
        paths = () if member is None else (self._receive(f"{key}-{self.received}", files, member),)
        return getattr(verifier, method)(*paths, *arguments), self.node()

    def _receive(self, name: str, files: dict[str, bytes], main: str) -> Path:
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        for file, content in files.items():
            (folder / file).write_bytes(content)
        return folder / main


@dataclass
class Fleet:
    """A connection to a Ray cluster and the device hosts started on it so far."""

    address: str
    hosts: dict[str, Any] = field(default_factory=dict)

    def devices(self) -> dict[str, list[str]]:
        """Every device the cluster's live nodes offer, with the ids of the nodes that offer it."""
        import ray

        offered: dict[str, list[str]] = {}
        for node in ray.nodes():
            for name in node.get("Resources", {}) if node.get("Alive") else {}:
                if name.startswith(RESOURCE_PREFIX):
                    offered.setdefault(name[len(RESOURCE_PREFIX):], []).append(node["NodeID"])
        return offered

    def check(self, device: str) -> None:
        """BadInputError naming the devices the cluster has, where no live node offers `device`."""
        offered = self.devices()
        if device not in offered:
            raise BadInputError(f"no node of the Ray cluster at {self.address} offers device {device!r} (resource "
                                f"{resource(device)}); it has: {', '.join(sorted(offered)) or 'no devices'}. Start a "
                                f"node on the device with {start_command(self.address, device)}, or name one of "
                                "those")

    def host(self, device: str) -> Any:
        """The device's actor, started on a node that offers it (once per run)."""
        import ray

        if device not in self.hosts:
            self.check(device)
            actor = ray.remote(DeviceHost).options(resources={resource(device): 1}, num_cpus=0, max_restarts=0)
            self.hosts[device] = actor.remote(device)
        return self.hosts[device]

    def ask(self, device: str, method: str, doing: str, *arguments: Any) -> Any:
        """`method` of the device's host called with `arguments`, and its result (`get`)."""
        return self.get(device, getattr(self.host(device), method).remote(*arguments), doing)

    def get(self, device: str, ref: Any, doing: str) -> Any:
        """The result of a call on `device`, or DeviceLostError once its node is gone and no other offers it."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        while True:
            ready, _ = ray.wait([ref], timeout=POLL_SECONDS)
            if ready:
                try:
                    return ray.get(ref)
                except RayTaskError as error:  # what failed there fails here as itself, saying where
                    if isinstance(error.cause, ZipLMError):
                        raise type(error.cause)(f"on device {device!r}: {error.cause}") from error
                    raise
                except RayActorError as error:
                    self.hosts.pop(device, None)
                    raise DeviceLostError(f"device {device!r} went away while {doing}: {type(error).__name__}. "
                                          f"{self._lost_hint(device)}") from error
            if device not in self.devices():
                self.hosts.pop(device, None)
                raise DeviceLostError(f"device {device!r}: its node left the Ray cluster at {self.address} while "
                                      f"{doing}. {self._lost_hint(device)}")

    def _lost_hint(self, device: str) -> str:
        return (f"Start its node again ({start_command(self.address, device)}) and run again: the stage cache keeps "
                "every stage that finished")


_FLEET: Fleet | None = None
_ON_DEVICE: str | None = None  # set in a device's own process (DeviceHost), where its environments are local


def connect(address: str) -> Fleet:
    """Join the Ray cluster at `address` (e.g. 127.0.0.1:6379, or "auto") for the rest of this process."""
    global _FLEET
    try:
        import ray
    except ModuleNotFoundError as error:
        raise MissingEngineError("a device fleet runs on Ray, which is not installed: pip install "
                                 "'ziplm-deploy[fleet]'") from error
    if _FLEET is None or _FLEET.address != address:
        try:
            ray.init(address=address, ignore_reinit_error=True, logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise BadInputError(f"cannot reach a Ray cluster at {address}: {error}. Start one with `ray start "
                                "--head` (docs/scale-out.md), or leave out --ray to measure on this machine") from error
        _FLEET = Fleet(address)
    return _FLEET


def disconnect() -> None:
    global _FLEET
    if _FLEET is not None:
        import ray

        ray.shutdown()
        _FLEET = None


def prepare(settings: FleetSettings | None, envs: list[InferenceEnv]) -> None:
    """Join the recipe's cluster, if it names one, and check that every device the environments name is offered
    (before anything is trained or timed)."""
    if settings is not None:
        connect(settings.address)
    for env in envs:
        if env.device:
            require(env)


def require(env: InferenceEnv) -> Fleet:
    """The fleet that measures `env` (which names a device), or BadInputError saying how to give one."""
    if _FLEET is None:
        raise BadInputError(f"the environment names device {env.device!r}, which is measured on a node of a Ray "
                            "cluster: give its address with --ray ADDRESS (or `ray: {address: ...}` in the recipe), "
                            "or leave out `device` to measure on this machine")
    _FLEET.check(env.device)  # type: ignore[arg-type]
    return _FLEET


def local_identity(env: InferenceEnv) -> dict[str, Any]:
    """What a table of this machine depends on: its CPU and its runtime (as table_fingerprint records them)."""
    from ziplm.runtimes import get_runtime

    return {"cpu": cpu_identity(), "runtime": get_runtime(env).info().to_json()}


def connected() -> bool:
    return _FLEET is not None


def on_device(device: str) -> bool:
    """Whether this process is the device's own (its DeviceHost), where its environments' runtimes are local."""
    return _ON_DEVICE == device


def run_passes(function: Callable[[Any], Any], jobs: list[Any]) -> list[Any]:
    """`function` of every job as a Ray task of one CPU each, anywhere on the cluster; the results in job order.
    Each task computes with this process's torch thread count: a matrix product split over another number of threads
    sums in another order, and the database would differ from the local one in its last bits. (The pipeline runs one
    stage at a time, so these never share a machine with a measurement of this run.)"""
    import ray
    import torch

    task = ray.remote(num_cpus=1)(_with_threads)
    return ray.get([task.remote(function, torch.get_num_threads(), job) for job in jobs])


def _with_threads(function: Callable[[Any], Any], threads: int, job: Any) -> Any:
    import torch

    torch.set_num_threads(threads)
    return function(job)


def device_identity(env: InferenceEnv) -> dict[str, Any]:
    """The device's CPU and runtime, asked of the device itself (or read here, in the device's own process)."""
    if on_device(env.device):  # type: ignore[arg-type]
        return local_identity(env)
    fleet = require(env)
    return fleet.ask(env.device, "identity", "reading its identity", env)


def remote_table(build: Callable[..., Any], config: Any, env: InferenceEnv, group_size: int,
                 measure: MeasurementPolicy) -> dict[str, Any]:
    """The latency table (its JSON) that `build` makes, built on the device, with the node it was built on in its
    environment."""
    fleet = require(env)
    table, node = fleet.ask(env.device, "build_table", "building a latency table", build, config.to_dict(), env,
                            group_size, measure)
    table["environment"]["device_node"] = node
    return table


def shipped(path: Path) -> dict[str, bytes]:
    """A file and the files beside it that share its stem (a program, external data): what loading it reads."""
    return {file.name: file.read_bytes() for file in sorted(path.parent.iterdir())
            if file.is_file() and (file == path or file.name.startswith(path.stem + "."))}


class RemoteVerifier:
    """A PairedVerifier whose dense session and timings live on the environment's device: the same calls
    (`measure`, `verdict`, `measure_blocks`, `measure_dense`); `nodes` records where each ran."""

    def __init__(self, runtime: Runtime, env: InferenceEnv, dense_onnx: Path, inputs: Any,
                 policy: MeasurementPolicy, tolerance: float) -> None:
        self.runtime, self.env, self.policy, self.tolerance = runtime, env, policy, tolerance
        self.fleet = require(env)
        self.key = f"verifier-{id(self)}"
        self.nodes: list[tuple[str, dict[str, Any]]] = []
        node = self.fleet.ask(env.device, "open_verifier", "loading the dense model", self.key, runtime, env,
                              shipped(dense_onnx), dense_onnx.name, inputs, policy, tolerance)
        self.nodes.append(("open", node))

    def measure(self, member_onnx: Path, repeats: int = 1) -> Any:
        return self._call("measure", member_onnx, repeats)

    def verdict(self, member_onnx: Path) -> Any:
        return self._call("verdict", member_onnx)

    def measure_blocks(self, member_onnx: Path, blocks: int) -> Any:
        return self._call("measure_blocks", member_onnx, blocks)

    def measure_dense(self) -> TimingStats:
        return self._call("measure_dense", None)

    def _call(self, method: str, member: Path | None, *arguments: Any) -> Any:
        files = {} if member is None else shipped(member)
        result, node = self.fleet.ask(self.env.device, "call", f"timing {member.name if member else 'the dense model'}",
                                      self.key, method, files, None if member is None else member.name, *arguments)
        self.nodes.append((method, node))
        return result


class DeviceRuntime(Runtime):
    """An environment's runtime on its device, as the driver sees it: `info` is the device's, `load` opens the file
    there. Pickled to the device (a verifier's runtime), it is rebuilt as the device's own runtime (get_runtime)."""

    def __init__(self, name: str, env: InferenceEnv) -> None:
        self.name, self.env = name, env

    def info(self) -> RuntimeInfo:
        return RuntimeInfo(**device_identity(self.env)["runtime"])

    def load(self, onnx_path: Path) -> RemoteSession:
        return RemoteSession(self.env, onnx_path)

    def __reduce__(self) -> tuple[Any, ...]:
        from ziplm.runtimes import get_runtime

        return get_runtime, (self.env,)


class RemoteSession:
    """A file loaded in its environment's runtime on the device; each `run` is one call there."""

    def __init__(self, env: InferenceEnv, onnx_path: Path) -> None:
        self.env, self.fleet = env, require(env)
        self.key = f"session-{id(self)}"
        self.input_names, self.input_shapes = self.fleet.ask(env.device, "open_session", f"loading {onnx_path.name}",
                                                             self.key, env, shipped(onnx_path), onnx_path.name)
        weakref.finalize(self, _close_session, self.fleet.host(env.device), self.key)  # type: ignore[arg-type]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.fleet.ask(self.env.device, "run_session", "running a file", self.key, inputs)


def _close_session(host: Any, key: str) -> None:
    """Free a session's file on its device, if the cluster is still there (a finalizer may run after it is gone)."""
    import ray

    if ray.is_initialized():
        host.close_session.remote(key)
