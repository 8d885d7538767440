"""The lm-eval-harness adapter on a tiny Llama and on multiple-choice tasks written here from local JSON.

The answer keys are built from the model's own log-likelihoods of the choices, computed here with a
plain forward pass: for a chosen set of questions the gold answer is the choice the model prefers,
for the others one it does not. The accuracy lm-eval reports must then be exactly the designed share
of each task's first ``limit`` questions — which fails if lm-eval scored other prompts, read other
tasks, ignored ``limit``, or the adapter put a score under the wrong language or name.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from obim_trainer.errors import ConfigError
from obim_trainer.evaluation import LmEvalConfig, LmEvalEvaluator, ModelEvaluator
from obim_trainer.evaluation.comparison import ComparisonTable, evaluate_folders
from tests.conftest import WORDS, make_tiny_llama, save_model_folder

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (pip install 'obim-trainer[eval]')"
)

REPO = Path(__file__).parents[2]
LIMIT = 6
ZH_WORDS = ["中文", "英语", "日语", "模型", "合并", "语言", "知识", "训练", "检查点"]
# Per task: whether the gold answer of each question is the choice the model prefers. The
# questions past LIMIT are right, so an ignored limit changes every accuracy.
RIGHT = {
    "tiny_en_facts": [1, 1, 1, 0, 0, 0, 1, 1],
    "tiny_en_words": [1, 0, 0, 0, 0, 0, 1, 1],
    "tiny_zh_a": [1, 1, 1, 1, 0, 0, 1, 1],
    "tiny_zh_b": [1, 1, 0, 0, 0, 0, 1, 1],
}


def expected_accuracy(task: str) -> float:
    return sum(RIGHT[task][:LIMIT]) / LIMIT


def questions(task: str) -> list[tuple[str, list[str]]]:
    """Eight (question, three choices) per task, English or Chinese."""
    n = len(RIGHT[task])
    if task.startswith("tiny_zh"):
        offset = 0 if task.endswith("a") else 4
        return [
            (f"第{i + offset}题：模型学到了什么？", [ZH_WORDS[(i + j) % len(ZH_WORDS)] for j in range(0, 9, 3)])
            for i in range(n)
        ]
    offset = 0 if task.endswith("facts") else 20
    return [
        (
            f"question {i}: what does the {WORDS[i + offset]} model learn",
            [WORDS[(i + offset + j) % len(WORDS)] for j in range(1, 30, 10)],
        )
        for i in range(n)
    ]


def choice_loglikelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Summed log-probability of " <choice>" after the context, one unpadded forward pass per choice."""
    n_context = len(tokenizer(context).input_ids)
    scores = []
    with torch.no_grad():
        for choice in choices:
            ids = tokenizer(context + " " + choice).input_ids
            logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
            scores.append(sum(float(logp[t - 1, ids[t]]) for t in range(n_context, len(ids))))
    return scores


