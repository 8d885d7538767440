"""Config, custom code and tokenizer files travel from the base (or a tokenizer source) to the output."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from obim_trainer.checkpoints import copy_model_files
from obim_trainer.errors import CheckpointError
from tests.conftest import copy_tree


def same_bytes(a: Path, b: Path, names: list[str]) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_copies_config_and_tokenizer_that_transformers_loads(llama_family, tmp_path):
    from transformers import AutoTokenizer

    base, _ = llama_family
    copied = copy_model_files(base, None, tmp_path)
    expected = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert set(copied) == expected == {p.name for p in tmp_path.iterdir()}
    assert same_bytes(base, tmp_path, copied)
    text = "the model learns a new language"
    assert AutoTokenizer.from_pretrained(tmp_path)(text) == AutoTokenizer.from_pretrained(base)(text)


def test_tokenizer_and_custom_code_come_from_where_they_live(llama_family, tmp_path):
    base, _ = llama_family
    config_source = copy_tree(base, tmp_path / "base")
    (config_source / "modeling_custom.py").write_text("# remote code\n")
    (config_source / "tokenizer.json").write_text('{"stale": true}')
    tokenizer_source = tmp_path / "tok"
    (tokenizer_source / "additional_chat_templates").mkdir(parents=True)
    (tokenizer_source / "additional_chat_templates" / "tools.jinja").write_text("{{ tools }}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tokenizer_source / name).write_bytes((base / name).read_bytes())
    (tokenizer_source / "tokenization_custom.py").write_text("# remote tokenizer\n")
    dest = tmp_path / "out"
    dest.mkdir()
    copied = copy_model_files(config_source, tokenizer_source, dest)
    assert set(copied) == {
        "config.json",
        "generation_config.json",
        "modeling_custom.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenization_custom.py",
        "additional_chat_templates",
    }
    assert same_bytes(tokenizer_source, dest, ["tokenizer.json", "tokenization_custom.py"])
    assert same_bytes(config_source, dest, ["config.json", "modeling_custom.py"])
    assert (dest / "additional_chat_templates" / "tools.jinja").read_text() == "{{ tools }}"


def test_missing_config_names_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty has no config\.json; pass the base model's folder"):
        copy_model_files(tmp_path / "empty", None, tmp_path)


def test_bad_tokenizer_source(llama_family, tmp_path):
    base, _ = llama_family
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(CheckpointError, match=r"tokenizer source .*nope does not exist; pass a folder with tokenizer"):
        copy_model_files(base, tmp_path / "nope", dest)
    (tmp_path / "bare").mkdir()
    with pytest.raises(CheckpointError, match=r"tokenizer source .*bare holds no tokenizer files; pass a folder"):
        copy_model_files(base, tmp_path / "bare", dest)
    assert not any(dest.iterdir()), "nothing is copied before the sources are checked"


def test_base_without_tokenizer_warns(tmp_path, caplog):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    dest = tmp_path / "out"
    dest.mkdir()
    with caplog.at_level(logging.WARNING):
        assert copy_model_files(base, None, dest) == ["config.json"]
    assert "holds no tokenizer files" in caplog.text
