"""Release gating: re-measure a member artifact against its dense reference and judge it; JUnit XML for CI.

    ziplm verify runs/demo/minilm-mr-2x                      # in the environment its manifest records
    ziplm verify runs/demo/minilm-mr-2x --threads 4 --max-latency-ms 12 --min-speedup 1.9 --junit verify.xml

The member and the dense reference its manifest names (`dense_reference`, by default ../dense/model.onnx) are
timed interleaved in one run (the paired timing of `ziplm run`); the verdict is taken as `ziplm run` takes one
(runtimes.paired.PairedVerifier.verdict), with the measurement effort of --effort (default standard:
runtimes.policy). An INT8 member whose target is over FP32 is timed
directly beside the dense FP32 reference, as `ziplm run` judged it.
Checks, each one JUnit test case:
- speedup: measured >= --min-speedup, or else >= target_speedup x (1 - tolerance) from the manifest. A shipped
  guarantee is a lower bound; `ziplm run` also rejects overshooting a target, verify does not. Left out for an SLA
  member unless --min-speedup is given.
- latency: the measured statistic (--metric, default p90; an SLA member's own metric) <= --max-latency-ms, or
  else <= the member's SLA from the manifest. Left out when neither is set.
The line also says when other work kept the machine busy while it measured (measurements taken again, or left
disturbed: the speedup may be off either way; JUnit properties machine_load.*), and when the manifest was measured on
another CPU (kernels, and so speedups, differ between CPU generations).
Exit status: 0 every check passes, 1 a check fails, 2 bad input (no manifest, missing or corrupt ONNX file, unknown
runtime).
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ziplm.cache import file_digest
from ziplm.errors import BadInputError
from ziplm.families import adapter_for
from ziplm.families.loading import load_config
from ziplm.pipeline.report import environment_line
from ziplm.runtimes import InferenceEnv, get_runtime
from ziplm.runtimes.paired import LatencyCheck, PairedVerifier, statistic
from ziplm.runtimes.policy import Effort, policy

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Check:
    """One gated quantity: `measured` must be at least (`at_least`) or at most `required`."""

    name: str
    measured: float
    required: float
    unit: str
    at_least: bool

    @property
    def passed(self) -> bool:
        return self.measured >= self.required if self.at_least else self.measured <= self.required

    def describe(self) -> str:
        relation = (">=" if self.at_least else "<=") if self.passed else ("<" if self.at_least else ">")
        return f"{self.name} {self.measured:.4g}{self.unit} {relation} {self.required:.4g}{self.unit} required"


@dataclass(frozen=True)
class Verdict:
    artifact: str
    runtime: dict[str, Any]
    checks: list[Check]
    seconds: float
    measurement: LatencyCheck
    recorded_device: str  # where `ziplm run` measured the member (its manifest)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def line(self) -> str:
        checks = "; ".join(check.describe() for check in self.checks)
        return (f"{'PASS' if self.passed else 'FAIL'} {self.artifact}: {checks} ({self.measurement.interval_note()} "
                f"over the dense model; {environment_line(self.runtime)})"
                f"{self.measurement.load_note()}{self.device_note()}")

    def device_note(self) -> str:
        """Kernels differ between CPU generations (the same dense INT8 file runs at different speeds over FP32):
        a member measured on one CPU and gated on another is gated on other figures."""
        if self.recorded_device == self.runtime["device"]:
            return ""
        return f" [the manifest was measured on another CPU: {self.recorded_device}]"


@dataclass(frozen=True)
class Artifact:
    folder: Path
    manifest: dict[str, Any]
    onnx: Path
    dense_onnx: Path


def load_artifact(folder: Path) -> Artifact:
    """A member folder written by `ziplm run`, its ONNX file checked against the manifest's sha256."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BadInputError(f"{folder} has no {MANIFEST}: pass a member folder written by `ziplm run` (OUT/<name>)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BadInputError(f"{path} is not valid JSON ({error}): re-create the artifact with `ziplm run`") from error
    onnx = Path(folder) / "model.onnx"
    dense_onnx = (Path(folder) / manifest.get("dense_reference", "../dense/model.onnx")).resolve()
    for file, what in ((onnx, "the member's ONNX model"), (dense_onnx, "the dense reference")):
        if not file.is_file():
            raise BadInputError(f"{what} {file} is missing: keep the dense folders of `ziplm run` beside the member")
    if file_digest(onnx) != manifest.get("sha256"):
        raise BadInputError(f"{onnx} is corrupt or was changed: its sha256 differs from the one in {path}; "
                            "use the artifact as `ziplm run` wrote it")
    return Artifact(Path(folder), manifest, onnx, dense_onnx)


