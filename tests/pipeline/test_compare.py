"""``obim-merge-ckpts`` with several methods, total shares and evaluation: merges and one table."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from obim_trainer.cli import main
from obim_trainer.evaluation import PerLanguageEvaluator, load_eval_sets
from obim_trainer.evaluation.comparison import Objective, _fmt, evaluate_folders
from obim_trainer.pipeline.compare import merge_evaluate_pick
from obim_trainer.pipeline.variants import MergeSpec, plan_variants
from obim_trainer.settings.merge import MergeConfig
from tests.conftest import make_texts, write_jsonl


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return {x: write_jsonl(root / f"{x}.jsonl", make_texts(6, seed=s, max_words=12)) for x, s in (("en", 5), ("zh", 6))}


def inputs(llama_family, calibration_jsonl) -> list[str]:
    base, ckpts = llama_family
    return ["--base", str(base), "--checkpoints", *map(str, ckpts), "--calibration-data", str(calibration_jsonl)]


def test_methods_and_shares_merge_and_evaluate_in_one_call(
    llama_family, calibration_jsonl, eval_files, tokenizer_dir, tmp_path, capsys
):
    _, ckpts = llama_family
    out = tmp_path / "compared"
    flags = ["--method", "obim,ties", "--param", "density=0.5", "--total-share", "1.0,0.5", "--evaluate"]
    flags += ["--eval-data", *(f"{x}={p}" for x, p in eval_files.items()), "--eval-max-length", "24"]
    flags += ["--objective", "old_avg", "--new-language", "zh", "--output", str(out), "--no-progress"]
    assert main([*inputs(llama_family, calibration_jsonl), *flags]) == 0

    table = json.loads((out / "comparison.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert list(rows) == ["base", *(c.name for c in ckpts), "obim", "obim@0.5", "ties"]
    assert {r["kind"] for r in table["rows"]} == {"base", "checkpoint", "merge"}
    assert table["picked"] in {"obim", "obim@0.5", "ties"}
    merges = [r for r in table["rows"] if r["kind"] == "merge"]
    assert table["picked"] == min(merges, key=lambda r: r["metrics"]["obim_en_loss"])["name"]  # the only old language
    assert json.loads((out / "ties" / "obim_merge.json").read_text())["method"]["density"] == 0.5
    evaluator = PerLanguageEvaluator(
        load_eval_sets(eval_files, AutoTokenizer.from_pretrained(tokenizer_dir), max_length=24)
    )
    for name in ("base", "obim@0.5"):
        assert rows[name]["metrics"] == evaluator.evaluate_folder(rows[name]["path"])
    AutoModelForCausalLM.from_pretrained(out / "obim@0.5")
    printed = capsys.readouterr().out
    assert printed.startswith("| model | kind | en | zh | avg | picked |")
    assert printed.strip() == (out / "comparison.md").read_text(encoding="utf-8").strip()


def test_existing_merges_are_refused_before_anything_is_written(llama_family, calibration_jsonl, tmp_path):
    out = tmp_path / "compared"
    (out / "ties").mkdir(parents=True)
    (out / "ties" / "keep.txt").write_text("earlier output")
    code = main([*inputs(llama_family, calibration_jsonl), "--method", "obim,ties", "--output", str(out)])
    assert code == 2
    assert sorted(p.name for p in out.iterdir()) == ["ties"]
    assert (out / "ties" / "keep.txt").read_text() == "earlier output"


def test_evaluate_without_data_names_the_flag(llama_family, calibration_jsonl, tmp_path, caplog):
    args = [*inputs(llama_family, calibration_jsonl), "--method", "obim,ties", "--evaluate"]
    assert main([*args, "--output", str(tmp_path / "o")]) == 2
    assert "--eval-data" in caplog.text and not (tmp_path / "o").exists()


def test_yaml_lists_methods_and_shares(llama_family, calibration_jsonl, tmp_path):
    import yaml

    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({"method": ["task_arithmetic", "obim"], "total_shares": [0.5]}))
    out = tmp_path / "o"
    assert main([*inputs(llama_family, calibration_jsonl), "--config", str(config), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["obim@0.5", "task_arithmetic"]


def test_lm_eval_tasks_score_the_merges(llama_family, calibration_jsonl, tmp_path):
    pytest.importorskip("lm_eval")
    import yaml

    from obim_trainer.evaluation import LmEvalConfig, LmEvalEvaluator
    from tests.evaluation.test_lm_eval_tasks import questions, write_task

    tasks, data = tmp_path / "tasks", tmp_path / "data"
    tasks.mkdir()
    data.mkdir()
    for task in ("tiny_en_facts", "tiny_zh_a"):
        rows = [{"question": q, "choices": c, "label": i % 3} for i, (q, c) in enumerate(questions(task))]
        write_task(tasks, task, rows, data)
    lm_eval = tmp_path / "lm_eval.yaml"
    settings = {"tasks": {"en": ["tiny_en_facts"], "zh": ["tiny_zh_a"]}, "include_path": str(tasks)}
    lm_eval.write_text(yaml.safe_dump({**settings, "include_defaults": False, "batch_size": 4}))
    out = tmp_path / "o"
    args = [*inputs(llama_family, calibration_jsonl), "--method", "obim,ties", "--lm-eval", str(lm_eval)]
    assert main([*args, "--output", str(out), "--no-progress"]) == 0
    table = json.loads((out / "comparison.json").read_text())
    assert table["columns"] == {"en": "lmeval_en_acc", "zh": "lmeval_zh_acc"} and table["higher_is_better"]
    evaluator = LmEvalEvaluator(LmEvalConfig.from_yaml(lm_eval))
    ties = next(r for r in table["rows"] if r["name"] == "ties")
    assert ties["metrics"] == evaluator.evaluate_folder(out / "ties")
    merges = [r for r in table["rows"] if r["kind"] == "merge"]
    assert table["picked"] == max(merges, key=lambda r: (r["avg"], -merges.index(r)))["name"]


def test_unknown_lm_eval_tasks_fail_before_any_merge(llama_family, calibration_jsonl, tmp_path, caplog):
    pytest.importorskip("lm_eval")
    import yaml

    lm_eval = tmp_path / "lm_eval.yaml"
    settings = {"tasks": {"en": ["no_such_task_xyz"]}, "include_defaults": False, "include_path": str(tmp_path)}
    lm_eval.write_text(yaml.safe_dump(settings))
    args = [*inputs(llama_family, calibration_jsonl), "--method", "obim,ties", "--lm-eval", str(lm_eval)]
    assert main([*args, "--output", str(tmp_path / "o")]) == 2
    assert "no_such_task_xyz" in caplog.text and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra",
    [["--evaluate"], ["--total-share", "1.0,0.5"], ["--total-share", "1.0,0.5", "--dry-run"]],
    ids=["one-merge", "comparison", "dry-run"],
)
def test_a_wrong_eval_file_fails_before_any_merge_writes(
    extra, llama_family, calibration_jsonl, eval_files, tmp_path, caplog
):
    out = tmp_path / "out"
    eval_data = ["--eval-data", f"en={eval_files['en']}", f"zh={tmp_path / 'typo.jsonl'}"]
    flags = [*inputs(llama_family, calibration_jsonl), *eval_data, *extra]
    assert main([*flags, "--output", str(out), "--no-progress"]) == 2
    typo = tmp_path / "typo.jsonl"
    assert f"--eval-data zh={typo}: eval file {typo} does not exist; set --eval-data LANG=FILE to" in caplog.text
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_comparison_dry_run_plans_and_checks_every_merge_once(llama_family, calibration_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    flags = [*inputs(llama_family, calibration_jsonl), "--output", str(out), "--dry-run", "--no-progress"]
    assert main([*flags, "--method", "obim,ties", "--total-share", "1.0,0.5"]) == 0
    plan = capsys.readouterr().out
    assert "3 merge(s) of the same checkpoints:" in plan
    assert [plan.count(f"# {name}\n") for name in ("obim", "obim@0.5", "ties")] == [1, 1, 1]
    assert plan.count("lm_head.weight") == 3  # each merge's tensor plan, printed once
    assert main([*flags, "--total-share", "1.0,1.5"]) == 2  # every variant is validated, not only the first
    assert not out.exists()


def test_one_merge_with_evaluate_prints_its_losses(llama_family, calibration_jsonl, eval_files, tmp_path, capsys):
    out = tmp_path / "out"
    flags = [*inputs(llama_family, calibration_jsonl), "--eval-data", f"en={eval_files['en']}", "--evaluate"]
    assert main([*flags, "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    loss = next(r for r in rows if r["name"] == "obim")["metrics"]["obim_en_loss"]
    assert next(line for line in printed.splitlines() if line.startswith("| obim |")).startswith(
        f"| obim | merge | {_fmt(loss)} |"
    )


def test_merge_evaluate_pick_merges_each_batch_with_its_settings_and_returns_the_results(
    llama_family, calibration_jsonl, eval_files, tokenizer_dir, tmp_path
):
    """The one pipeline the command, the callback and the demo share: batches with their own settings (the
    demo's per-entry calibration samples), one evaluation of every merge, the objective's pick."""
    base, ckpts = llama_family
    config = MergeConfig.build(
        {
            "base": base,
            "checkpoints": ckpts,
            "calibration_data": calibration_jsonl,
            "output": tmp_path,
            "progress": False,
        }
    )
    fewer = config.model_copy(update={"calibration_samples": 8})
    batches = [(config, plan_variants(["obim"], {}, None, 3)), (fewer, MergeSpec(method="obim", label="few").plan(3))]
    evaluator = PerLanguageEvaluator(
        load_eval_sets(eval_files, AutoTokenizer.from_pretrained(tokenizer_dir), max_length=24)
    )

    def evaluate(folders):
        return evaluate_folders({name: (path, "merge") for name, path in folders.items()}, evaluator, progress=False)

    made = merge_evaluate_pick(batches, tmp_path / "merges", evaluate=evaluate, objective=Objective())
    assert list(made.folders) == list(made.results) == ["obim", "few"]
    assert all(made.results[n].output == made.folders[n] == tmp_path / "merges" / n for n in made.folders)
    samples = [made.results[n].manifest["calibration"]["samples"] for n in ("obim", "few")]
    assert samples == [40, 8]  # each batch merged with its own settings
    assert made.best is not None and made.table.picked == made.best.name
    assert made.best.name == min(made.table.rows, key=made.table.average).name
    assert made.results["obim"].report.owned  # the engine's own report comes back with each merge
