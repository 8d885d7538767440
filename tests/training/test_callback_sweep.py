"""OBIMCallback with ``total_share_sweep``: merges at each total share, keeps the objective's pick."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from obim_trainer.errors import ConfigError
from obim_trainer.evaluation import PerLanguageEvaluator, load_eval_sets
from obim_trainer.pipeline.merge import merge_checkpoints
from obim_trainer.settings.callback import OBIMConfig
from obim_trainer.training.callback import OBIMCallback, training_untouched
from tests.callback_run import (
    CANDIDATES,
    MAX_LENGTH,
    build_inputs,
    callback_settings,
    make_trainer,
    per_language_settings,
    tensor_digests,
)
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


# ---- any list of candidates (merges:), per-language calibration, the default path ----


@pytest.fixture(scope="module")
def candidates_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("candidates")
    inputs = build_inputs(work / "inputs")
    callback = OBIMCallback(
        OBIMConfig.build(per_language_settings(inputs, merges=CANDIDATES, keep_sweep=True, merge_every_saves=2))
    )
    trainer = make_trainer(inputs, training_arguments(work / "run"), [callback], model=dropout_model(inputs))
    trainer.train()
    return inputs, work, callback, trainer


def dropout_model(inputs):
    """The base with attention dropout: training draws from torch's generator, so any draw the callback
    made from it would change the trained weights."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(inputs.base, attention_dropout=0.3)


def test_the_kept_candidate_is_the_command_s_merge_byte_for_byte(candidates_run, tmp_path):
    inputs, work, callback, _ = candidates_run
    merged = callback.merged[-1]
    sweep = work / "run" / "obim" / f"sweep-step-{merged.step}"
    others = [p.name for p in sweep.iterdir() if p.is_dir()]  # the pick was moved to merged-step-N
    assert sorted([*others, merged.variant]) == ["fisher_merging", "regmean@base_weight=0.3", "regmean@base_weight=3"]
    table = json.loads((sweep / "comparison.json").read_text())
    assert table["picked"] == merged.variant == min(table["rows"], key=lambda r: r["avg"])["name"]
    variant = next(v for v in callback.config.plan_candidates(2) if v.name == merged.variant)
    settings = per_language_settings(inputs)
    offline = merge_checkpoints(
        base=inputs.base,
        checkpoints=[callback.candidates[s].merge_path for s in callback.selected],
        calibration_data=settings["calibration_data"],
        new_languages=["ja"],
        calibration_max_length=MAX_LENGTH,
        calibration_batch_size=4,
        method=variant.method,
        params=variant.params,
        output=tmp_path / "offline",
        stats_cache_dir=tmp_path / "cache",
        recompute_stats=True,
        progress=False,
    )
    assert offline is not None
    assert tensor_digests(merged.path) == tensor_digests(tmp_path / "offline")


def test_merging_candidates_leaves_training_bit_identical(candidates_run, tmp_path):
    inputs, _, callback, trainer = candidates_run
    assert callback.merged[0].step < trainer.state.global_step  # the callback merged during the run
    plain = make_trainer(inputs, training_arguments(tmp_path / "plain"), [], model=dropout_model(inputs))
    plain.train()
    ours, theirs = trainer.model.state_dict(), plain.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    losses = [[e.get("loss"), e.get("eval_ja_loss")] for e in trainer.state.log_history]
    assert losses == [[e.get("loss"), e.get("eval_ja_loss")] for e in plain.state.log_history]