def environment(manifest: dict[str, Any], runtime: str | None = None, threads: int | None = None,
                batch_size: int | None = None, sequence_length: int | None = None) -> InferenceEnv:
    """The environment recorded in the manifest, with the given settings overridden."""
    recorded = manifest["runtime"]
    name = runtime or recorded["name"]
    return InferenceEnv(runtime=name, threads=threads or recorded["threads"],
                        batch_size=batch_size or recorded["batch_size"],
                        sequence_length=sequence_length or recorded["sequence_length"],
                        precision=recorded["precision"],
                        options=recorded.get("options", {}) if name == recorded["name"] else {})


def verify_artifact(artifact: Artifact, env: InferenceEnv, max_latency_ms: float | None = None,
                    min_speedup: float | None = None, metric: str | None = None,
                    effort: Effort = "standard") -> Verdict:
    """Measure the member against its dense reference in `env` and check it (see the module docstring)."""
    manifest = artifact.manifest
    tolerance = manifest.get("tolerance", 0.03)
    runtime = get_runtime(env)
    config = load_config(str(artifact.folder))
    example = adapter_for(config).example_inputs(config, env.batch_size, env.sequence_length)
    start = time.perf_counter()
    verifier = PairedVerifier(runtime, env, artifact.dense_onnx, example, policy(effort), tolerance)
    check = verifier.verdict(artifact.onnx)
    sla = manifest.get("sla")
    checks = []
    if min_speedup is not None or sla is None:
        required = min_speedup if min_speedup is not None else manifest["target_speedup"] * (1 - tolerance)
        checks.append(Check("speedup", check.speedup.value, required, "x", at_least=True))
    if max_latency_ms is not None or sla is not None:
        metric = metric or (sla["metric"] if sla else "p90")
        required = max_latency_ms if max_latency_ms is not None else sla["ms"]
        checks.append(Check(f"{metric} latency", statistic(check.member, metric), required, " ms", at_least=False))
    info = {**runtime.info().to_json(), "batch_size": env.batch_size, "sequence_length": env.sequence_length,
            "precision": env.precision}
    return Verdict(manifest["name"], info, checks, time.perf_counter() - start, check, manifest["runtime"]["device"])


def junit_xml(verdict: Verdict) -> ET.ElementTree:
    """One testsuite, one testcase per check; a failed check carries a <failure> with measured vs required."""
    failures = sum(not check.passed for check in verdict.checks)
    suite = ET.Element("testsuite", name=f"ziplm verify {verdict.artifact}", tests=str(len(verdict.checks)),
                       failures=str(failures), errors="0", time=f"{verdict.seconds:.3f}")
    properties = ET.SubElement(suite, "properties")
    for key, value in verdict.runtime.items():
        ET.SubElement(properties, "property", name=f"runtime.{key}", value=property_value(value))
    speedup = {**verdict.measurement.speedup.to_json(), "measurements": len(verdict.measurement.blocks)}
    for key, value in speedup.items():
        ET.SubElement(properties, "property", name=f"speedup.{key}", value=str(value))
    for key, value in verdict.measurement.load_json().items():
        ET.SubElement(properties, "property", name=f"machine_load.{key}", value=str(value))
    for check in verdict.checks:
        case = ET.SubElement(suite, "testcase", classname=f"ziplm.verify.{verdict.artifact}", name=check.name,
                             time=f"{verdict.seconds / len(verdict.checks):.3f}")
        if not check.passed:
            failure = ET.SubElement(case, "failure", message=check.describe(), type="GateFailure")
            failure.text = f"{check.describe()} in {environment_line(verdict.runtime)}"
    root = ET.Element("testsuites", tests=suite.get("tests", "0"), failures=str(failures))
    root.append(suite)
    return ET.ElementTree(root)


def property_value(value: Any) -> str:
    """A JUnit property's value: mappings and lists as JSON (not a Python repr), the rest as text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, tuple)) else str(value)


def write_junit(verdict: Verdict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    junit_xml(verdict).write(tmp, encoding="utf-8", xml_declaration=True)
    tmp.replace(path)
