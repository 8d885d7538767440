"""One text reader: a file gives the same texts to calibration, evaluation and training."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from obim_trainer.calibration import load_calibration_texts, tokenize_calibration
from obim_trainer.errors import CalibrationError, ConfigError
from obim_trainer.evaluation import load_eval_sets
from obim_trainer.training.text import load_text_file

FORTUNES = Path("/usr/share/games/fortunes")


def fortunes(name: str, count: int) -> list[str]:
    """Real multilingual samples: the first ``count`` entries of a fortune file, one line each."""
    entries = (FORTUNES / name).read_text(encoding="utf-8").split("\n%\n")
    return [" ".join(e.split()) for e in entries if e.strip()][:count]


@pytest.fixture(scope="module")
def samples() -> list[str]:
    if not (FORTUNES / "chinese").is_file() or not (FORTUNES / "de" / "anekdoten").is_file():
        pytest.skip("needs the fortunes, fortunes-de and fortunes-zh packages")
    return fortunes("chinese", 4) + fortunes("de/anekdoten", 4)


def write_every_suffix(folder: Path, texts: list[str]) -> list[Path]:
    """The same texts as JSONL (upper-case suffix, blank lines, a null), JSON, CRLF text and parquet."""
    rows = [{"body": t} for t in texts]
    jsonl = folder / "s.JSONL"
    jsonl.write_text(
        "\n".join([json.dumps(rows[0]), "", json.dumps({"body": None})] + [json.dumps(r) for r in rows[1:]])
    )
    (folder / "s.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (folder / "s.txt").write_bytes(("\r\n".join([texts[0], "  ", *texts[1:]]) + "\r\n").encode("utf-8"))
    datasets.Dataset.from_dict({"body": [*texts, ""]}).to_parquet(str(folder / "s.parquet"))
    return [jsonl, folder / "s.json", folder / "s.txt", folder / "s.parquet"]


def test_every_entry_point_reads_the_same_texts_from_each_file(tmp_path, samples, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for path in write_every_suffix(tmp_path, samples):
        field = "text" if path.suffix == ".txt" else "body"
        calibration = load_calibration_texts(path, 100, text_field=field)
        training = load_text_file(path, text_field=field)
        evaluation = load_eval_sets({"mixed": path}, tokenizer, max_samples=100, max_length=64, text_field=field)

        assert calibration == samples, path.name
        assert training.column_names == [field] and training[field] == samples, path.name
        expected = tokenize_calibration(samples, tokenizer, max_length=64).input_ids
        assert [ids.tolist() for ids in evaluation["mixed"].input_ids] == [ids.tolist() for ids in expected]


def test_bad_training_files_name_the_file_line_and_fix(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"train\.jsonl line 3 is not valid JSON.*fix or remove that line"):
        load_text_file(bad)
    with pytest.raises(ConfigError, match=r"train file .*none\.txt does not exist; set train=FILE"):
        load_text_file(tmp_path / "none.txt")
    (tmp_path / "t.csv").write_text("a")
    with pytest.raises(ConfigError, match=r"t\.csv has an unknown extension; use one of \.jsonl"):
        load_text_file(tmp_path / "t.csv")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match=r"blank\.txt holds no non-empty text"):
        load_text_file(tmp_path / "blank.txt")
    with pytest.raises(ConfigError, match=r"has no 'content' field \(found: text\); set text_field=NAME"):
        load_text_file(bad, text_field="content")
    with pytest.raises(CalibrationError, match=r"has no 'content' field.*set calibration_text_field=NAME"):
        load_calibration_texts(bad, text_field="content")


def test_a_changed_training_file_is_read_again(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("one\ntwo\n")
    assert load_text_file(path)["text"] == ["one", "two"]
    path.write_text("three\n")
    assert load_text_file(path)["text"] == ["three"]
