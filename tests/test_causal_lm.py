"""The causal-LM task on a tiny random Llama-style decoder with a word-level tokenizer: blocks, perplexity (checked
against transformers' own loss and against the exported file), the per-token distillation distance, the recipe's
block length, and a whole run whose members serve logits and load with plain transformers."""

from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.conftest import FILLER_WORDS, NEGATIVE_WORDS, POSITIVE_WORDS, tiny_recipe, toy_sentiment_rows, \
    write_tiny_bert
from tests.test_pipeline import invoke
from ziplm.cache import file_digest
from ziplm.errors import BadInputError
from ziplm.families.llama import LlamaAdapter
from ziplm.pipeline.recipe import parse_recipe
from ziplm.runtimes import InferenceEnv, SessionModule, get_runtime
from ziplm.stages.export import export_checked
from ziplm.tasks import CausalLMSpec, load_task

BLOCK = 16


def write_tiny_decoder(out: Path) -> Path:
    """A random 3-layer Llama (6 query heads in 3 KV groups) and a word-level tokenizer of the toy words."""
    vocab = {word: i for i, word in enumerate(["<unk>", "<eos>", *POSITIVE_WORDS, *NEGATIVE_WORDS, *FILLER_WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>").save_pretrained(out)
    config = LlamaAdapter().tiny_config()
    config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id = len(vocab), None, 1, 1
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def write_texts(folder: Path) -> Path:
    """Three documents of toy sentences, one per line."""
    folder.mkdir(parents=True)
    rows = toy_sentiment_rows(240)
    for index in range(3):
        (folder / f"doc{index}.txt").write_text("\n".join(row["text"] for row in rows[index::3]))
    return folder


@pytest.fixture
def decoder_dir(tmp_path: Path) -> Path:
    return write_tiny_decoder(tmp_path / "decoder")


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    return write_texts(tmp_path / "texts")


def spec(texts: Path, **settings: object) -> CausalLMSpec:
    return CausalLMSpec.model_validate({"type": "causal_lm", "data": str(texts), "max_length": BLOCK,
                                       "batch_size": 8} | settings)


def test_blocks_are_the_documents_tokens_joined_by_end_of_text_and_cut_to_the_block_length(decoder_dir, texts):
    task, _ = load_task(spec(texts)).adopt(str(decoder_dir))
    tokenizer = AutoTokenizer.from_pretrained(decoder_dir)
    stream = [token for file in sorted(texts.iterdir())
              for token in [*tokenizer(file.read_text(), add_special_tokens=False)["input_ids"], 1]]
    expected = sorted(tuple(stream[i: i + BLOCK]) for i in range(0, len(stream) - BLOCK + 1, BLOCK))
    blocks = [e.token_ids for e in (*task.validation, *task.calibration, *task.train)]
    assert sorted(blocks) == expected and len(task.validation) == round(0.125 * len(expected))
    again, _ = load_task(spec(texts)).adopt(str(decoder_dir))
    other, _ = load_task(spec(texts, seed=1)).adopt(str(decoder_dir))
    assert again.validation == task.validation and other.validation != task.validation
    assert again.fingerprint == task.fingerprint != load_task(spec(texts)).fingerprint


def test_perplexity_is_exp_of_the_models_own_mean_next_token_loss(decoder_dir, texts):
    task, model = load_task(spec(texts)).adopt(str(decoder_dir))
    metric = task.evaluate(model, AutoTokenizer.from_pretrained(decoder_dir))
    ids = torch.tensor([e.token_ids for e in task.validation])
    with torch.no_grad():
        own_loss = model(input_ids=ids, labels=ids).loss  # transformers shifts the labels itself
    assert metric.name == "perplexity" and not metric.higher_is_better and metric.size == len(task.validation)
    assert metric.value == pytest.approx(math.exp(float(own_loss)), rel=1e-5)
    assert metric.loss_from(metric.value - 1.0) == pytest.approx(1.0)  # a higher perplexity is worse


def test_the_exported_model_scores_as_the_model(decoder_dir, texts, tmp_path):
    task, model = load_task(spec(texts)).adopt(str(decoder_dir))
    tokenizer = AutoTokenizer.from_pretrained(decoder_dir)
    env = InferenceEnv(threads=1, sequence_length=BLOCK)
    export_checked(model, tmp_path / "model.onnx", env)
    session = SessionModule(get_runtime(env).load(tmp_path / "model.onnx"))
    assert task.evaluate(session, tokenizer).value == pytest.approx(task.evaluate(model, tokenizer).value, rel=1e-4)


def test_the_distillation_distance_is_the_mean_kl_over_tokens(decoder_dir, texts):
    task = load_task(spec(texts))
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    per_token = F.kl_div(F.log_softmax(student / 2.0, -1), F.log_softmax(teacher / 2.0, -1), reduction="none",
                         log_target=True).sum(-1)
    assert float(task.output_distance(student, teacher, 2.0)) == pytest.approx(float(per_token.mean()) * 4.0)
    assert float(task.output_distance(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_an_encoder_given_to_a_language_model_task_is_refused(texts, tmp_path):
    with pytest.raises(BadInputError, match="not a causal language model"):
        load_task(spec(texts)).adopt(str(write_tiny_bert(tmp_path / "bert")))


def test_blocks_are_the_environments_sequence_length_unless_the_recipe_says_otherwise(texts):
    base = f"name: lm\nmodel: m\ntask: {{type: causal_lm, data: {texts}}}\nenvironment: {{sequence_length: 64}}\n"
    recipe = parse_recipe(base)
    assert recipe.task.max_length == 64 and recipe.teacher == "none"
    with pytest.raises(BadInputError, match="max_length 32 tokens, but environment.sequence_length is 64"):
        parse_recipe(base.replace("data:", "max_length: 32, data:"))


def test_a_generation_phase_needs_a_decoder_task_in_fp32(texts, toy_sentiment_csv):
    decode = "environment: {sequence_length: 64, phase: decode, context_length: 128"
    recipe = f"name: lm\nmodel: m\ntask: {{type: causal_lm, data: {texts}}}\n{decode}}}\ntargets: [2]\n"
    assert parse_recipe(recipe).environment.context_length == 128
    for wrong in (recipe.replace("}\ntargets", ", precision: int8}\ntargets"),
                  f"name: c\nmodel: m\ntask: {{data: {toy_sentiment_csv}}}\n{decode}}}\ntargets: [2]\n"):
        with pytest.raises(BadInputError, match="needs a causal_lm task and precision fp32"):
            parse_recipe(wrong)


def test_a_request_recipe_takes_an_end_to_end_sla_and_refuses_a_time_per_token_one(texts):
    request = "environment: {sequence_length: 64, phase: request, new_tokens: 32}"
    recipe = f"name: lm\nmodel: m\ntask: {{type: causal_lm, data: {texts}}}\n{request}\n"
    parsed = parse_recipe(recipe + "slas: [{p90_ms: 900, phase: request}]\n")
    assert parsed.environment.new_tokens == 32 and parsed.slas[0].label == "E2E p90<=900ms"
    with pytest.raises(BadInputError, match="is for phase decode, but the environment .* has phase request"):
        parse_recipe(recipe + "slas: [{p90_ms: 20, phase: decode}]\n")


def run_decoder_family(root: Path, **environment: object) -> Path:
    """`ziplm run` of the causal-LM task on the tiny decoder (one member at 1.3x) in a phase; its output folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZIPLM_CACHE", str(root / "cache"))
        texts = write_texts(root / "texts")
        payload = tiny_recipe(write_tiny_decoder(root / "decoder"), texts,
                              task={"type": "causal_lm", "data": str(texts), "batch_size": 8,
                                    "calibration_fraction": 0.25})
        del payload["teacher"]
        payload["environment"] |= {"sequence_length": BLOCK, **environment}
        (root / "recipe.yaml").write_text(yaml.safe_dump(payload))
        result = invoke("run", str(root / "recipe.yaml"), "--out", str(root / "out"))
    assert result.exit_code == 0, result.output
    return root / "out"


@pytest.fixture(scope="module")
def decoder_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_decoder_family(tmp_path_factory.mktemp("decoder-family"))


def test_a_family_solved_for_time_per_token_serves_and_verifies_its_generation_artifact(tmp_path):
    out = run_decoder_family(tmp_path, phase="decode", context_length=40)
    report = json.loads((out / "report.json").read_text())
    (member,) = report["members"]
    assert member["runtime"]["phase"] == "decode" and member["runtime"]["context_length"] == 40
    assert member["kv_cache"]["context_length"] == 40  # the cache a token is decoded on
    assert member["served_file"] == "generation.onnx" and member["dense_reference"] == "../dense/generation.onnx"
    folder = out / member["name"]
    assert not (folder / "model.onnx").exists() and member["sha256"] == file_digest(folder / "generation.onnx")
    assert member["generation"]["sha256"] == member["sha256"] and (out / "dense" / "generation.onnx").is_file()
    (other,) = member["other_phases"]
    assert other["phase"] == "prefill" and other["measured_speedup"] > 0 and other["latency_ms"]["p90"] > 0
    markdown = (out / "report.md").read_text()
    assert "decode at context 40 (time per token)" in markdown and "time to first token" in markdown
    result = invoke("verify", str(folder), "--effort", "quick")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("PASS") and "time per token at context 40" in " ".join(result.output.split())


def test_a_family_solved_for_whole_requests_times_both_phases_and_verifies_requests(tmp_path):
    out = run_decoder_family(tmp_path, phase="request", new_tokens=6)
    report = json.loads((out / "report.json").read_text())
    (member,) = report["members"]
    assert member["runtime"]["phase"] == "request" and member["runtime"]["new_tokens"] == 6
    assert member["served_file"] == "generation.onnx" and member["kv_cache"]["context_length"] == BLOCK + 6
    prefill, decode = member["other_phases"]
    assert prefill["phase"] == "prefill" and decode["phase"] == "decode" and decode["context_length"] == BLOCK + 2
    assert all(other["measured_speedup"] > 0 for other in (prefill, decode))
    markdown = " ".join((out / "report.md").read_text().split())
    assert "request of 6 new tokens (time to the last token)" in markdown and "time per token at context" in markdown
    requests = invoke("verify", str(out / member["name"]), "--effort", "quick")
    assert requests.exit_code == 0, requests.output
    assert "time to the last of 6 tokens generated after 16 prompt tokens" in " ".join(requests.output.split())
    tokens = invoke("verify", str(out / member["name"]), "--effort", "quick", "--max-tpot-ms", "10000")
    assert tokens.exit_code == 0, tokens.output
    assert "p90 TPOT" in tokens.output and "time per token at context 18" in " ".join(tokens.output.split())


def test_a_run_of_the_causal_lm_task_writes_members_that_serve_logits(decoder_family):
    report = json.loads((decoder_family / "report.json").read_text())
    (member,) = report["members"]
    assert report["dense"]["origin"] == "given" and member["metric"]["name"] == "perplexity"
    assert member["metric"]["higher_is_better"] is False and member["metric"]["value"] > 1.0
    assert member["stages"][0] == "teacher-given"
    dense_cache, cache = report["dense"]["kv_cache"], member["kv_cache"]
    units = member["structure"]["units"]
    assert cache["bytes_per_token"] * 3 * len(units) == dense_cache["bytes_per_token"] * sum(units)  # 3 KV groups
    assert cache["bytes"] == cache["bytes_per_token"] * BLOCK == cache["bytes_per_token"] * cache["context_length"]
    assert "Key/value cache (fp32) per token of context: dense" in (decoder_family / "report.md").read_text()
    folder = decoder_family / member["name"]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert loaded.config.ziplm_structure == json.loads((folder / "config.json").read_text())["ziplm_structure"]


def test_member_and_dense_folders_ship_a_checked_generation_artifact(decoder_family):
    for folder in (decoder_family / "dense", next(decoder_family.glob("*-1.3x"))):
        record = json.loads((folder / "manifest.json").read_text())["generation"]
        assert record["file"] == "generation.onnx" and record["sha256"] == file_digest(folder / "generation.onnx")
        assert record["greedy_parity_tokens"] > 0
        session = ort.InferenceSession(str(folder / "generation.onnx"), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()][0] == "logits"


def test_verify_gates_time_to_first_token_and_time_per_token(decoder_family, tmp_path):
    member = next(decoder_family.glob("*-1.3x"))
    junit = tmp_path / "verify.xml"
    result = invoke("verify", str(member), "--max-ttft-ms", "10000", "--max-tpot-ms", "10000", "--context-length",
                    "40", "--effort", "quick", "--junit", str(junit))
    assert result.exit_code == 0, result.output
    assert "p90 TTFT" in result.output and "p90 TPOT" in result.output and "speedup" not in result.output.split("(")[0]
    assert "time per token at context 40" in result.output
    suite = ET.parse(junit).getroot().find("testsuite")
    assert [case.get("name") for case in suite.iter("testcase")] == ["p90 TTFT", "p90 TPOT"]
    assert suite.find(".//property[@name='decode.speedup.context_length']").get("value") == "40"
    assert float(suite.find(".//property[@name='decode.speedup.member_p90_ms']").get("value")) > 0
    strict = invoke("verify", str(member), "--max-tpot-ms", "0.000001", "--effort", "quick")
    assert strict.exit_code == 1 and strict.output.startswith("FAIL") and "p90 TPOT" in strict.output


def test_verify_of_time_per_token_needs_the_generation_artifacts(decoder_family, tmp_path):
    family = Path(shutil.copytree(decoder_family, tmp_path / "family"))
    (family / "dense" / "generation.onnx").unlink()
    result = invoke("verify", str(next(family.glob("*-1.3x"))), "--max-tpot-ms", "10")
    assert result.exit_code == 2 and "the dense generation artifact" in " ".join(result.output.split())
