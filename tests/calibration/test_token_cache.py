"""Tokenized calibration sets are reused only while the texts, length and tokenizer files are the same."""

from __future__ import annotations

import shutil

import pytest
import torch

from obim_trainer.calibration.data import CalibrationSet
from obim_trainer.calibration.token_cache import cached_tokenization, tokenizer_digest


@pytest.fixture
def tokenizer_copy(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OBIM_CACHE_DIR", str(tmp_path / "cache"))
    return shutil.copytree(tokenizer_dir, tmp_path / "tokenizer")


def counting_tokenizer(calls: list[int]):
    def tokenize() -> CalibrationSet:
        calls.append(1)
        return CalibrationSet([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_token_id=3)

    return tokenize


def test_a_second_tokenization_of_the_same_inputs_comes_from_the_cache(tokenizer_copy):
    calls: list[int] = []
    first = cached_tokenization(["a b c", "d"], tokenizer_copy, 64, counting_tokenizer(calls))
    again = cached_tokenization(["a b c", "d"], tokenizer_copy, 64, counting_tokenizer(calls))
    assert calls == [1]
    assert again.pad_token_id == 3 and again.fingerprint() == first.fingerprint()
    assert [t.dtype for t in again.input_ids] == [torch.long, torch.long]


@pytest.mark.parametrize("change", ["texts", "length", "tokenizer file", "new file"])
def test_anything_that_decides_the_ids_is_a_miss(tokenizer_copy, change):
    calls: list[int] = []
    cached_tokenization(["a b c"], tokenizer_copy, 64, counting_tokenizer(calls))
    texts, length = ["a b c"], 64
    if change == "texts":
        texts = ["a b d"]
    elif change == "length":
        length = 32
    elif change == "tokenizer file":
        config = tokenizer_copy / "tokenizer_config.json"
        config.write_text(config.read_text().replace("{", '{"model_max_length": 7, ', 1))
    else:
        (tokenizer_copy / "added_tokens.json").write_text('{"<new>": 999}')
    cached_tokenization(texts, tokenizer_copy, length, counting_tokenizer(calls))
    assert calls == [1, 1]


def test_weight_files_do_not_take_part(tokenizer_copy):
    before = tokenizer_digest(tokenizer_copy)
    (tokenizer_copy / "model.safetensors").write_bytes(b"weights")
    (tokenizer_copy / "optimizer.pt").write_bytes(b"state")
    assert tokenizer_digest(tokenizer_copy) == before
