"""ZipLM on a tiny real model: calibration, database, search against a real table, stitching and export parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification, BertTokenizerFast

from tests.conftest import TINY_VOCAB, tiny_bert_config, toy_sentiment_rows
from ziplm.families import FamilyAdapter, LayerStructure, ModelStructure, adapter_for
from ziplm.families.loading import build_model, load_model, save_model
from ziplm.families.registry import _FAMILIES
from ziplm.tasks import TaskSpec, batches, load_task
from ziplm.stages import ziplm as zipl
from ziplm.stages.calibrate import CalibrationSettings, collect_hessians
from ziplm.stages.export import export_model, verify_export


def _toy_tokenizer(root: Path) -> BertTokenizerFast:
    (root / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    return BertTokenizerFast.from_pretrained(root)  # transformers 5 ignores a vocab_file= argument


def _toy_csv(root: Path) -> str:
    data = root / "toy.csv"
    data.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in toy_sentiment_rows(120)))
    return str(data)


@pytest.fixture(scope="module")
def pruning_setup(tmp_path_factory):
    """A tiny BERT (the tiny_config shape) with the toy-task tokenizer, its Hessians and database."""
    root = tmp_path_factory.mktemp("ziplm")
    tokenizer = _toy_tokenizer(root)
    config = tiny_bert_config()
    config.vocab_size = len(TINY_VOCAB)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    task = load_task(TaskSpec(data=_toy_csv(root), calibration_fraction=0.5))
    adapter = adapter_for(model.config)
    hessians = collect_hessians(model, tokenizer, adapter, task, CalibrationSettings(samples=64),
                                progress=lambda _: None)
    database = zipl.build_database(model, adapter, hessians, group_size=32, progress=lambda _: None)
    return model, adapter, hessians, database, tokenizer, task


def test_the_stream_energy_around_each_layer_is_the_mean_squared_norm_of_its_hidden_states(pruning_setup):
    model, _, hessians, _, tokenizer, task = pruning_setup
    energies, tokens = torch.zeros(4, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches(task.calibration[:64], task.batch_size):
            encoded = task.encode(tokenizer, batch)
            states = model(**encoded, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
            real = encoded["attention_mask"].bool()
            energies += torch.stack([h[real].double().pow(2).sum() for h in states])
            tokens += int(real.sum())
    energies /= tokens
    assert [(layer.stream_in, layer.stream_out) for layer in hessians] == [
        pytest.approx((float(energies[i]), float(energies[i + 1])), rel=1e-6) for i in range(3)]


def test_the_search_weighs_each_error_relative_to_the_stream_it_is_added_to(pruning_setup):
    _, _, hessians, database, _, _ = pruning_setup
    for module in database.modules:
        stream = hessians[module.layer].stream_in if module.kind == "attention" else hessians[module.layer].stream_out
        assert module.stream == stream
        assert module.error() == pytest.approx(list(module.path.reconstruction[::-1] / np.float64(stream)))


def test_hessians_are_symmetric_and_sized(pruning_setup):
    _, _, hessians, *_ = pruning_setup
    assert len(hessians) == 3
    for layer in hessians:
        assert layer.attention.shape == (64, 64) and layer.ffn.shape == (128, 128)
        assert torch.allclose(layer.ffn, layer.ffn.T) and layer.tokens > 0


def test_database_covers_every_level(pruning_setup, tiny_table):
    _, _, _, database, *_ = pruning_setup
    assert [m.kind for m in database.modules] == ["attention", "ffn"] * 3
    for module, times in zip(database.modules, database.times(tiny_table)):
        errors = module.error()
        assert len(errors) == len(times)  # one error per table level
        assert errors[-1] == 0.0 and errors[0] > 0.0  # dense: no error; removed: all of it


def test_solution_fits_the_budget_and_stitches_to_a_matching_onnx(pruning_setup, tiny_table, tmp_path):
    model, adapter, _, database, *_ = pruning_setup
    structure = zipl.solve(database, tiny_table, 1.6)
    raw_modules = tiny_table.predict_ms(structure, corrected=False) - tiny_table.base_ms
    assert raw_modules <= tiny_table.module_budget(1.6) + 1e-9
    assert structure != ModelStructure.dense(adapter.shape(model.config))

    member = zipl.stitch(model, adapter, database, structure)
    save_model(member, tmp_path / "member")
    reloaded = load_model(str(tmp_path / "member"))
    verify_export(reloaded, export_model(reloaded, tmp_path / "member.onnx"), atol=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.allclose(member(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_stitching_the_dense_levels_gives_the_teacher_back(pruning_setup):
    model, adapter, _, database, *_ = pruning_setup
    dense = zipl.stitch(model, adapter, database, ModelStructure.dense(adapter.shape(model.config)))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(dense(input_ids=ids).logits, model(input_ids=ids).logits)


def test_stitched_weights_are_the_obs_update(pruning_setup):
    """The kept FFN columns carry the OBS-updated weights, not the teacher's originals."""
    model, adapter, _, database, *_ = pruning_setup
    shape = adapter.shape(model.config)
    structure = ModelStructure.uniform(shape, shape.num_units, 64)
    member = zipl.stitch(model, adapter, database, structure)
    module = database.modules[1]
    kept_columns = module.groups[module.kept(2)].flatten().sort().values
    teacher_w = adapter.ffn_out_proj(adapter.layers(model)[0]).weight[:, kept_columns]
    member_w = adapter.ffn_out_proj(adapter.layers(member)[0]).weight
    assert member_w.shape == teacher_w.shape and not torch.allclose(member_w, teacher_w)
    assert zipl.predicted_error(database, structure) > 0
    ablation = zipl.stitch(model, adapter, database, structure, obs_update=False)
    assert torch.equal(adapter.ffn_out_proj(adapter.layers(ablation)[0]).weight, teacher_w)


