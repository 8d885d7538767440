"""Calibration texts from every supported source, and their fingerprint."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from obim_trainer.calibration import load_calibration_texts, tokenize_calibration
from obim_trainer.errors import CalibrationError


def test_jsonl_txt_json_parquet_and_dataset_give_the_same_texts(tmp_path):
    import datasets

    texts = ["first sample", "second one", "third"]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts) + "\n\n")
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "c.json").write_text(json.dumps([{"body": t} for t in texts]))
    ds = datasets.Dataset.from_dict({"body": texts})
    ds.to_parquet(str(tmp_path / "c.parquet"))
    for source in ("c.jsonl", "c.json", "c.parquet"):
        assert load_calibration_texts(tmp_path / source, 2, text_field="body") == texts[:2]
    assert load_calibration_texts(tmp_path / "c.txt", 5) == texts
    assert load_calibration_texts(ds, 100, text_field="body") == texts


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "no non-empty text"),
        ('{"text": "a"}\nnot json\n', "line 2 is not valid JSON"),
        ('{"body": "a"}\n', "no 'text' field (found: body)"),
    ],
)
def test_errors_name_the_file_and_the_fix(tmp_path, content, fragment):
    path = tmp_path / "calib.jsonl"
    path.write_text(content)
    with pytest.raises(CalibrationError) as info:
        load_calibration_texts(path)
    assert fragment in str(info.value) and "calib.jsonl" in str(info.value)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration_texts(tmp_path / "none.jsonl")
    (tmp_path / "c.csv").write_text("a")
    with pytest.raises(CalibrationError, match="unknown extension"):
        load_calibration_texts(tmp_path / "c.csv")


def test_fingerprint_tracks_texts_tokenizer_and_length(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = ["the model learns a new language " * 5, "merging recovers"]
    base = tokenize_calibration(texts, tok, max_length=64)
    assert tokenize_calibration(texts, tok, max_length=64).fingerprint() == base.fingerprint()
    assert tokenize_calibration(texts, tok, max_length=8).fingerprint() != base.fingerprint()
    assert tokenize_calibration(texts[:1], tok, max_length=64).fingerprint() != base.fingerprint()
    batches = list(base.batches(2))
    ids, mask = batches[0]
    assert ids.shape == mask.shape and int(mask.sum()) == base.num_tokens
    assert (ids[mask == 0] == base.pad_token_id).all()
