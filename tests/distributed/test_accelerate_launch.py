"""examples/continued_pretraining.py under ``accelerate launch`` with two data-parallel CPU processes.

Every rank runs the callback; only one may protect, merge and record. With two "rank 0"s every
step's work would show twice in the log and the merged folders would be written twice.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.callback_run import build_inputs, eval_history, example_config
from tests.launch import run_env, run_on_free_port

pytestmark = pytest.mark.slow  # two processes train, evaluate and merge

TIMEOUT_S = 300


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    work = tmp_path_factory.mktemp("accelerate")
    inputs = build_inputs(work / "inputs")
    output = work / "run"
    training = {"max_steps": 6, "per_device_train_batch_size": 2, "report_to": "none"}
    config = example_config(inputs, output, work, training, {"merge_every_saves": 2, "keep_merged": 2})
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    script = ["examples/continued_pretraining.py", "--config", str(config)]
    status, log = run_on_free_port(
        lambda port: [*launcher, "--main_process_port", str(port), *script], run_env(), TIMEOUT_S, work / "launch.log"
    )
    assert status == 0, log
    return output, (work / "launch.log").read_text()  # the whole log, not the tail


def test_both_processes_trained_together(launched):
    _, log = launched
    trained = re.findall(r"training \S+ in (\d+) process\(es\)", log)
    assert trained == ["2"], trained  # the main process saw a process group of two, and only it logged


def test_each_step_is_recorded_protected_and_merged_once(launched):
    output, log = launched
    record = json.loads((output / "obim" / "candidates.json").read_text())
    assert [c["step"] for c in record["candidates"]] == [2, 4, 6]
    protected = re.findall(r"protected (checkpoint-\d+) from checkpoint rotation", log)
    assert len(protected) == len(set(protected))
    merges = re.findall(r"merged checkpoints \[[\d, ]+\] into \S+", log)
    assert [m.rsplit("/", 1)[1] for m in merges] == ["merged-step-4", "merged-step-6"]
    assert sorted(p.name for p in (output / "obim").glob("merged-step-*")) == ["merged-step-4", "merged-step-6"]


def test_the_merges_are_evaluated_by_the_trainer_and_ddp_does_not_search_for_unused_parameters(launched):
    _, log = launched
    losses = re.findall(r"merged checkpoints \[[\d, ]+\] into \S+ \(eval_en_loss [\d.]+, eval_ja_loss [\d.]+\)", log)
    assert len(losses) == 2, log
    assert "find_unused_parameters" not in log  # the example config sets ddp_find_unused_parameters: false


def test_the_selection_is_the_best_two_by_the_trainers_metric(launched):
    output, _ = launched
    history = eval_history(output, "eval_ja_loss")
    best = sorted(history, key=lambda step: (history[step], -step))[:2]
    record = json.loads((output / "obim" / "candidates.json").read_text())
    assert record["selected"] == best
    assert record["merged"][-1]["checkpoints"] == best
    assert sorted(p.name for p in (output / "obim" / "selected").iterdir()) == sorted(f"checkpoint-{s}" for s in best)
    assert (output / "model.safetensors").is_file()  # the example saves the final model too