def test_a_pruned_model_is_pruned_further_from_what_it_keeps(pruning_setup, tiny_table, tmp_path):
    """Gradual ZipLM: calibrate and build the database again on a member, then solve for a larger target."""
    model, adapter, _, database, *_ = pruning_setup
    shape = adapter.shape(model.config)
    first = ModelStructure((LayerStructure(0, 64), LayerStructure(2, 128), LayerStructure(4, 0)))
    member = zipl.stitch(model, adapter, database, first)
    task = load_task(TaskSpec(data=_toy_csv(tmp_path), calibration_fraction=0.5))
    hessians = collect_hessians(member, _toy_tokenizer(tmp_path), adapter, task, CalibrationSettings(samples=32),
                                progress=lambda _: None)
    assert hessians[0].attention is None and hessians[2].ffn is None and hessians[1].ffn.shape == (128, 128)
    again = zipl.build_database(member, adapter, hessians, group_size=32, progress=lambda _: None)
    assert [m.size for m in again.modules] == [0, 2, 2, 4, 4, 0]
    second = zipl.solve(again, tiny_table, 1.3 * tiny_table.dense_ms() / tiny_table.predict_ms(first))
    for before, after in zip(first.layers, second.layers):
        assert after.units <= before.units and after.ffn <= before.ffn
    assert second != first and shape.num_layers == len(second.layers)
    smaller = zipl.stitch(member, adapter, again, second)
    assert adapter.structure(smaller.config) == second
    verify_export(smaller, export_model(smaller, tmp_path / "smaller.onnx"), atol=1e-4)


ADAPTERS = sorted({adapter.name: adapter for adapter in _FAMILIES.values()}.items())


@pytest.mark.parametrize("adapter", [adapter for _, adapter in ADAPTERS], ids=[name for name, _ in ADAPTERS])
def test_every_family_is_calibrated_pruned_stitched_and_exported(adapter: FamilyAdapter, tmp_path):
    """ZipLM on each family's tiny model: Hessians from the toy task as the family's tokenizer encodes it (only the
    model's inputs), the OBS database, a stitched member that keeps one unit, removes an attention module and an FFN
    module, and its reload and export with parity."""
    config = adapter.tiny_config()
    shape = adapter.shape(config)
    tokenizer = _toy_tokenizer(tmp_path)
    tokenizer.model_input_names = list(adapter.input_names(config))
    torch.manual_seed(0)
    model = build_model(config)
    task = load_task(TaskSpec(data=_toy_csv(tmp_path), calibration_fraction=0.5))
    hessians = collect_hessians(model, tokenizer, adapter, task, CalibrationSettings(samples=32),
                                progress=lambda _: None)
    group = shape.ffn_size // 4
    database = zipl.build_database(model, adapter, hessians, group_size=group, progress=lambda _: None)
    kinds = [LayerStructure(1, 2 * group), LayerStructure(0, shape.ffn_size), LayerStructure(shape.num_units, 0)]
    structure = ModelStructure(tuple(kinds[i % 3] for i in range(shape.num_layers)))

    member = zipl.stitch(model, adapter, database, structure)
    assert adapter.structure(member.config) == structure and zipl.predicted_error(database, structure) > 0
    save_model(member, tmp_path / "member")
    reloaded = load_model(str(tmp_path / "member"))
    report = verify_export(reloaded, export_model(reloaded, tmp_path / "member.onnx"), atol=1e-4)
    assert report.max_abs_diff <= 1e-4