def test_a_new_language_compares_the_default_candidates(tmp_path):
    inputs = build_inputs(tmp_path / "inputs")
    config = OBIMConfig.build(per_language_settings(inputs))
    assert [v.name for v in config.plan_candidates(2)] == [
        "obim",
        "regmean@base_weight=0.3",
        "regmean@base_weight=1",
        "regmean@base_weight=3",
    ]
    tied = OBIMConfig.build(per_language_settings(inputs, params={"saliency": "forgetting_aware"}))
    assert [v.name for v in tied.plan_candidates(2)][-1] == "obim-configured"
    assert OBIMConfig.build(per_language_settings(inputs, eval_data=None)).plan_candidates(2) is None
    assert OBIMConfig.build(callback_settings(inputs)).plan_candidates(2) is None  # no new language: one merge


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"new_languages": ["fr"]}, "names 'fr'"),
        ({"new_languages": ["en", "ja"]}, "measures the base on old-language text"),
        ({"merges": [{"method": "regmean", "params": {"base_weight": 0}}]}, "base_weight"),
        ({"merges": [{"method": "fisher_merging", "sweep": {"base_weight": [1, -1]}}]}, "base_weight"),
        ({"merges": [{"method": "regmean", "params": {"alpha": 1.5}}]}, "alpha"),
        ({"merges": [{"method": "obim", "params": {"saliency": "forgetting_aware", "gamma": -1}}]}, "gamma"),
        ({"merges": [{"method": "regmean"}], "eval_data": None}, "eval_data"),
    ],
)
def test_bad_candidates_fail_when_the_callback_is_configured(tmp_path, overrides, message):
    inputs = build_inputs(tmp_path / "inputs")
    with pytest.raises(ConfigError, match=message):
        OBIMConfig.build(per_language_settings(inputs, **overrides))


def test_the_callback_s_work_draws_nothing_from_training_s_generators():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    model[1].eval()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    with training_untouched(model):
        torch.rand(5), np.random.rand(5), random.random()
        model.eval()
    assert torch.equal(torch.rand(3), expected[0]) and (np.random.rand(3) == expected[1]).all()
    assert random.random() == expected[2]
    assert model.training and model[0].training and not model[1].training


def test_the_command_compares_the_callback_s_default_candidates(tmp_path):
    from obim_trainer.cli import build_parser, config_from_args
    from obim_trainer.pipeline.compare import plan

    inputs = build_inputs(tmp_path / "inputs")
    callback = OBIMConfig.build(per_language_settings(inputs))
    new = ["--calibration-data", "en=en.jsonl", "ja=ja.jsonl", "--new-language", "ja", "--eval-data", "ja=e.jsonl"]
    required = ["--base", str(inputs.base), "--checkpoints", "c1", "c2", "--output", "o"]
    config, comparison = config_from_args(build_parser().parse_args([*required, *new]))
    assert [v.name for v in plan(config, comparison, 2)] == [v.name for v in callback.plan_candidates(2)]
    assert [v.params for v in plan(config, comparison, 2)] == [v.params for v in callback.plan_candidates(2)]
    _, named = config_from_args(build_parser().parse_args([*required, *new, "--method", "obim"]))
    assert named.merges is None and named.methods == ["obim"]  # a named method is merged as asked


def test_with_a_new_language_the_default_candidates_pick_and_load_the_best(tmp_path):
    inputs = build_inputs(tmp_path / "inputs")
    settings = per_language_settings(inputs, keep_sweep=True, load_merged_at_end=True)
    callback = OBIMCallback(OBIMConfig.build(settings))
    trainer = make_trainer(inputs, training_arguments(tmp_path / "run", max_steps=4), [callback])
    trainer.train()
    merged = callback.merged[-1]
    table = json.loads((tmp_path / "run" / "obim" / f"sweep-step-{merged.step}" / "comparison.json").read_text())
    names = ["obim", "regmean@base_weight=0.3", "regmean@base_weight=1", "regmean@base_weight=3"]
    assert sorted(r["name"] for r in table["rows"]) == names
    assert table["picked"] == merged.variant == min(table["rows"], key=lambda r: r["avg"])["name"]
    stored = load_file(merged.path / "model.safetensors")
    live = trainer.model.state_dict()
    assert all(torch.equal(live[name], tensor) for name, tensor in stored.items())  # load_merged_at_end
