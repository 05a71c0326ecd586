"""Devices as Ray resources (runtimes/fleet.py) on a real local Ray cluster: a head node offering device:alpha and a
second node process offering device:beta, both on the loopback address. Tables and verdicts of an environment that
names a device run on the node that offers it; a device no node offers, a device without a cluster, and a node that
goes away are clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.conftest import QUICK_UNGUARDED, tiny_bert_config, tiny_recipe, toy_sentiment_rows, write_tiny_bert
from ziplm.cache import StageCache, write_json_atomic
from ziplm.errors import BadInputError, MissingEngineError
from ziplm.families import ModelStructure, adapter_for
from ziplm.families.loading import build_model, load_config
from ziplm.runtimes import InferenceEnv, fleet, get_runtime
from ziplm.runtimes.paired import verifier_for
from ziplm.pipeline.cli import app
from ziplm.stages.export import export_model
from ziplm.stages.latency_table import TABLE_FILE, get_or_build_table, table_fingerprint

cluster_utils = pytest.importorskip("ray.cluster_utils", reason="Ray is the fleet extra (pip install '.[fleet]')")


def env_on(device: str | None) -> InferenceEnv:
    return InferenceEnv(threads=1, sequence_length=16, device=device)


@pytest.fixture(scope="module")
def cluster():
    """The head (device:alpha) and one more node (device:beta), each a real raylet; the node ids by device."""
    head = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"device:alpha": 1}, "include_dashboard": False})
    beta = head.add_node(num_cpus=1, resources={"device:beta": 1})
    head.wait_for_nodes()
    fleet.connect(head.address)
    yield head, {"alpha": head.head_node.node_id, "beta": beta.node_id}
    fleet.disconnect()
    head.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny dense BERT and a smaller member, exported."""
    folder = tmp_path_factory.mktemp("fleet")
    config = tiny_bert_config()
    torch.manual_seed(0)
    dense = build_model(config)
    member = build_model(config)
    adapter_for(config).apply_structure(member, ModelStructure.uniform(adapter_for(config).shape(config), 1, 32))
    return export_model(dense, folder / "dense.onnx", 1, 16), export_model(member, folder / "member.onnx", 1, 16)


@pytest.mark.parametrize("device", ["alpha", "beta"])
def test_tables_and_verdicts_run_on_the_node_that_offers_the_device(cluster, files, device, tmp_path):
    _, nodes = cluster
    env = env_on(device)
    table, cached = get_or_build_table(tiny_bert_config(), env, 32, QUICK_UNGUARDED,
                                       stages=StageCache(tmp_path / "stages", lambda _: lambda _: None))
    assert not cached and table.environment["device_node"]["node_id"] == nodes[device]
    assert table.environment["fleet_device"] == device and table.dense_ms() > 0
    dense, member = files
    verifier = verifier_for(get_runtime(env), env, dense, adapter_for(tiny_bert_config()).example_inputs(
        tiny_bert_config(), 1, 16), QUICK_UNGUARDED, 0.03)
    check = verifier.verdict(member)
    assert check.speedup.value > 1.0  # one head and a quarter of the FFN left
    assert {node["node_id"] for _, node in verifier.nodes} == {nodes[device]}
    assert [method for method, _ in verifier.nodes] == ["open", "verdict"]


def test_a_table_of_a_device_is_not_the_table_of_this_machine(cluster):
    shape = adapter_for(tiny_bert_config()).shape(tiny_bert_config())
    here = table_fingerprint(shape, env_on(None), get_runtime(env_on(None)), 32)
    there = table_fingerprint(shape, env_on("alpha"), get_runtime(env_on(None)), 32)
    assert there["device"] == "alpha" and here != there


def test_a_device_no_node_offers_is_refused_with_the_devices_the_cluster_has(cluster):
    with pytest.raises(BadInputError, match=r"offers device 'gamma'.*it has: alpha, beta"):
        fleet.require(env_on("gamma"))


def test_a_device_without_a_cluster_is_refused(monkeypatch):
    monkeypatch.setattr(fleet, "_FLEET", None)
    with pytest.raises(BadInputError, match=r"--ray ADDRESS"):
        fleet.require(env_on("alpha"))


def test_a_node_that_goes_away_fails_its_measurement_with_a_clear_message(cluster, files):
    head, _ = cluster
    node = head.add_node(num_cpus=1, resources={"device:gamma": 1})
    head.wait_for_nodes()
    dense, member = files
    env = env_on("gamma")
    verifier = verifier_for(get_runtime(env), env, dense, adapter_for(tiny_bert_config()).example_inputs(
        tiny_bert_config(), 1, 16), QUICK_UNGUARDED, 0.03)
    head.remove_node(node, allow_graceful=False)
    with pytest.raises(fleet.DeviceLostError, match=r"device 'gamma'.*ray start --address"):
        verifier.measure(member)


