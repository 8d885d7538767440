"""OBIMCallback in real Trainer runs on a tiny Llama: statistics, selection under save_total_limit,
merges, W&B offline records read back, and runs with W&B disabled or not installed.

The main run saves every 2 of 8 steps with ``save_total_limit=1``, selects the best 2 checkpoints by
the Trainer's ``eval_ja_loss``, merges every 2 saves (steps 4 and 8) and keeps the last merge.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from obim_trainer.calibration import stats_key, stats_path
from obim_trainer.calibration.preparation import prepare_calibration
from obim_trainer.checkpoints import open_checkpoint
from obim_trainer.evaluation import PerLanguageEvaluator, load_eval_sets
from obim_trainer.pipeline.merge import merge_checkpoints
from obim_trainer.settings.callback import OBIMConfig
from obim_trainer.tracking import NullLogger, WandbLogger
from obim_trainer.training.callback import OBIMCallback
from tests.callback_run import (
    LANGUAGE_WORDS,
    MAX_LENGTH,
    RunInputs,
    assert_recorded_stats_are_the_offline_ones,
    build_inputs,
    callback_settings,
    eval_history,
    example_config,
    make_trainer,
)
from tests.launch import run_env, run_isolated
from tests.tiny_training import training_arguments
from tests.tracking.wandb_offline import fresh_wandb, history, run_dir, table

ROOT = Path(__file__).parents[2]
LINEAR_TYPES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj")


@dataclass
class Run:
    inputs: RunInputs
    output: Path
    callback: OBIMCallback
    wandb_run: Path

    def config(self) -> OBIMConfig:
        return self.callback.config

    def best(self, k: int = 2) -> list[int]:
        """The k best steps by the Trainer's own record of eval_ja_loss (ties to the later step)."""
        values = eval_history(self.output, "eval_ja_loss")
        return sorted(values, key=lambda step: (values[step], -step))[:k]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    work = tmp_path_factory.mktemp("callback")
    inputs = build_inputs(work / "inputs")
    wandb_dir = work / "wandb"
    wandb_dir.mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(wandb_dir))
        env.setenv("WANDB_SILENT", "true")
        fresh_wandb()
        callback = OBIMCallback(OBIMConfig.build(callback_settings(inputs, merge_every_saves=2, keep_merged=1)))
        args = training_arguments(work / "run", report_to="wandb", save_total_limit=1)
        make_trainer(inputs, args, [callback]).train()
        import wandb

        wandb.finish()
    return Run(inputs, work / "run", callback, run_dir(wandb_dir))


def test_selection_is_the_top_k_by_the_metric(run):
    assert run.callback.selected == run.best()
    record = json.loads((run.output / "obim" / "candidates.json").read_text())
    assert record["selected"] == run.best()
    assert [c["step"] for c in record["candidates"]] == [2, 4, 6, 8]


def test_selected_checkpoints_survive_save_total_limit(run):
    assert sorted(p.name for p in run.output.glob("checkpoint-*")) == ["checkpoint-8"]  # the Trainer rotated
    kept = run.output / "obim" / "selected"
    assert sorted(p.name for p in kept.iterdir()) == sorted(f"checkpoint-{s}" for s in run.best())
    rotated_away = [s for s in run.best() if not (run.output / f"checkpoint-{s}").exists()]
    assert rotated_away  # a selected checkpoint the Trainer deleted is still there to merge
    for step in rotated_away:
        with open_checkpoint(kept / f"checkpoint-{step}") as reader:
            assert "model.layers.0.mlp.up_proj.weight" in reader.tensor_infos()


def test_checkpoints_get_the_statistics_the_offline_merge_looks_for(run, tmp_path):
    config = run.config().merge_config([run.inputs.base], None)
    calibration = prepare_calibration(config, config.base, config.tokenizer_source)
    for step in run.best():
        folder = run.output / "obim" / "selected" / f"checkpoint-{step}"
        assert_recorded_stats_are_the_offline_ones(folder, config, tmp_path)
    last = run.output / "checkpoint-8"  # the original folder holds them too
    with open_checkpoint(last) as reader:
        assert stats_path(last, stats_key(calibration.fingerprint(), reader.fingerprint())).is_file()


