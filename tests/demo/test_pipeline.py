"""The forgetting-recovery demo end to end at test size (configs/demo/smoke.yaml), on real fortunes text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from obim_trainer.demo.config import DemoConfig, MergeSpec
from obim_trainer.demo.fortunes import package_files
from obim_trainer.evaluation import PerLanguageEvaluator, load_eval_sets

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.skipif(not package_files("fortunes-zh"), reason="run scripts/install_fortunes.sh")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from obim_trainer.demo.pipeline import run_demo

    config = DemoConfig.from_yaml(ROOT / "configs" / "demo" / "smoke.yaml")
    output = tmp_path_factory.mktemp("demo")
    return config, output, run_demo(config, output)


def rows_by_name(result):
    return {row.name: row for row in result.table.rows}


def test_forgetting_is_measured_against_the_base(demo):
    config, _, result = demo
    rows = rows_by_name(result)
    last = [r for r in result.table.rows if r.kind == "checkpoint"][-1]
    assert last.name == f"ckpt-{config.continued.steps}"
    for language in config.old_languages:
        loss = f"obim_{language}_loss"
        assert result.forgetting[language] == pytest.approx(last.metrics[loss] - rows["base"].metrics[loss])
    new = f"obim_{config.new_language}_loss"
    assert last.metrics[new] < rows["base"].metrics[new]  # the new language was learnt


def test_every_method_and_share_is_merged_into_a_loadable_model(demo):
    config, output, result = demo
    merges = [r for r in result.table.rows if r.kind == "merge"]
    assert [r.name for r in merges] == [v.name for v in config.planned_merges()]
    assert {"obim", "obim@0.5", "regmean@base_weight=1"} <= {r.name for r in merges}  # per-language regmean ran
    ids = AutoTokenizer.from_pretrained(output / "work" / "base")("你好, world", return_tensors="pt").input_ids
    for row in merges:
        assert row.path.parent == output / "work" / "merges"
        logits = AutoModelForCausalLM.from_pretrained(row.path)(input_ids=ids).logits
        assert bool(logits.isfinite().all())


def test_table_numbers_are_what_the_evaluator_returns_for_those_folders(demo):
    config, output, result = demo
    data = output / "work" / "data"
    tokenizer = AutoTokenizer.from_pretrained(output / "work" / "base")
    sets = load_eval_sets(
        {x: data / f"{x}_eval.jsonl" for x in config.languages},
        tokenizer,
        max_samples=config.eval_entries,
        max_length=config.block_size,
    )
    evaluator = PerLanguageEvaluator(sets)
    for row in result.table.rows[:: max(1, len(result.table.rows) // 4)]:
        assert evaluator.evaluate_folder(row.path) == row.metrics


def test_the_report_table_and_pictures_are_written(demo):
    config, output, result = demo
    report = (output / "README.md").read_text(encoding="utf-8")
    for row in result.table.rows:
        assert f"| {row.name} |" in report
        assert f"{row.metrics[f'obim_{config.new_language}_loss']:.3f}" in report
    saved = json.loads(result.files["table_json"].read_text())
    assert saved and result.files["table_md"].read_text(encoding="utf-8") in report
    marked = [line for line in report.splitlines() if line.startswith("| ") and line.endswith(" ✓ |")]
    assert marked == [next(line for line in report.splitlines() if line.startswith(f"| {saved['picked']} |"))]
    assert saved["families"] == config.family_of()
    for key in ("losses_png", "ownership_png", "tradeoff_png"):
        picture = result.files[key]
        assert picture.parent == output and picture.read_bytes()[:8] == PNG and picture.stat().st_size > 5000
    assert not list(output.glob(".*tmp*"))


def test_with_wandb_the_comparison_and_pictures_reach_the_run(tmp_path, monkeypatch):
    from obim_trainer.demo.pipeline import run_demo
    from tests.tracking.wandb_offline import fresh_wandb, history, run_dir, table

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    fresh_wandb()
    config = DemoConfig.from_yaml(ROOT / "configs" / "demo" / "smoke.yaml").model_copy(
        update={"report_to": "wandb", "merges": [MergeSpec(method="obim")]}
    )
    result = run_demo(config, tmp_path / "demo")
    run = run_dir(tmp_path)
    rows = history(run)
    (last,) = [r for r in rows if "obim/comparison/path" in r]
    logged = table(run, "obim/comparison", last)
    assert [r[0] for r in logged["data"]] == [r.name for r in result.table.rows]
    loss = logged["columns"].index("obim_zh_loss")
    assert [r[loss] for r in logged["data"]] == pytest.approx([r.metrics["obim_zh_loss"] for r in result.table.rows])
    for plot in ("losses", "ownership", "tradeoff"):
        assert last[f"obim/plots/{plot}/_type"] == "image-file"
        assert (run / "files" / last[f"obim/plots/{plot}/path"]).read_bytes()[:8] == PNG
    assert any("obim/checkpoint/obim_zh_loss" in r for r in rows)  # the callback logged into the same run
