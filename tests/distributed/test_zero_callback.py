"""The callback in real two-process DeepSpeed ZeRO-3 and ZeRO-2 runs on CPU (gloo), checked against one-process tools.

DeepSpeed is told not to gather 16-bit weights at save time, so every checkpoint's weights are
written by the callback one module at a time; the run merges once, at the end, and loads the
merge back into the partitioned live model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from obim_trainer.cli import main as merge_cli
from obim_trainer.settings.callback import OBIMConfig
from tests.callback_run import (
    CANDIDATES,
    MAX_LENGTH,
    assert_recorded_stats_are_the_offline_ones,
    build_inputs,
    callback_settings,
    eval_history,
    per_language_settings,
    tensor_digests,
)
from tests.launch import run_env, run_on_free_port, torchrun

pytestmark = pytest.mark.slow  # two processes

pytest.importorskip("deepspeed")
ROOT = Path(__file__).parents[2]
TIMEOUT_S = 300
RUN_SCRIPT = ROOT / "tests/distributed/zero_callback_run.py"


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("zero3")
    inputs = build_inputs(work / "inputs")
    output, result = work / "run", work / "result.json"
    script = [str(RUN_SCRIPT), str(inputs.root), str(output), str(result), "3"]
    env, log_file = run_env(DS_ACCELERATOR="cpu"), work / "launch.log"
    status, log = run_on_free_port(lambda port: [*torchrun(2, port), *script], env, TIMEOUT_S, log_file)
    assert status == 0, log
    return inputs, output, json.loads(result.read_text())


def test_the_run_ends_with_one_merge_loaded_into_the_partitioned_model(zero3_run):
    _, output, result = zero3_run
    assert result["world_size"] == 2 and result["partitioned"]
    assert sorted(p.name for p in (output / "obim").glob("merged-step-*")) == ["merged-step-6"]
    assert result["latest_merge"] == str(output / "obim" / "merged-step-6")
    assert result["live_equals_merged"]


def test_the_merge_is_evaluated_by_the_trainer_and_the_trained_weights_come_back(zero3_run):
    _, _, result = zero3_run
    assert result["restored_after_merge_evaluation"] == [True]
    metrics = result["merged_metrics"]
    assert metrics["eval_ja_loss"] > 0 and metrics["eval_en_loss"] > 0  # beside the evaluator's obim_* ones
    assert metrics["obim_ja_loss"] > 0


def test_the_log_has_no_warning_the_user_cannot_act_on(zero3_run):
    _, output, _ = zero3_run
    log = (output.parent / "launch.log").read_text()
    assert "zero_to_fp32" not in log  # the callback wrote every checkpoint's weights
    assert "FutureWarning" not in log  # torch deprecations met inside DeepSpeed


def test_selection_follows_the_trainers_metric(zero3_run):
    _, output, result = zero3_run
    history = eval_history(output, "eval_ja_loss")
    best = sorted(history, key=lambda step: (history[step], -step))[:2]
    assert result["selected"] == [str(output / "obim" / "selected" / f"checkpoint-{s}") for s in best]


def test_consolidated_checkpoints_equal_deepspeeds_own_reconstruction(zero3_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    _, output, _ = zero3_run
    last = output / "checkpoint-6"
    reference = get_fp32_state_dict_from_zero_checkpoint(str(last))
    written = load_file(last / "model.safetensors")
    assert set(written) == set(reference)
    assert all(torch.equal(written[k], reference[k]) for k in reference)


def test_the_merge_is_identical_to_obim_merge_ckpts_in_one_process(zero3_run, tmp_path):
    inputs, output, result = zero3_run
    offline = tmp_path / "offline"
    argv = ["--base", str(inputs.base), "--checkpoints", *result["selected"], "--output", str(offline)]
    argv += ["--calibration-data", str(inputs.calibration), "--calibration-max-length", str(MAX_LENGTH)]
    assert merge_cli([*argv, "--calibration-batch-size", "4", "--no-progress"]) == 0
    manifest = json.loads((offline / "obim_merge.json").read_text())
    assert [s["source"] for s in manifest["statistics"]] == ["cached", "cached"]  # no extra pass
    ours, theirs = (
        load_file(Path(result["latest_merge"]) / "model.safetensors"),
        load_file(offline / "model.safetensors"),
    )
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    final = load_file(output / "checkpoint-6" / "model.safetensors")
    assert not all(torch.equal(ours[k], final[k]) for k in final)  # the merge is not just the last checkpoint
    made = json.loads((Path(result["latest_merge"]) / "obim_merge.json").read_text())
    assert made["output"]["workers"] == 2, "each rank merged its share of the tensors"


def test_statistics_of_the_two_ranks_equal_one_process_statistics(zero3_run, tmp_path):
    inputs, _, result = zero3_run
    config = OBIMConfig.build(callback_settings(inputs)).merge_config([Path(result["selected"][0])], tmp_path / "x")
    assert_recorded_stats_are_the_offline_ones(Path(result["selected"][0]), config, tmp_path)


def test_under_zero2_the_merge_is_made_and_loaded_back(tmp_path):
    """ZeRO-2 shards optimizer state only: the Trainer saves whole weights and the merge loads back on every rank."""
    inputs = build_inputs(tmp_path / "inputs")
    output, result_file = tmp_path / "run", tmp_path / "result.json"
    script = [str(RUN_SCRIPT), str(inputs.root), str(output), str(result_file), "2"]
    env, log_file = run_env(DS_ACCELERATOR="cpu"), tmp_path / "launch.log"
    status, log = run_on_free_port(lambda port: [*torchrun(2, port), *script], env, TIMEOUT_S, log_file)
    assert status == 0, log
    result = json.loads(result_file.read_text())
    assert result["world_size"] == 2 and not result["partitioned"]
    assert result["latest_merge"] == str(output / "obim" / "merged-step-6")
    assert result["live_equals_merged"]
    assert result["restored_after_merge_evaluation"] == [True]
    history = eval_history(output, "eval_ja_loss")
    best = sorted(history, key=lambda step: (history[step], -step))[:2]
    assert result["selected"] == [str(output / "obim" / "selected" / f"checkpoint-{s}") for s in best]


@pytest.mark.parametrize("stage", ["ddp", "3"])
def test_the_kept_candidate_equals_the_command_s_merge(stage, tmp_path):
    """Two ranks compare regmean and fisher_merging (per-language calibration); the merge kept and
    loaded back is, byte for byte, what obim-merge-ckpts makes in one process from the same checkpoints."""
    inputs = build_inputs(tmp_path / "inputs")
    settings = per_language_settings(inputs)  # writes the old-language calibration file the run reads
    output, result_file = tmp_path / "run", tmp_path / "result.json"
    script = [str(RUN_SCRIPT), str(inputs.root), str(output), str(result_file), stage, "candidates"]
    env, log_file = run_env(DS_ACCELERATOR="cpu"), tmp_path / "launch.log"
    status, log = run_on_free_port(lambda port: [*torchrun(2, port), *script], env, TIMEOUT_S, log_file)
    assert status == 0, log
    result = json.loads(result_file.read_text())
    assert result["world_size"] == 2 and result["live_equals_merged"]
    variant = next(
        v
        for v in OBIMConfig.build({**settings, "merges": CANDIDATES}).plan_candidates(2)
        if v.name == result["variant"]
    )
    calibration = [f"{lang}={path}" for lang, path in settings["calibration_data"].items()]
    argv = ["--base", str(inputs.base), "--checkpoints", *result["selected"], "--output", str(tmp_path / "offline")]
    argv += ["--calibration-data", *calibration, "--new-language", "ja", "--method", variant.method]
    argv += [f"--param={key}={value}" for key, value in variant.params.items()]
    argv += ["--calibration-max-length", str(MAX_LENGTH), "--calibration-batch-size", "4", "--no-progress"]
    assert merge_cli(argv) == 0
    assert tensor_digests(Path(result["latest_merge"])) == tensor_digests(tmp_path / "offline")
