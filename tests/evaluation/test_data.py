"""Evaluation sets per language from files, text datasets and already tokenized datasets."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from obim_trainer.errors import ConfigError
from obim_trainer.evaluation import load_eval_sets
from tests.conftest import make_texts, write_jsonl


@pytest.fixture
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_text_files_and_datasets_are_tokenized_in_order(tokenizer, tmp_path):
    texts = make_texts(6, seed=2)
    sets = load_eval_sets(
        {"en": write_jsonl(tmp_path / "en.jsonl", texts), "ja": Dataset.from_dict({"text": texts[:2]})},
        tokenizer,
        max_samples=4,
        max_length=16,
    )
    expected = tokenizer(texts[:4], truncation=True, max_length=16)["input_ids"]
    assert [ids.tolist() for ids in sets["en"].input_ids] == expected
    assert len(sets["ja"].input_ids) == 2
    assert sets["en"].pad_token_id == tokenizer.pad_token_id


def test_pretokenized_datasets_are_used_as_they_are(tokenizer):
    rows = [[1, 5, 6, 7, 8, 9], [4], [1, 9, 9]]
    sets = load_eval_sets({"ja": Dataset.from_dict({"input_ids": rows})}, tokenizer, max_samples=5, max_length=4)
    # one-token samples predict nothing and are dropped; the rest are cut to max_length
    assert [t.tolist() for t in sets["ja"].input_ids] == [[1, 5, 6, 7], [1, 9, 9]]
    assert all(t.dtype == torch.long for t in sets["ja"].input_ids)


def test_errors_name_the_language(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match=r"eval_data\['ja'\]: .*missing.jsonl does not exist"):
        load_eval_sets({"ja": tmp_path / "missing.jsonl"}, tokenizer)
    with pytest.raises(ConfigError, match=r"eval_data\['zh'\]: .*input_ids hold no sample"):
        load_eval_sets({"zh": Dataset.from_dict({"input_ids": [[3]]})}, tokenizer)
    with pytest.raises(ConfigError, match="eval_data is empty"):
        load_eval_sets({}, tokenizer)
