"""Release gating: re-measure a member artifact against its dense reference and judge it; JUnit XML for CI.

    ziplm verify runs/demo/minilm-mr-2x                      # in the environment its manifest records
    ziplm verify runs/demo/minilm-mr-2x --threads 4 --max-latency-ms 12 --min-speedup 1.9 --junit verify.xml
    ziplm verify runs/smollm2/smollm2-shakespeare-1.5x --max-tpot-ms 25 --context-length 512 --max-ttft-ms 400

The member and the dense reference its manifest names (`dense_reference`, by default ../dense/model.onnx) are
timed interleaved in one run (the paired timing of `ziplm run`); the verdict is taken as `ziplm run` takes one
(runtimes.paired.PairedVerifier.verdict), with the measurement effort of --effort (default standard:
runtimes.policy). An INT8 member whose target is over FP32 is timed
directly beside the dense FP32 reference, as `ziplm run` judged it.
Checks, each one JUnit test case:
- speedup: measured in the manifest's phase (a request member: whole greedy requests) >= --min-speedup, or else
  >= target_speedup x (1 - tolerance) from the manifest. A shipped guarantee is a lower bound; `ziplm run` also
  rejects overshooting a target, verify does not. Left out for an SLA member unless --min-speedup is given.
- latency: the measured statistic (--metric, default p90; an SLA member's own metric) <= --max-latency-ms, or
  else <= the member's SLA from the manifest. Left out when neither is set.
- TTFT / TPOT (a decoder member's generation.onnx, docs/generation.md): with --max-ttft-ms, the time to first token
  of a prompt of the environment's sequence length on an empty cache; with --max-tpot-ms, the time of one new token
  on a cache of --context-length tokens (default: the member's decode context, or else the sequence length: the
  first step after the prompt; a request member: its mean cache length). Each is timed paired beside the dense
  model's generation.onnx and bounded by the statistic of --metric. Given either, the manifest's own speedup and SLA
  checks are left out unless --min-speedup or --max-latency-ms asks for them.
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
from ziplm.families.loading import load_config
from ziplm.pipeline.report import environment_line
from ziplm.runtimes import InferenceEnv, get_runtime
from ziplm.runtimes.base import Phase
from ziplm.runtimes.paired import LatencyCheck, statistic, verifier_for
from ziplm.runtimes.policy import Effort, policy
from ziplm.stages.closed_loop import PHASE_LABELS
from ziplm.stages.generation import phase_feeds, served_feeds, serving_runtime

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
    measurements: dict[Phase, tuple[InferenceEnv, LatencyCheck]]  # each phase measured beside the dense model
    recorded_device: str  # where `ziplm run` measured the member (its manifest)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def line(self) -> str:
        checks = "; ".join(check.describe() for check in self.checks)
        measured = "; ".join(f"{', '.join(filter(None, [env.describe_phase(), check.interval_note()]))} over the "
                             f"dense model{check.load_note()}" for env, check in self.measurements.values())
        return (f"{'PASS' if self.passed else 'FAIL'} {self.artifact}: {checks} ({measured}; "
                f"{environment_line(self.runtime)}){self.device_note()}")

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

    def generation_files(self) -> tuple[Path, Path]:
        """The member's generation.onnx (checked against its manifest) and the dense reference's beside its
        model.onnx; the time-to-first-token and time-per-token gates time these."""
        record = self.manifest.get("generation")
        if record is None:
            raise BadInputError(f"{self.folder} has no generation artifact: time-to-first-token and time-per-token "
                                "gates apply to fp32 decoder members written by `ziplm run`")
        member, dense = self.folder / record["file"], self.dense_onnx.parent / record["file"]
        if not dense.is_file():
            raise BadInputError(f"the dense generation artifact {dense} is missing: keep the folders of `ziplm run` "
                                "as it wrote them")
        checked(member, record, "the member's generation artifact")
        return member, dense


def checked(file: Path, record: dict[str, Any], what: str) -> Path:
    """`file`, there and with the sha256 `record` gives it, and its torch.export program (`record["program"]`)
    likewise where one was written; otherwise a clear error."""
    expected = {file: record.get("sha256")}
    if record.get("program"):
        expected[file.with_name(record["program"]["file"])] = record["program"]["sha256"]
    for path, digest in expected.items():
        if not path.is_file():
            raise BadInputError(f"{what} {path} is missing: keep the folders of `ziplm run` as it wrote them")
        if file_digest(path) != digest:
            raise BadInputError(f"{path} is corrupt or was changed: its sha256 differs from the manifest's; use the "
                                "artifact as `ziplm run` wrote it")
    return file


def load_artifact(folder: Path) -> Artifact:
    """A member folder written by `ziplm run`, its ONNX file checked against the manifest's sha256."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BadInputError(f"{folder} has no {MANIFEST}: pass a member folder written by `ziplm run` (OUT/<name>)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BadInputError(f"{path} is not valid JSON ({error}): re-create the artifact with `ziplm run`") from error
    onnx = Path(folder) / manifest.get("served_file", "model.onnx")
    dense_onnx = (Path(folder) / manifest.get("dense_reference", "../dense/model.onnx")).resolve()
    if not dense_onnx.is_file():
        raise BadInputError(f"the dense reference {dense_onnx} is missing: keep the dense folders of `ziplm run` "
                            "beside the member")
    checked(onnx, manifest, "the member's ONNX model")
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
                        options=recorded.get("options", {}) if name == recorded["name"] else {},
                        phase=recorded.get("phase", "sequence"), context_length=recorded.get("context_length"),
                        new_tokens=recorded.get("new_tokens"), sparsity=recorded.get("sparsity", 0.0),
                        device=recorded.get("fleet_device"))


