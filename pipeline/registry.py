"""Publishing a family to an MLflow model registry.

    ziplm publish runs/demo --registry http://127.0.0.1:5000 [--experiment ziplm-deploy] [--force]

Every member of DIR (a `ziplm run` output folder, or one member folder) becomes a new version of the registered
model named after the member. Its run carries the measured speedup, latency, the task's metric and sizes as metrics,
the runtime (name, version, device, threads, batch, sequence, precision) and its fingerprint as tags, and the whole
member folder (ONNX model, weights, config.json with the label names, tokenizer, manifest) as the artifact `model/`;
the model version carries the same figures as tags and points at that artifact. A member whose manifest says
`passed: false` is refused unless `force`: the others are published and the command exits 1, a gating failure. An
unreachable registry is bad input (exit 2).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ziplm.errors import BadInputError

DEFAULT_EXPERIMENT = "ziplm-deploy"
SERVER_HINT = "start one with `mlflow server --backend-store-uri sqlite:///mlflow.db --port 5000`"


@dataclass
class PublishResult:
    published: dict[str, str] = field(default_factory=dict)  # member name -> registered version
    refused: list[str] = field(default_factory=list)  # members that failed verification


def member_folders(folder: Path) -> list[Path]:
    """The members of a run's output folder (from its report.json; a run of several environments names each
    member's `folder`), or the one member folder given."""
    folder = Path(folder)
    if (folder / "manifest.json").is_file() and not (folder / "report.json").is_file():
        return [folder]
    report = folder / "report.json"
    if not report.is_file():
        raise BadInputError(f"{folder} has no report.json or manifest.json: pass the --out folder of `ziplm run` "
                            "or one of its member folders")
    return [folder / member.get("folder", member["name"]) for member in json.loads(report.read_text())["members"]]


def metrics(manifest: dict[str, Any]) -> dict[str, float]:
    return {
        "measured_speedup": manifest["measured_speedup"],
        "target_speedup": manifest["target_speedup"],
        "deviation": manifest["deviation"],
        "latency_median_ms": manifest["latency_ms"]["median"],
        "latency_p90_ms": manifest["latency_ms"]["p90"],
        "dense_latency_median_ms": manifest["dense_latency_ms"]["median"],
        "dense_latency_p90_ms": manifest["dense_latency_ms"]["p90"],
        manifest["metric"]["name"]: manifest["metric"]["value"],
        f"dense_{manifest['metric']['name']}": manifest["metric"]["dense_value"],
        "parameters": manifest["parameters"],
        "file_bytes": manifest["file_bytes"],
    }


def tags(manifest: dict[str, Any]) -> dict[str, str]:
    runtime = {f"ziplm.runtime.{key}": str(value) for key, value in manifest["runtime"].items() if key != "options"}
    figures = {f"ziplm.{key}": figure(value) for key, value in metrics(manifest).items()}
    sla = manifest.get("sla")
    return {**runtime, **figures, "ziplm.runtime_fingerprint": manifest["runtime_fingerprint"],
            "ziplm.passed": str(manifest["passed"]).lower(), "ziplm.sha256": manifest["sha256"],
            "ziplm.sla": f"{sla['metric']}<={sla['ms']:g}ms" if sla else "none"}


def figure(value: float) -> str:
    """A figure as a tag: integers in full (7640280, not 7.64028e+07), other numbers to 6 significant digits."""
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def check_reachable(registry: str) -> None:
    """Fail fast (instead of MLflow's minutes of retries) when an HTTP registry does not answer."""
    if not registry.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{registry.rstrip('/')}/health", timeout=10) as response:
            response.read()
    except (urllib.error.URLError, OSError) as error:
        raise BadInputError(f"cannot reach the MLflow registry at {registry} ({error}): {SERVER_HINT}, or pass "
                            "a reachable --registry") from error


def publish_family(folder: Path, registry: str, experiment: str = DEFAULT_EXPERIMENT,
                   force: bool = False) -> PublishResult:
    """Register every member that passed verification (all with `force`); see the module docstring."""
    members = [(path, read_manifest(path)) for path in member_folders(folder)]
    check_reachable(registry)
    from mlflow import MlflowClient  # imported here: only publishing needs MLflow (and it is slow to import)

    client = MlflowClient(tracking_uri=registry, registry_uri=registry)
    experiment_id = experiment_named(client, experiment)
    result = PublishResult()
    for path, manifest in members:
        if manifest["passed"] or force:
            result.published[manifest["name"]] = publish_member(client, experiment_id, path, manifest)
        else:
            result.refused.append(manifest["name"])
    return result


def read_manifest(member: Path) -> dict[str, Any]:
    manifest, onnx = member / "manifest.json", member / "model.onnx"
    if not manifest.is_file() or not onnx.is_file():
        raise BadInputError(f"{member} lacks manifest.json or model.onnx: publish the output of `ziplm run`")
    return json.loads(manifest.read_text())


def experiment_named(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def publish_member(client: Any, experiment_id: str, member: Path, manifest: dict[str, Any]) -> str:
    """One run (metrics, tags, artifacts) and one new model version; returns the version number."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    version_tags = tags(manifest)
    run = client.create_run(experiment_id, run_name=manifest["name"], tags=version_tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics(manifest).items()])
    client.log_artifacts(run_id, str(member), artifact_path="model")  # the whole folder: it can be served as pulled
    client.set_terminated(run_id)
    try:
        client.create_registered_model(manifest["name"])
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(manifest["name"], source=f"{run.info.artifact_uri}/model", run_id=run_id,
                                          tags=version_tags,
                                          description=f"ZipLM member {manifest['name']}: "
                                                      f"{manifest['measured_speedup']:.3f}x measured")
    return str(version.version)
