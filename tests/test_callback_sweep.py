"""OBIMCallback with ``total_share_sweep``: merges at each total share, keeps the objective's pick."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from obim_trainer.callback import OBIMCallback
from obim_trainer.callback_config import OBIMConfig
from obim_trainer.errors import ConfigError
from obim_trainer.evaluation import PerLanguageEvaluator, load_eval_sets
from obim_trainer.merge import merge_checkpoints
from tests.callback_run import MAX_LENGTH, build_inputs, callback_settings, make_trainer
from tests.tiny_training import training_arguments
from tests.tracking.wandb_offline import fresh_wandb, history, run_dir, table

SHARES = [1.0, 0.5]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("sweep")
    inputs = build_inputs(work / "inputs")
    settings = callback_settings(inputs, total_share_sweep=SHARES, merge_every_saves=0, log_saliency=False)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(work))
        env.setenv("WANDB_SILENT", "true")
        fresh_wandb()
        callback = OBIMCallback(OBIMConfig.build(settings))
        make_trainer(inputs, training_arguments(work / "run", report_to="wandb"), [callback]).train()
        import wandb

        wandb.finish()
    return inputs, work, callback


def offline_merges(inputs, callback, tmp_path):
    """The same sweep made with obim-merge-ckpts' engine, evaluated by an evaluator built here."""
    chosen = [callback.candidates[s].merge_path for s in callback.selected]
    tokenizer = AutoTokenizer.from_pretrained(inputs.tokenizer)
    evaluator = PerLanguageEvaluator(load_eval_sets(callback.config.eval_data, tokenizer, max_length=MAX_LENGTH))
    results = {}
    for share in SHARES:
        folder = tmp_path / f"share-{share}"
        ratios = [share / len(chosen)] * len(chosen)
        merge_checkpoints(
            base=inputs.base,
            checkpoints=chosen,
            calibration_data=inputs.calibration,
            calibration_max_length=MAX_LENGTH,
            calibration_batch_size=4,
            params={"ratios": ratios},
            output=folder,
            progress=False,
        )
        metrics = evaluator.evaluate_folder(folder)
        results[share] = (folder, (metrics["obim_en_loss"] + metrics["obim_ja_loss"]) / 2, metrics)
    return results


def test_the_kept_merge_is_the_best_average_of_the_sweep(sweep_run, tmp_path):
    inputs, work, callback = sweep_run
    results = offline_merges(inputs, callback, tmp_path)
    best_share = min(results, key=lambda s: results[s][1])
    merged = callback.merged[-1]
    assert merged.total_share == best_share and merged.path == work / "run" / "obim" / "merged-step-8"
    assert merged.metrics == pytest.approx(results[best_share][2])
    ours, theirs = load_file(merged.path / "model.safetensors"), load_file(results[best_share][0] / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert not (work / "run" / "obim" / "sweep-step-8").exists()  # keep_sweep is off


def test_wandb_has_the_sweep_table(sweep_run):
    _, work, callback = sweep_run
    run = run_dir(work)
    (row,) = [r for r in history(run) if "obim/sweep/path" in r]
    assert row["train/global_step"] == 8
    logged = table(run, "obim/sweep", row)
    assert logged["columns"] == ["merge", "obim_en_loss", "obim_ja_loss", "avg", "picked"]
    by_name = {r[0]: r for r in logged["data"]}
    assert sorted(by_name) == ["obim", "obim@0.5"]
    picked = "obim" if callback.merged[-1].total_share == 1.0 else "obim@0.5"
    assert [n for n, r in by_name.items() if r[-1]] == [picked]
    assert by_name[picked][1] == pytest.approx(callback.merged[-1].metrics["obim_en_loss"])


def test_a_sweep_needs_evaluation_data_and_shares(tmp_path):
    inputs = build_inputs(tmp_path / "inputs")
    with pytest.raises(ConfigError, match="eval_data"):
        OBIMConfig.build(callback_settings(inputs, total_share_sweep=SHARES, eval_data=None))
    with pytest.raises(ConfigError, match="needs a method with shares"):
        OBIMConfig.build(callback_settings(inputs, total_share_sweep=SHARES, method="ties"))