def verify_artifact(artifact: Artifact, env: InferenceEnv, max_latency_ms: float | None = None,
                    min_speedup: float | None = None, metric: str | None = None, effort: Effort = "standard",
                    max_ttft_ms: float | None = None, max_tpot_ms: float | None = None,
                    context_length: int | None = None) -> Verdict:
    """Measure the member against its dense reference in `env` and check it (see the module docstring)."""
    manifest = artifact.manifest
    tolerance = manifest.get("tolerance", 0.03)
    runtime = serving_runtime(env)
    config = load_config(str(artifact.folder))
    start = time.perf_counter()
    sla = manifest.get("sla")
    generation = {"prefill": max_ttft_ms, "decode": max_tpot_ms}
    generation_only = any(ms is not None for ms in generation.values())
    speedup_gate = min_speedup is not None or (sla is None and not generation_only)
    latency_gate = max_latency_ms is not None or (sla is not None and not generation_only)
    metric = metric or (sla["metric"] if sla else "p90")
    checks, measurements = [], {}
    if speedup_gate or latency_gate:
        check = verifier_for(runtime, env, artifact.dense_onnx, served_feeds(config, env), policy(effort),
                             tolerance).verdict(artifact.onnx)
        measurements["sequence"] = env, check
        if speedup_gate:
            required = min_speedup if min_speedup is not None else manifest["target_speedup"] * (1 - tolerance)
            checks.append(Check("speedup", check.speedup.value, required, "x", at_least=True))
        if latency_gate:
            required = max_latency_ms if max_latency_ms is not None else sla["ms"]
            checks.append(Check(f"{metric} latency", statistic(check.member, metric), required, " ms", at_least=False))
    for phase, required_ms in generation.items():
        if required_ms is None:
            continue
        member, dense = artifact.generation_files()
        phase_env = env.in_phase(phase, (context_length or env.decode_context) if phase == "decode" else None)
        check = verifier_for(get_runtime(phase_env), phase_env, dense, phase_feeds(phase_env, config.vocab_size),
                             policy(effort), tolerance).verdict(member)
        measurements[phase] = phase_env, check
        checks.append(Check(f"{metric} {PHASE_LABELS[phase]}", statistic(check.member, metric), required_ms,
                            " ms", at_least=False))
    info = {**runtime.info().to_json(), "batch_size": env.batch_size, "sequence_length": env.sequence_length,
            "precision": env.precision}
    return Verdict(manifest["name"], info, checks, time.perf_counter() - start, measurements,
                   manifest["runtime"]["device"])


def junit_xml(verdict: Verdict) -> ET.ElementTree:
    """One testsuite, one testcase per check; a failed check carries a <failure> with measured vs required."""
    failures = sum(not check.passed for check in verdict.checks)
    suite = ET.Element("testsuite", name=f"ziplm verify {verdict.artifact}", tests=str(len(verdict.checks)),
                       failures=str(failures), errors="0", time=f"{verdict.seconds:.3f}")
    properties = ET.SubElement(suite, "properties")
    for key, value in verdict.runtime.items():
        ET.SubElement(properties, "property", name=f"runtime.{key}", value=property_value(value))
    for phase, (env, measurement) in verdict.measurements.items():
        prefix = "" if phase == "sequence" else f"{phase}."
        speedup = {**measurement.speedup.to_json(), "measurements": len(measurement.blocks),
                   **({} if phase == "sequence" else {"member_median_ms": measurement.member.median_ms,
                                                     "member_p90_ms": measurement.member.p90_ms,
                                                     "context_length": env.context_length})}
        for key, value in speedup.items():
            ET.SubElement(properties, "property", name=f"{prefix}speedup.{key}", value=str(value))
        for key, value in measurement.load_json().items():
            ET.SubElement(properties, "property", name=f"{prefix}machine_load.{key}", value=str(value))
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