def write_task(folder: Path, task: str, rows: list[dict], data_dir: Path, **extra) -> None:
    data = data_dir / f"{task}.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    config = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(data_dir / "cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        **extra,
    }
    (folder / f"{task}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return save_model_folder(make_tiny_llama(seed=3), tmp_path_factory.mktemp("lmeval_model") / "tiny", tokenizer_dir)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, model_dir) -> Path:
    """Two English tasks (one also tagged) and a Chinese group of two tasks, answer keys from the model."""
    root = tmp_path_factory.mktemp("lmeval_tasks")
    folder, data_dir = root / "tasks", root / "data"
    folder.mkdir()
    data_dir.mkdir()
    model = make_tiny_llama(seed=3).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for task, right in RIGHT.items():
        rows = []
        for (question, choices), model_right in zip(questions(task), right, strict=True):
            scores = choice_loglikelihoods(model, tokenizer, question, choices)
            ranked = sorted(range(len(choices)), key=scores.__getitem__, reverse=True)
            assert scores[ranked[0]] - scores[ranked[1]] > 1e-3, "near tie: the designed accuracy would be fragile"
            rows.append({"question": question, "choices": choices, "label": ranked[0] if model_right else ranked[-1]})
        write_task(folder, task, rows, data_dir, **({"tag": "tiny_en_tag"} if task == "tiny_en_words" else {}))
    group = {
        "group": "tiny_zh",
        "task": ["tiny_zh_a", "tiny_zh_b"],
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
    }
    (folder / "tiny_zh.yaml").write_text(yaml.safe_dump(group), encoding="utf-8")
    return folder


def tiny_config(task_dir: Path, **overrides) -> LmEvalConfig:
    values = {
        "tasks": {"en": ["tiny_en_facts", "tiny_en_words"], "zh": ["tiny_zh"]},
        "limit": LIMIT,
        "batch_size": 4,
        "include_path": task_dir,
        "include_defaults": False,
        **overrides,
    }
    return LmEvalConfig.build(values)


@pytest.fixture(scope="module")
def table(task_dir, model_dir) -> ComparisonTable:
    """The tiny model evaluated once, through the same call the comparison tables use."""
    evaluator = LmEvalEvaluator(tiny_config(task_dir))
    assert isinstance(evaluator, ModelEvaluator)
    return evaluate_folders({"tiny": (model_dir, "base")}, evaluator, progress=False)


@needs_lm_eval
def test_accuracy_is_the_share_the_answer_keys_were_built_for(table):
    metrics = table.rows[0].metrics
    assert metrics["lmeval_en_tiny_en_facts_acc"] == pytest.approx(expected_accuracy("tiny_en_facts"), abs=1e-12)
    assert metrics["lmeval_en_tiny_en_words_acc"] == pytest.approx(expected_accuracy("tiny_en_words"), abs=1e-12)
    # the group's aggregate weighs its tasks by size (equal here)
    zh = (expected_accuracy("tiny_zh_a") + expected_accuracy("tiny_zh_b")) / 2
    assert metrics["lmeval_zh_tiny_zh_acc"] == pytest.approx(zh, abs=1e-12)


@needs_lm_eval
def test_names_language_means_and_table_columns_are_as_documented(table):
    metrics = table.rows[0].metrics
    assert list(metrics) == [
        "lmeval_en_tiny_en_facts_acc",
        "lmeval_en_tiny_en_words_acc",
        "lmeval_en_acc",
        "lmeval_zh_tiny_zh_acc",
        "lmeval_zh_acc",
    ]
    assert all(type(v) is float and math.isfinite(v) for v in metrics.values())
    en_tasks = (metrics["lmeval_en_tiny_en_facts_acc"] + metrics["lmeval_en_tiny_en_words_acc"]) / 2
    assert metrics["lmeval_en_acc"] == pytest.approx(en_tasks, abs=1e-12)
    assert metrics["lmeval_zh_acc"] == metrics["lmeval_zh_tiny_zh_acc"]
    assert table.columns == {"en": "lmeval_en_acc", "zh": "lmeval_zh_acc"}
    assert table.higher_is_better
    assert table.average(table.rows[0]) == pytest.approx((en_tasks + metrics["lmeval_zh_acc"]) / 2, abs=1e-12)


@needs_lm_eval
def test_an_unknown_task_names_itself_its_language_and_where_it_was_looked_for(task_dir):
    with pytest.raises(ConfigError) as err:
        LmEvalEvaluator(tiny_config(task_dir, tasks={"en": ["tiny_en_facts"], "zh": ["tiny_zh_c"]}))
    message = str(err.value)
    assert "tasks['zh']" in message and "'tiny_zh_c'" in message
    assert f"include_path {task_dir}" in message
    assert "did you mean" in message and "tiny_zh_a" in message


@needs_lm_eval
def test_a_tag_is_refused_because_it_has_no_score_of_its_own(task_dir):
    with pytest.raises(ConfigError, match="'tiny_en_tag' is an lm-eval tag"):
        LmEvalEvaluator(tiny_config(task_dir, tasks={"en": ["tiny_en_tag"]}))


@needs_lm_eval
def test_a_metric_the_task_does_not_report_is_named_with_what_it_does_report(task_dir, model_dir):
    evaluator = LmEvalEvaluator(
        tiny_config(task_dir, tasks={"en": ["tiny_en_facts"]}, task_metrics={"tiny_en_facts": "f1"}, limit=2)
    )
    with pytest.raises(ConfigError, match=r"no 'f1' for 'tiny_en_facts' \(it reported: acc,none\)"):
        evaluator.evaluate_folder(model_dir)


@needs_lm_eval
@pytest.mark.slow
def test_the_example_config_names_tasks_lm_eval_knows():
    """Builds the index of lm-eval's own tasks (no data is downloaded), as a user's run would."""
    config = LmEvalConfig.from_yaml(REPO / "configs" / "eval" / "lm_eval_example.yaml")
    evaluator = LmEvalEvaluator(config)
    assert evaluator.languages == ["en", "zh", "ja"]
    assert evaluator.language_metric("ja") == "lmeval_ja_acc"


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"tasks": {}}, "tasks is empty"),
        ({"tasks": {"en": []}}, "tasks['en'] is empty"),
        ({"tasks": {"en": ["xnli_en"], "de": ["xnli_en"]}}, "listed twice"),
        ({"tasks": {"en": ["mmlu"]}, "task_metrics": {"gsm8k": "exact_match"}}, "not in tasks"),
        ({"tasks": {"en": ["mmlu"]}, "include_defaults": False}, "no task would be known"),
        ({"tasks": {"en": ["mmlu"]}, "limit": 0}, "limit"),
        ({"tasks": {"en": ["mmlu"]}, "num_shots": 5}, "num_shots"),
    ],
)
def test_bad_configurations_are_one_config_error(values, complaint):
    with pytest.raises(ConfigError, match="invalid lm-eval configuration") as err:
        LmEvalConfig.build(values)
    assert complaint in str(err.value)


def test_without_lm_eval_the_error_says_how_to_install(tmp_path):
    """A real environment without lm-eval: every installed package but lm-eval, linked into one folder."""
    site = tmp_path / "site-packages"
    site.mkdir()
    for lib in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in Path(lib).iterdir():
            if not entry.name.startswith("lm_eval") and not (site / entry.name).exists():
                (site / entry.name).symlink_to(entry)
    code = (
        "from obim_trainer.errors import ConfigError\n"
        "from obim_trainer.evaluation import LmEvalEvaluator\n"
        "try:\n    LmEvalEvaluator({'tasks': {'en': ['mmlu']}})\n"
        "except ConfigError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}
    # -S: no site-packages but the linked folder
    run = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "pip install 'obim-trainer[eval]'" in run.stdout
