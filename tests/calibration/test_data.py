"""Calibration texts from every supported source, their tokenization and fingerprint."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from obim_trainer.calibration import CalibrationSet, load_calibration_texts, tokenize_calibration
from obim_trainer.errors import CalibrationError

TEXTS = ["first sample", "second one", "  ", "third"]
NON_EMPTY = ["first sample", "second one", "third"]


@pytest.fixture
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_every_file_format_and_a_dataset_give_the_non_empty_texts_in_order(tmp_path):
    import datasets

    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in TEXTS) + "\n\n")
    (tmp_path / "c.json").write_text(json.dumps([{"body": t} for t in TEXTS]))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps({"body": t}) for t in TEXTS))  # JSON Lines as .json
    (tmp_path / "c.txt").write_text("\n".join(TEXTS) + "\n\n")
    ds = datasets.Dataset.from_dict({"body": [*TEXTS, None]})
    ds.to_parquet(str(tmp_path / "c.parquet"))
    for source in ("c.jsonl", "c.json", "lines.json", "c.parquet"):
        assert load_calibration_texts(tmp_path / source, 100, text_field="body") == NON_EMPTY, source
        assert load_calibration_texts(str(tmp_path / source), 2, text_field="body") == NON_EMPTY[:2], source
    assert load_calibration_texts(tmp_path / "c.txt", 100) == NON_EMPTY
    assert load_calibration_texts(ds, 100, text_field="body") == NON_EMPTY
    assert load_calibration_texts(ds, 1, text_field="body") == NON_EMPTY[:1]


def test_the_shared_calibration_file_reads_deterministically(calibration_jsonl):
    rows = [json.loads(line)["text"] for line in calibration_jsonl.read_text().splitlines()]
    assert load_calibration_texts(calibration_jsonl, 25) == rows[:25]
    assert load_calibration_texts(calibration_jsonl) == rows  # 40 < 100: all of them


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("calib.jsonl", "", "no non-empty text"),
        ("calib.jsonl", "\n  \n", "no non-empty text"),
        ("calib.txt", "\n \n", "no non-empty text"),
        ("calib.jsonl", '{"text": "a"}\nnot json\n', "line 2 is not valid JSON"),
        ("calib.jsonl", '{"text": "a"}\n{"body": "b", "id": 1}\n', "line 2 has no 'text' field (found: body, id)"),
        ("calib.jsonl", '{"text": ["a"]}\n', "field 'text' holds list, not text"),
        ("calib.jsonl", '["a"]\n', "not an object"),
        ("calib.json", '[{"body": "a"}]', "item 0 has no 'text' field (found: body)"),
        ("calib.json", '{"text": "a"}', "must hold a list of objects"),
    ],
)
def test_errors_name_the_file_and_the_fix(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CalibrationError) as info:
        load_calibration_texts(path)
    assert fragment in str(info.value) and name in str(info.value)


def test_missing_columns_list_the_columns_found(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"content": ["a"], "lang": ["ja"]})
    ds.to_parquet(str(tmp_path / "c.parquet"))
    with pytest.raises(CalibrationError, match=r"c\.parquet has no column 'text' \(columns: content, lang\)"):
        load_calibration_texts(tmp_path / "c.parquet")
    with pytest.raises(CalibrationError, match=r"no column 'text' \(columns: content, lang\)"):
        load_calibration_texts(ds)
    with pytest.raises(CalibrationError, match="pass one split"):
        load_calibration_texts(datasets.DatasetDict({"train": ds}), text_field="content")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(CalibrationError, match=r"broken\.parquet is not a readable parquet file"):
        load_calibration_texts(tmp_path / "broken.parquet")


def test_missing_unknown_and_folder_sources_and_bad_sample_count(tmp_path):
    with pytest.raises(CalibrationError, match=r"none\.jsonl does not exist"):
        load_calibration_texts(tmp_path / "none.jsonl")
    (tmp_path / "c.csv").write_text("a")
    with pytest.raises(CalibrationError, match=r"c\.csv has an unknown extension; use one of \.jsonl"):
        load_calibration_texts(tmp_path / "c.csv")
    with pytest.raises(CalibrationError, match="is not a file"):
        load_calibration_texts(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(CalibrationError, match=r"latin1\.txt .*UTF-8"):
        load_calibration_texts(tmp_path / "latin1.txt")
    with pytest.raises(CalibrationError, match="at least 1"):
        load_calibration_texts(tmp_path / "c.csv", num_samples=0)


def test_tokenization_truncates_and_never_pads(tokenizer):
    texts = ["the model learns a new language " * 20, "merging recovers"]
    calib = tokenize_calibration(texts, tokenizer, max_length=16)
    full = tokenizer(texts)["input_ids"]
    assert [ids.tolist() for ids in calib.input_ids] == [full[0][:16], full[1]]
    assert all(ids.dtype == torch.int64 and ids.ndim == 1 for ids in calib.input_ids)
    assert calib.pad_token_id == tokenizer.pad_token_id and tokenizer.pad_token_id not in calib.input_ids[1]
    assert calib.num_tokens == 16 + len(full[1])


def test_a_tokenizer_without_pad_token_pads_with_eos(tokenizer, caplog):
    tokenizer.pad_token = None
    with caplog.at_level(logging.INFO, logger="obim_trainer.calibration.data"):
        calib = tokenize_calibration(["merging recovers", "the model"], tokenizer)
    assert calib.pad_token_id == tokenizer.eos_token_id and "no pad token" in caplog.text


def test_fingerprint_tracks_texts_tokenizer_samples_and_length(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = ["the model learns a new language " * 5, "merging recovers"]
    base = tokenize_calibration(texts, tok, max_length=64).fingerprint()
    assert tokenize_calibration(texts, tok, max_length=64).fingerprint() == base
    assert tokenize_calibration(texts, tok, max_length=8).fingerprint() != base
    assert tokenize_calibration(texts[:1], tok, max_length=64).fingerprint() != base
    assert tokenize_calibration([texts[0], "merging recovered"], tok, max_length=64).fingerprint() != base
    other_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    other_tok.add_tokens(["merging"])  # another vocabulary splits the same text differently
    assert tokenize_calibration(texts, other_tok, max_length=64).fingerprint() != base


def test_batches_are_right_padded_longest_first_and_cover_every_token():
    samples = [torch.arange(1, n + 1) for n in (3, 7, 1, 5, 2)]
    calib = CalibrationSet(samples, pad_token_id=0)
    batches = list(calib.batches(2))
    assert [ids.shape for ids, _ in batches] == [(2, 7), (2, 3), (1, 1)]  # lengths 7,5 | 3,2 | 1
    for ids, mask in batches:
        lengths = mask.sum(1)
        assert all(mask[r, : lengths[r]].all() and not mask[r, lengths[r] :].any() for r in range(len(ids)))
        assert (ids[mask == 0] == 0).all()
    real = sorted(tuple(ids[r][mask[r].bool()].tolist()) for ids, mask in batches for r in range(len(ids)))
    assert real == sorted(tuple(s.tolist()) for s in samples)
    with pytest.raises(CalibrationError, match="at least 1"):
        next(calib.batches(0))


def test_token_counts_and_shards(tokenizer, calibration_jsonl):
    calib = tokenize_calibration(load_calibration_texts(calibration_jsonl), tokenizer, max_length=32)
    counts = calib.token_counts(400)
    expected = Counter(t for ids in calib.input_ids for t in ids.tolist())
    assert counts.dtype == torch.int64 and counts.shape == (400,)
    assert {i: int(c) for i, c in enumerate(counts) if c} == dict(expected)
    assert int(counts[calib.pad_token_id]) == expected[calib.pad_token_id] == 0
    shards = [calib.shard(r, 3) for r in range(3)]
    assert sum(len(s.input_ids) for s in shards) == len(calib.input_ids)
    assert torch.equal(sum(s.token_counts(400) for s in shards), counts)