def test_the_database_built_as_ray_tasks_equals_the_local_one(cluster):
    from ziplm.stages import ziplm as zipl
    from ziplm.stages.calibrate import LayerHessians

    config = tiny_bert_config()
    torch.manual_seed(0)
    model = build_model(config)
    adapter = adapter_for(config)
    shape = adapter.shape(config)

    def H(width: int) -> torch.Tensor:  # X^T X of random inputs: symmetric positive definite
        X = torch.randn(256, width, dtype=torch.float64)
        return X.T @ X / 256

    hessians = [LayerHessians(H(shape.hidden_size), H(shape.ffn_size), 256) for _ in range(shape.num_layers)]
    here = zipl.build_database(model, adapter, hessians, 32, progress=lambda _: None)
    there = zipl.build_database(model, adapter, hessians, 32, run_passes=fleet.run_passes)
    for local, remote in zip(here.modules, there.modules, strict=True):
        assert (local.layer, local.kind) == (remote.layer, remote.kind)
        assert np.array_equal(local.error(), remote.error())
        assert all(torch.equal(local.weights(level), remote.weights(level)) for level in range(local.size + 1))


def test_the_driver_runs_a_device_s_files_there_and_needs_none_of_its_engines(cluster, files):
    dense, _ = files
    runtime = get_runtime(env_on("beta"))
    assert isinstance(runtime, fleet.DeviceRuntime) and not fleet.on_device("beta")
    assert runtime.info() == get_runtime(env_on(None)).info()  # the device's own answer (here: the same machine)
    inputs = adapter_for(tiny_bert_config()).example_inputs(tiny_bert_config(), 1, 16)
    there, here = runtime.load(dense), get_runtime(env_on(None)).load(dense)
    assert there.input_names == here.input_names
    assert np.allclose(there.run(inputs)[0], here.run(inputs)[0], atol=1e-6)
    gpu = InferenceEnv(runtime="onnxruntime-gpu", threads=1, sequence_length=16, device="alpha")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the device's runtime would load")
    assert isinstance(get_runtime(gpu), fleet.DeviceRuntime)  # not asked here: the engine is the device's business
    with pytest.raises(MissingEngineError, match=r"on device 'alpha': runtime onnxruntime-gpu"):
        get_runtime(gpu).info()


def test_a_ray_run_s_family_equals_the_local_run_s_for_the_same_table(cluster, tmp_path, monkeypatch):
    """`ziplm run --ray` with the environment on device beta (its table, database passes and verdicts on the cluster),
    then the same recipe here, on that table, with the database built again here: the same members."""
    head, nodes = cluster
    data = tmp_path / "toy.csv"
    data.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in toy_sentiment_rows(160)))
    model = write_tiny_bert(tmp_path / "tiny-bert")
    stages = tmp_path / "cache" / "stages"
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))

    def run(where: str, device: str | None, *options: str) -> dict:
        recipe = tiny_recipe(model, data, environment={"threads": 1, "sequence_length": 32, "device": device})
        (tmp_path / f"{where}.yaml").write_text(yaml.safe_dump(recipe))
        result = CliRunner().invoke(app, ["run", str(tmp_path / f"{where}.yaml"), "--out", str(tmp_path / where),
                                          *options], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / where / "report.json").read_text())

    on_fleet = run("fleet", "beta", "--ray", head.address)
    table = json.loads(next((stages / "table").glob(f"*/{TABLE_FILE}")).read_text())
    assert table["environment"]["device_node"]["node_id"] == nodes["beta"]
    monkeypatch.setattr(fleet, "connected", lambda: False)  # the database rebuilt here, without Ray
    shutil.rmtree(stages / "database")
    seed_table(table, stages, tiny_recipe(model, data, environment={"threads": 1, "sequence_length": 32}))
    here = run("here", None)
    assert [m["structure"] for m in on_fleet["members"]] == [m["structure"] for m in here["members"]]
    assert on_fleet["runtime"]["fleet_device"] == "beta" and "fleet_device" not in here["runtime"]


def seed_table(table: dict, root: Path, recipe: dict) -> None:
    """`table`'s numbers stored as this machine's table for the recipe's environment (as if built here)."""
    here = {key: value for key, value in table["environment"].items() if key not in ("fleet_device", "device_node")}
    config = load_config(recipe["model"])
    env = InferenceEnv(**recipe["environment"])
    identity = table_fingerprint(adapter_for(config).shape(config), env, get_runtime(env),
                                 recipe["latency_table"]["group_size"])
    StageCache(root, lambda _: lambda _: None).run("table", identity, lambda folder, _: write_json_atomic(
        folder / TABLE_FILE, {**table, "environment": here}), lambda folder: None)
