"""The sentence-embedding task: pooling as the model folder declares it, the cosine-to-dense metric and the probe,
the `sentence_embedding` output of the deployed file, distillation on embeddings, and a whole `ziplm run`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModel, AutoTokenizer

from tests.conftest import tiny_recipe, toy_sentiment_rows, write_tiny_bert
from tests.test_pipeline import invoke
from ziplm.errors import BadInputError
from ziplm.families.loading import load_model
from ziplm.pipeline.recipe import parse_recipe
from ziplm.runtimes import InferenceEnv, SessionModule, get_runtime
from ziplm.stages.distill import DistillSettings, distill
from ziplm.stages.export import export_checked
from ziplm.tasks import EmbeddingSpec, load_task
from ziplm.tasks.embedding import EmbeddingTask, Pooling, pair_scores


def write_sentence_encoder(out: Path, mode: str = "mean", normalize: bool = True) -> Path:
    """The tiny BERT without a head, as a sentence-transformers folder (modules.json, 1_Pooling, 2_Normalize)."""
    write_tiny_bert(out, head=False)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": mode == "cls",
         "pooling_mode_mean_tokens": mode == "mean", "pooling_mode_max_tokens": mode == "max"}))
    return out


@pytest.fixture
def encoder_dir(tmp_path: Path) -> Path:
    return write_sentence_encoder(tmp_path / "encoder")


@pytest.fixture
def task(toy_sentiment_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EmbeddingTask:
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    return load_task(EmbeddingSpec(type="embedding", data=str(toy_sentiment_csv), max_length=32, batch_size=16))


HIDDEN = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, -100.0]]])  # one sentence, its third token padding
MASK = torch.tensor([[1, 1, 0]])


@pytest.mark.parametrize("mode, expected", [("mean", [2.0, 2.0]), ("cls", [1.0, 0.0]), ("max", [3.0, 4.0])])
def test_pooling_reads_only_real_tokens(mode, expected):
    assert torch.equal(Pooling(mode, normalize=False)(HIDDEN, MASK), torch.tensor([expected]))
    assert torch.allclose(Pooling(mode, normalize=True)(HIDDEN, MASK), F.normalize(torch.tensor([expected])))


def test_pooling_is_the_one_the_model_folder_declares(tmp_path):
    declared = write_sentence_encoder(tmp_path / "cls", mode="cls", normalize=False)
    assert Pooling.of_model(declared, None) == Pooling("cls", normalize=False)
    plain = write_tiny_bert(tmp_path / "plain", head=False)
    assert Pooling.of_model(plain, "max") == Pooling("max", normalize=True)
    with pytest.raises(BadInputError, match="declares no sentence pooling.*set the task's pooling"):
        Pooling.of_model(plain, None)
    with pytest.raises(BadInputError, match="pools by cls .* but the task asks for mean"):
        Pooling.of_model(declared, "mean")


def test_the_dense_model_scores_a_cosine_of_one_and_a_changed_model_less(task, encoder_dir):
    adopted, dense = task.adopt(str(encoder_dir))
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    metric = adopted.evaluate(dense, tokenizer)
    assert (metric.name, metric.higher_is_better, metric.size) == ("cosine_to_dense", True, len(task.validation))
    assert metric.value == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= metric.extra["probe_accuracy"] <= 1.0
    changed = copy.deepcopy(dense)
    torch.manual_seed(0)
    with torch.no_grad():
        changed.embeddings.word_embeddings.weight.add_(torch.randn_like(changed.embeddings.word_embeddings.weight))
    assert adopted.evaluate(changed, tokenizer).value < 0.95


def test_without_a_label_column_there_is_no_probe(toy_sentiment_csv, encoder_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    task = load_task(EmbeddingSpec(type="embedding", data=str(toy_sentiment_csv), label_column=None, max_length=32))
    adopted, dense = task.adopt(str(encoder_dir))
    assert adopted.evaluate(dense, AutoTokenizer.from_pretrained(encoder_dir)).extra == {}


def test_pair_scores_rank_cosines_against_scores_and_find_the_best_threshold():
    cosines = np.array([0.9, 0.8, 0.3, 0.1])
    assert pair_scores(cosines, np.array([5.0, 4.0, 2.0, 0.5])) == {"spearman": pytest.approx(1.0)}
    scores = pair_scores(cosines, np.array([1.0, 0.0, 1.0, 0.0]))  # no threshold separates them: 3 of 4 at best
    assert scores["pair_accuracy"] == pytest.approx(0.75) and scores["spearman"] < 1.0


def test_scored_pairs_are_embedded_one_text_at_a_time_and_scored_by_rank(write_task_file, encoder_dir, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    rows = toy_sentiment_rows(120)
    pairs = [{"a": a["text"], "b": b["text"], "same": str(int(a["label"] == b["label"]))}
             for a, b in zip(rows[::2], rows[1::2])]
    spec = EmbeddingSpec(type="embedding", data=str(write_task_file("pairs.csv", pairs)), text_column="a",
                         text_pair_column="b", label_column="same", max_length=32)
    adopted, dense = load_task(spec).adopt(str(encoder_dir))
    assert adopted.reference.shape[0] == 2 * len(adopted.validation)  # both texts of every pair
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    assert adopted.encode(tokenizer, adopted.validation[:2])["input_ids"].shape[0] == 2
    metric = adopted.evaluate(dense, tokenizer)
    assert metric.value == pytest.approx(1.0, abs=1e-6) and set(metric.extra) == {"spearman", "pair_accuracy"}
    words = [{**pair, "same": "yes"} for pair in pairs]
    with pytest.raises(BadInputError, match="pairs' labels in column 'same' must be numbers"):
        load_task(spec.model_copy(update={"data": str(write_task_file("words.csv", words))}))


def test_the_deployed_file_outputs_the_sentence_embedding_and_scores_as_the_model(task, encoder_dir, tmp_path):
    adopted, dense = task.adopt(str(encoder_dir))
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    env = InferenceEnv(threads=1, sequence_length=32)
    onnx = tmp_path / "encoder.onnx"
    report = export_checked(adopted.served(dense), onnx, env)  # parity on a padded batch, like every file
    assert report.max_abs_diff <= 1e-4
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["sentence_embedding"]
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    deployed = SessionModule(get_runtime(env).load(onnx))
    assert adopted.evaluate(deployed, tokenizer).value == pytest.approx(1.0, abs=1e-5)


def test_distillation_on_embeddings_brings_a_student_closer_to_the_teacher(task, encoder_dir):
    adopted, teacher = task.adopt(str(encoder_dir))
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    student = copy.deepcopy(teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in student.encoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    before = adopted.evaluate(student, tokenizer).value
    distill(student, teacher, tokenizer, adopted, adopted.train,
            DistillSettings(epochs=3, learning_rate=1e-3, token_weight=0.0), lambda _: None)
    assert adopted.evaluate(student, tokenizer).value > before


def test_the_embedding_task_has_no_loss_and_never_fine_tunes(task, encoder_dir):
    with pytest.raises(BadInputError, match="no loss of its own"):
        task.loss(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(BadInputError, match="uses the given encoder as it is"):
        task.new_model(str(encoder_dir))
    base = "name: r\nmodel: minilm\ntask: {type: embedding, data: mr}\n"
    assert parse_recipe(base).teacher == "none"
    with pytest.raises(BadInputError, match="uses the given model as it is: set teacher: none"):
        parse_recipe(base + "teacher: {epochs: 2}\n")


def test_a_run_of_the_embedding_task_writes_members_that_serve_embeddings(tmp_path, monkeypatch, write_task_file):
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path / "cache"))
    encoder = write_sentence_encoder(tmp_path / "encoder")
    data = write_task_file("texts.csv", toy_sentiment_rows(160))
    payload = tiny_recipe(encoder, data, task={"type": "embedding", "data": str(data), "calibration_fraction": 0.25,
                                               "max_length": 32, "batch_size": 16})
    del payload["teacher"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(payload))
    result = invoke("run", str(recipe), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dense"]["origin"] == "given" and report["dense"]["metric"]["value"] == pytest.approx(1.0, abs=1e-6)
    (member,) = report["members"]
    assert member["metric"]["name"] == "cosine_to_dense" and 0.0 < member["metric"]["value"] < 1.0
    assert "probe_accuracy" in member["metric"]["extra"]
    session = ort.InferenceSession(str(tmp_path / "out" / member["name"] / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["sentence_embedding"]
    reloaded = load_model(str(tmp_path / "out" / member["name"]), "base")
    loaded = AutoModel.from_pretrained(tmp_path / "out" / member["name"], trust_remote_code=True)
    assert type(loaded) is type(reloaded) and loaded.config.ziplm_structure == reloaded.config.ziplm_structure
    assert member["metric"]["value"] == pytest.approx(
        load_task(EmbeddingSpec.model_validate(payload["task"])).adopt(str(encoder))[0]
        .evaluate(reloaded, AutoTokenizer.from_pretrained(encoder)).value, abs=1e-6)
