"""Comparison tables of evaluated models and the pick by objective."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from obim_trainer.evaluation import PerLanguageEvaluator, load_eval_sets
from obim_trainer.evaluation.comparison import ComparisonRow, ComparisonTable, Objective, evaluate_folders, pick
from tests.conftest import make_texts, write_jsonl

COLUMNS = {"en": "obim_en_loss", "zh": "obim_zh_loss"}


def table_of(values: dict[str, tuple[float, float]], higher_is_better: bool = False) -> ComparisonTable:
    rows = [
        ComparisonRow(name, Path(name), "base" if name == "base" else "merge", {"obim_en_loss": en, "obim_zh_loss": zh})
        for name, (en, zh) in values.items()
    ]
    return ComparisonTable(rows=rows, columns=dict(COLUMNS), higher_is_better=higher_is_better)


SWEEP = {"base": (2.0, 9.0), "obim": (3.0, 4.0), "obim@0.6": (2.5, 4.6), "obim@0.3": (2.2, 6.0)}


def test_avg_picks_the_best_mean_among_merges_only():
    table = table_of(SWEEP)  # base has the lowest en but is not a merge
    assert pick(table, Objective()).name == "obim"  # means 3.5, 3.55, 4.1
    assert table.picked == "obim" and table.average(table.row("obim@0.6")) == pytest.approx(3.55)


def test_old_avg_respects_the_new_language_limit():
    table = table_of(SWEEP)
    assert pick(table, Objective(kind="old_avg", new_language="zh", new_limit=5.0)).name == "obim@0.6"
    assert pick(table, Objective(kind="old_avg", new_language="zh")).name == "obim@0.3"


def test_old_avg_with_an_unreachable_limit_falls_back_to_the_best_new_language(caplog):
    table = table_of(SWEEP)
    assert pick(table, Objective(kind="old_avg", new_language="zh", new_limit=1.0)).name == "obim"
    assert "no merge keeps zh within 1, so the best on zh: obim" in caplog.text
    # the table and every log line after it say the same: not "with zh within 1", which no merge met
    assert table.pick_reason == "no merge keeps zh within 1, so the best on zh"
    assert "Picked **obim**: no merge keeps zh within 1, so the best on zh." in table.to_markdown()
    assert "within 1" not in table.to_markdown().replace("no merge keeps zh within 1", "")
    pick(table, Objective(kind="old_avg", new_language="zh", new_limit=5.0))
    assert table.pick_reason == "best average over the languages other than zh with zh within 5"


def test_accuracies_are_maximised():
    table = table_of({"a": (0.30, 0.50), "b": (0.40, 0.45)}, higher_is_better=True)
    assert pick(table, Objective()).name == "b"
    assert pick(table, Objective(kind="old_avg", new_language="zh", new_limit=0.48)).name == "a"


def test_a_missing_metric_never_wins():
    table = table_of({"a": (3.0, 3.0), "b": (1.0, 1.0)})
    del table.row("b").metrics["obim_zh_loss"]
    assert math.isnan(table.average(table.row("b"))) and pick(table, Objective()).name == "a"


def test_objective_old_avg_needs_the_new_language():
    with pytest.raises(ValueError, match="new_language"):
        Objective(kind="old_avg")


def test_markdown_and_json_hold_every_row_and_the_pick(tmp_path):
    table = table_of(SWEEP)
    pick(table, Objective(kind="old_avg", new_language="zh", new_limit=5.0))
    md, js = table.write(tmp_path)
    text = md.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "| model | kind | en | zh | avg | picked |"
    assert "| obim@0.6 | merge | 2.500 | 4.600 | 3.550 | ✓ |" in text
    assert "| base | base | 2.000 | 9.000 | 5.500 |  |" in text
    data = json.loads(js.read_text())
    assert data["picked"] == "obim@0.6" and data["objective"]["new_limit"] == 5.0
    assert [r["name"] for r in data["rows"]] == list(SWEEP)
    assert data["rows"][1]["avg"] == pytest.approx(3.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comparison.json", "comparison.md"]


def test_evaluate_folders_records_what_the_evaluator_returns(llama_family, tokenizer_dir, tmp_path):
    base, ckpts = llama_family
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    files = {x: write_jsonl(tmp_path / f"{x}.jsonl", make_texts(6, seed=s)) for x, s in (("en", 1), ("zh", 2))}
    evaluator = PerLanguageEvaluator(load_eval_sets(files, tokenizer, max_length=32))
    table = evaluate_folders({"base": (base, "base"), "ckpt": (ckpts[0], "checkpoint")}, evaluator, progress=False)
    assert table.columns == COLUMNS and not table.higher_is_better
    assert [r.kind for r in table.rows] == ["base", "checkpoint"]
    assert table.rows[1].metrics == evaluator.evaluate_folder(ckpts[0])
    assert table.rows[0].metrics != table.rows[1].metrics
