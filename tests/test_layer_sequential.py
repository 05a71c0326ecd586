"""Layer-sequential calibration from a model folder (families.loading.load_skeleton, stages.calibrate): a sharded
checkpoint and a task's batches give the whole model's Hessians; a folder it cannot read one layer at a time is
refused with what to do instead. (Every family's equality: test_family_conformance.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification, BertModel, BertTokenizerFast

from tests.conftest import toy_sentiment_rows, write_tiny_bert
from ziplm.errors import BadInputError
from ziplm.families import adapter_for
from ziplm.families.loading import load_model, load_skeleton
from ziplm.stages.calibrate import CalibrationSettings, calibration_batches, layer_sequential_hessians
from ziplm.stages.calibrate import LayerHessians, collect_hessians, load_hessians, save_hessians
from ziplm.tasks import TaskSpec, load_task


@pytest.fixture
def sharded(tmp_path) -> Path:
    """The tiny BERT classifier saved in shards of at most 40 KB, with their index."""
    folder = write_tiny_bert(tmp_path / "tiny")
    model = BertForSequenceClassification.from_pretrained(folder)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    model.save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("*.safetensors"))) >= 3
    return folder


def test_a_sharded_checkpoint_calibrated_layer_by_layer_gives_the_whole_model_s_hessians(sharded, tmp_path):
    data = tmp_path / "toy.csv"
    data.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in toy_sentiment_rows(80)))
    task = load_task(TaskSpec(data=str(data), calibration_fraction=0.5))
    tokenizer = BertTokenizerFast.from_pretrained(sharded)
    settings = CalibrationSettings(samples=24)
    whole = collect_hessians(load_model(str(sharded)), tokenizer, adapter_for(load_model(str(sharded)).config), task,
                             settings, progress=lambda _: None)
    skeleton, layers = load_skeleton(str(sharded))
    lines: list[str] = []
    sequential = list(layer_sequential_hessians(skeleton, adapter_for(skeleton.config),
                                           calibration_batches(tokenizer, task, settings), lines.append, layers))
    assert lines[-1].startswith("calibration: layer 2/2")
    for a, b in zip(whole, sequential, strict=True):
        assert torch.equal(a.attention, b.attention) and torch.equal(a.ffn, b.ffn) and a.tokens == b.tokens > 24


def test_hessians_are_written_layer_by_layer_as_they_come_and_read_back(tmp_path):
    def layers():
        yield LayerHessians(torch.eye(4, dtype=torch.float64), None, 10, 1.5, 2.5)
        assert (tmp_path / "hessians-0.safetensors").exists()  # on disk before the next layer is computed
        yield LayerHessians(None, 2 * torch.eye(8, dtype=torch.float64), 12, 2.5, 3.5)

    save_hessians(layers(), tmp_path)
    first, second = load_hessians(tmp_path)
    assert torch.equal(first.attention, torch.eye(4, dtype=torch.float64)) and first.ffn is None
    assert second.attention is None and torch.equal(second.ffn, 2 * torch.eye(8, dtype=torch.float64))
    assert (first.tokens, first.stream_in, second.tokens, second.stream_out) == (10, 1.5, 12, 3.5)


def test_a_missing_layer_tensor_is_named_when_its_layer_is_read(tmp_path):
    folder = write_tiny_bert(tmp_path / "tiny")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["bert.encoder.layer.1.output.dense.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    skeleton, layers = load_skeleton(str(folder))
    adapter = adapter_for(skeleton.config)
    with layers.loaded(adapter.layers(skeleton)[0]):
        pass
    with pytest.raises(BadInputError, match=r"no weights for bert\.encoder\.layer\.1\.output\.dense\.weight"):
        with layers.loaded(adapter.layers(skeleton)[1]):
            pass


def test_a_checkpoint_of_the_bare_model_fits_its_own_head_and_not_a_missing_one(tmp_path):
    folder = write_tiny_bert(tmp_path / "tiny")
    bare = tmp_path / "bare"
    BertModel.from_pretrained(folder).save_pretrained(bare)  # keys without the "bert." prefix
    skeleton, layers = load_skeleton(str(bare), head="base")
    with layers.loaded(adapter_for(skeleton.config).layers(skeleton)[0]) as layer:
        assert not any(parameter.is_meta for parameter in layer.parameters())
    with pytest.raises(BadInputError, match=r"no weights for classifier\.weight"):
        load_skeleton(str(bare), head="sequence-classification")


def test_a_folder_without_safetensors_or_of_a_quantized_model_is_refused(tmp_path):
    folder = write_tiny_bert(tmp_path / "tiny")
    bin_only = tmp_path / "bin-only"
    shutil.copytree(folder, bin_only)
    (bin_only / "model.safetensors").unlink()
    with pytest.raises(BadInputError, match=r"no \*\.safetensors weights"):
        load_skeleton(str(bin_only))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "ziplm_quantization": {"bits": 8}}))
    with pytest.raises(BadInputError, match=r"quantized model: calibrate the float model"):
        load_skeleton(str(folder))