def test_the_merged_folder_appears_loads_and_is_the_offline_merge(run, tmp_path):
    merged = run.output / "obim" / "merged-step-8"
    assert sorted(p.name for p in (run.output / "obim").glob("merged-step-*")) == ["merged-step-8"]  # keep_merged=1
    model = AutoModelForCausalLM.from_pretrained(merged)
    logits = model(input_ids=torch.tensor([[1, 5, 9, 14]])).logits
    assert torch.isfinite(logits).all()

    views = [run.output / "obim" / "selected" / f"checkpoint-{s}" for s in run.best()]
    manifest = json.loads((merged / "obim_merge.json").read_text())
    assert [c["path"] for c in manifest["checkpoints"]] == [str(v.resolve()) for v in views]
    assert [s["source"] for s in manifest["statistics"]] == ["memory", "memory"]  # as measured at the saves
    offline = merge_checkpoints(run.config().merge_config(views, tmp_path / "offline"))
    assert [s["source"] for s in offline.manifest["statistics"]] == ["cached", "cached"]
    ours, theirs = load_file(merged / "model.safetensors"), load_file(tmp_path / "offline" / "model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    tokenizer = AutoTokenizer.from_pretrained(run.inputs.tokenizer)
    sets = load_eval_sets(run.config().eval_data, tokenizer, max_length=MAX_LENGTH)
    metrics = run.callback.merged[-1].metrics
    assert {k: v for k, v in metrics.items() if k.startswith("obim_")} == PerLanguageEvaluator(sets).evaluate_folder(
        merged
    )
    assert {"eval_en_loss", "eval_ja_loss"} <= set(metrics)  # and by the Trainer, as the checkpoints are


def test_wandb_has_per_language_metrics_of_checkpoints_and_merges(run):
    rows = history(run.wandb_run)
    trainer_ja = eval_history(run.output, "eval_ja_loss")
    checkpoint_rows = {r["train/global_step"]: r for r in rows if "obim/checkpoint/eval_ja_loss" in r}
    assert sorted(checkpoint_rows) == [2, 4, 6, 8]
    for step, row in checkpoint_rows.items():
        assert row["obim/checkpoint/eval_ja_loss"] == pytest.approx(trainer_ja[step])
        for language in LANGUAGE_WORDS:
            assert row[f"obim/checkpoint/obim_{language}_loss"] > 0
    merge_rows = {r["train/global_step"]: r for r in rows if "obim/merged/obim_ja_loss" in r}
    assert sorted(merge_rows) == [4, 8]
    assert merge_rows[8]["obim/merged/obim_en_perplexity"] == pytest.approx(
        run.callback.merged[-1].metrics["obim_en_perplexity"]
    )


def test_wandb_has_the_candidates_table(run):
    rows = [r for r in history(run.wandb_run) if "obim/candidates/path" in r]
    assert [r["train/global_step"] for r in rows] == [2, 4, 6, 8]
    last = table(run.wandb_run, "obim/candidates", rows[-1])
    columns = last["columns"]
    assert columns[:3] == ["step", "selected", "merge_rank"] and "eval_ja_loss" in columns
    by_step = {row[0]: dict(zip(columns, row, strict=True)) for row in last["data"]}
    assert sorted(by_step) == [2, 4, 6, 8]
    assert [s for s in sorted(by_step) if by_step[s]["selected"]] == sorted(run.best())
    assert [by_step[s]["merge_rank"] for s in run.best()] == [1, 2]


def test_wandb_has_saliency_histograms_ownership_and_timings(run):
    rows = history(run.wandb_run)
    (summary,) = [r for r in rows if r["train/global_step"] == 8 and any(k.startswith("obim/saliency/") for k in r)]
    labels = [f"ckpt-{s}" for s in run.best()]
    for layer in LINEAR_TYPES:
        for label in labels:
            prefix = f"obim/saliency/{layer}/{label}"
            assert summary[f"{prefix}/_type"] == "histogram"
            assert sum(summary[f"{prefix}/values"]) > 0
            assert len(summary[f"{prefix}/bins"]) == run.config().histogram_bins + 1
        shares = [summary[f"obim/ownership/{layer}/{label}"] for label in labels]
        assert sum(shares) == pytest.approx(1.0) and all(0.3 < s < 0.7 for s in shares)  # n_k = 1/2 each
        assert summary[f"obim/retained/{layer}"] == pytest.approx(1.0)
    timings = {k: v for r in rows if r["train/global_step"] == 8 for k, v in r.items() if k.startswith("obim/time/")}
    assert {"obim/time/statistics_s", "obim/time/merge_s", "obim/time/evaluation_s"} <= set(timings)
    assert all(v >= 0 for v in timings.values()) and timings["obim/time/merge_s"] > 0


def test_the_example_runs_with_wandb_disabled(tmp_path, monkeypatch):
    """examples/continued_pretraining.py with report_to=wandb but WANDB_MODE=disabled: merges, logs nothing."""
    spec = importlib.util.spec_from_file_location("continued_pretraining", ROOT / "examples/continued_pretraining.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    inputs = build_inputs(tmp_path / "inputs")
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    output = tmp_path / "run"
    training = {"max_steps": 4, "per_device_train_batch_size": 4, "report_to": "wandb"}
    config = example_config(inputs, output, tmp_path, training, {"merge_every_saves": 0})
    assert example.main(["--config", str(config)]) == 0
    assert [p.name for p in (output / "obim").glob("merged-step-*")] == ["merged-step-4"]
    assert (output / "model.safetensors").is_file()
    assert not any(wandb_dir.rglob("*"))


NO_WANDB = """
import json, sys
sys.modules["wandb"] = None  # import wandb raises ImportError, as if it were not installed
from pathlib import Path
from obim_trainer.training.callback import OBIMCallback
from obim_trainer.settings.callback import OBIMConfig
from obim_trainer.tracking import make_run_logger
from tests.callback_run import RunInputs, callback_settings, make_trainer
from tests.tiny_training import training_arguments

inputs, output = RunInputs(Path(sys.argv[1])), Path(sys.argv[2])
callback = OBIMCallback(OBIMConfig.build(callback_settings(inputs)))
trainer = make_trainer(inputs, training_arguments(output, max_steps=4, report_to="all"), [callback])
trainer.train()
print("RESULT " + json.dumps({
    "merged": str(callback.latest_merge),
    "logger": type(callback.run_logger).__name__,
    "asked_for_wandb": type(make_run_logger(["wandb"])).__name__,
    "trainer_callbacks": [type(c).__name__ for c in trainer.callback_handler.callbacks],
}))
"""


@pytest.mark.slow
def test_the_callback_without_wandb_installed(tmp_path):
    inputs = build_inputs(tmp_path / "inputs")
    env = run_env(WANDB_DIR=str(tmp_path))
    argv = [sys.executable, "-c", NO_WANDB, str(inputs.root), str(tmp_path / "run")]
    status, log = run_isolated(argv, env, 240, tmp_path / "run.log")
    assert status == 0, log
    result = json.loads(log.split("RESULT ", 1)[1].splitlines()[0])
    assert result["merged"] == str(tmp_path / "run" / "obim" / "merged-step-4")
    assert (tmp_path / "run" / "obim" / "merged-step-4" / "model.safetensors").is_file()
    assert result["logger"] == result["asked_for_wandb"] == NullLogger.__name__
    assert "WandbCallback" not in result["trainer_callbacks"]
    assert not list(tmp_path.glob("wandb"))


def test_the_logger_follows_report_to(run):
    assert isinstance(run.callback.run_logger, WandbLogger)
