"""The callback as the README's user runs it: merges evaluated like the checkpoints (the Trainer's own loss on
its dict ``eval_dataset``, no ``eval_data``), training unchanged by that, a ``select_metric`` the run does not
log stopping the run at its first evaluated save, resuming without losing a checkpoint, and a fresh run into
an output folder that has a record.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from obim_trainer.cli import main as merge_cli
from obim_trainer.errors import ConfigError
from obim_trainer.settings.callback import OBIMConfig
from obim_trainer.training.callback import OBIMCallback
from obim_trainer.training.run_dir import select_top_checkpoints
from tests.callback_run import (
    LANGUAGE_WORDS,
    MAX_LENGTH,
    build_inputs,
    callback_settings,
    eval_history,
    example_config,
    make_trainer,
)
from tests.tiny_training import training_arguments
from tests.tracking.wandb_offline import fresh_wandb, history, run_dir

ROOT = Path(__file__).parents[2]


def trainer_settings(inputs, **overrides):
    """The callback selecting by the Trainer's metric, with no evaluator of its own (the README's example)."""
    return callback_settings(inputs, eval_data=None, **overrides)


def final_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("workflow") / "inputs")


@pytest.fixture(scope="module")
def trainer_eval_run(inputs, tmp_path_factory):
    """8 steps, a save and an evaluation every 2, merges at steps 4 and 8, logged to W&B offline."""
    work = tmp_path_factory.mktemp("trainer_eval")
    wandb_dir = work / "wandb"
    wandb_dir.mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(wandb_dir))
        env.setenv("WANDB_SILENT", "true")
        fresh_wandb()
        callback = OBIMCallback(OBIMConfig.build(trainer_settings(inputs, merge_every_saves=2, log_saliency=False)))
        args = training_arguments(work / "run", report_to="wandb", save_total_limit=2)
        trainer = make_trainer(inputs, args, [callback])
        trainer.train()
        import wandb

        wandb.finish()
    return work / "run", callback, final_weights(trainer), run_dir(wandb_dir)


def test_each_merge_is_evaluated_with_the_trainers_loss_beside_the_checkpoints(trainer_eval_run, inputs, tmp_path):
    output, callback, _, wandb_run = trainer_eval_run
    rows = history(wandb_run)
    checkpoint_steps = sorted(r["train/global_step"] for r in rows if "obim/checkpoint/eval_ja_loss" in r)
    merge_rows = {r["train/global_step"]: r for r in rows if "obim/merged/eval_ja_loss" in r}
    assert checkpoint_steps == [2, 4, 6, 8] and sorted(merge_rows) == [4, 8]
    for step, row in merge_rows.items():
        folder = output / "obim" / f"merged-step-{step}"
        # an independent evaluation: a new Trainer on the merged folder, the same datasets and collator
        fresh = make_trainer(
            inputs, training_arguments(tmp_path / f"eval-{step}"), [], AutoModelForCausalLM.from_pretrained(folder)
        )
        expected = fresh.evaluate()
        for language in LANGUAGE_WORDS:
            assert row[f"obim/merged/eval_{language}_loss"] == pytest.approx(expected[f"eval_{language}_loss"], 1e-5)
            assert f"obim/merged/eval_{language}_perplexity" in row
    assert {"eval_en_loss", "eval_ja_loss"} <= set(callback.merged[-1].metrics)
    assert not any(k.startswith("obim_") for k in callback.merged[-1].metrics)  # no second evaluator ran


def test_the_trainers_record_and_training_are_untouched_by_the_merge_evaluations(trainer_eval_run, inputs, tmp_path):
    output, _, weights, _ = trainer_eval_run
    plain = make_trainer(inputs, training_arguments(tmp_path / "plain", save_total_limit=2), [])
    plain.train()
    reference = final_weights(plain)
    assert set(weights) == set(reference)
    assert all(torch.equal(weights[k], reference[k]) for k in reference), "merges changed the training"
    # the Trainer logged each language once per evaluation step: the merges' evaluations are not in its history
    history_rows = json.loads((output / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history_rows if "eval_ja_loss" in e] == [2, 4, 6, 8]
    assert eval_history(output, "eval_ja_loss") == eval_history(tmp_path / "plain", "eval_ja_loss")


def test_the_merge_losses_are_logged(inputs, tmp_path, caplog):
    callback = OBIMCallback(OBIMConfig.build(trainer_settings(inputs, merge_every_saves=0, log_saliency=False)))
    with caplog.at_level(logging.INFO, logger="obim_trainer.training.callback"):
        make_trainer(inputs, training_arguments(tmp_path / "run", max_steps=4), [callback]).train()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("merged checkpoints")]
    assert "eval_en_loss" in line and "eval_ja_loss" in line


def test_a_select_metric_the_run_does_not_log_stops_it_at_the_first_evaluated_save(inputs, tmp_path):
    callback = OBIMCallback(OBIMConfig.build(trainer_settings(inputs, select_metric="eval_fr_loss")))
    trainer = make_trainer(inputs, training_arguments(tmp_path / "run"), [callback])
    with pytest.raises(ConfigError, match="select_metric 'eval_fr_loss'") as error:
        trainer.train()
    assert "eval_en_loss" in str(error.value) and "eval_ja_loss" in str(error.value)
    assert trainer.state.global_step == 2
    assert not (tmp_path / "run" / "checkpoint-4").exists()


class StopsAtTheSave(OBIMCallback):
    """Stops the run right after the Trainer saved ``checkpoint-<at>``, before the callback records it."""

    def __init__(self, config, at: int) -> None:
        super().__init__(config)
        self.at = at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise SystemExit("stopped during the save")
        return super().on_save(args, state, control, **kwargs)


def test_a_resumed_run_records_the_checkpoint_it_stopped_at_and_keeps_it(inputs, tmp_path, caplog):
    # select the *highest* ja loss, so the early checkpoints (2, 4) are the best and 4 must survive rotation
    settings = trainer_settings(inputs, select_mode="max", merge_every_saves=0, log_saliency=False)
    output = tmp_path / "run"
    first = make_trainer(inputs, training_arguments(output, save_total_limit=2), [StopsAtTheSave(settings, 4)])
    with pytest.raises(SystemExit):
        first.train()
    record = json.loads((output / "obim" / "candidates.json").read_text())
    assert [c["step"] for c in record["candidates"]] == [2]

    callback = OBIMCallback(OBIMConfig.build(settings))
    with caplog.at_level(logging.WARNING, logger="obim_trainer.training.callback"):
        make_trainer(inputs, training_arguments(output, save_total_limit=2), [callback]).train(
            resume_from_checkpoint=True
        )
    assert any("step(s) [4] were saved but not recorded" in r.getMessage() for r in caplog.records)
    record = json.loads((output / "obim" / "candidates.json").read_text())
    assert [c["step"] for c in record["candidates"]] == [2, 4, 6, 8]
    logged = eval_history(output, "eval_ja_loss")
    recovered = next(c for c in record["candidates"] if c["step"] == 4)
    assert recovered["metrics"]["eval_ja_loss"] == pytest.approx(logged[4])
    assert recovered["stats_key"] is not None
    best = sorted(logged, key=lambda step: (-logged[step], -step))[:2]
    assert 4 in best and record["selected"] == best
    assert not (output / "checkpoint-4").exists()  # rotated away by the Trainer, kept by OBIM
    assert (output / "obim" / "selected" / "checkpoint-4" / "model.safetensors").is_file()
    assert record["merged"][-1]["checkpoints"] == best

    # a fresh run into the same folder moves that record aside rather than mixing the two runs
    caplog.clear()
    fresh = OBIMCallback(OBIMConfig.build(settings))
    with caplog.at_level(logging.WARNING, logger="obim_trainer.training.callback"):
        make_trainer(inputs, training_arguments(output, max_steps=2), [fresh]).train()
    (archive,) = output.glob("obim.previous-*")
    assert json.loads((archive / "candidates.json").read_text()) == record
    assert [c["step"] for c in json.loads((output / "obim" / "candidates.json").read_text())["candidates"]] == [2]
    assert any(str(archive) in r.getMessage() for r in caplog.records)


def load_example():
    spec = importlib.util.spec_from_file_location("continued_pretraining", ROOT / "examples/continued_pretraining.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_the_readmes_after_training_command_repeats_the_example_runs_merge(inputs, tmp_path):
    """The example's settings (save_total_limit 2, top_k 3): the offline --run-dir merge finds the copies the
    callback kept and its record, picks the same checkpoints and writes the same bytes."""
    output = tmp_path / "run"
    training = {"max_steps": 8, "per_device_train_batch_size": 4, "save_total_limit": 2, "report_to": "none"}
    eval_data = {language: str(inputs.text_file(f"eval_{language}")) for language in LANGUAGE_WORDS}
    obim = {"top_k": 3, "merge_every_saves": 0, "log_saliency": False, "eval_data": eval_data}
    assert load_example().main(["--config", str(example_config(inputs, output, tmp_path, training, obim))]) == 0
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    record = json.loads((output / "obim" / "candidates.json").read_text())
    assert len(record["selected"]) == 3

    argv = ["--base", str(inputs.base), "--run-dir", str(output), "--top-k", "3", "--metric", "eval_ja_loss"]
    argv += ["--calibration-data", str(inputs.calibration), "--calibration-max-length", str(MAX_LENGTH)]
    argv += ["--param", "order=rotation", "--no-progress", "--output", str(tmp_path / "offline")]
    assert merge_cli(argv) == 0
    online, offline = output / "obim" / "merged-step-8", tmp_path / "offline"
    chosen = [c["path"] for c in json.loads((offline / "obim_merge.json").read_text())["checkpoints"]]
    assert [Path(p).name for p in chosen] == [f"checkpoint-{s}" for s in record["selected"]]
    assert (online / "model.safetensors").read_bytes() == (offline / "model.safetensors").read_bytes()

    # the evaluator's metrics, which no trainer_state.json has, rank the run's checkpoints too
    by_en = select_top_checkpoints(output, "obim_en_loss", 3)
    available = {6, 8} | set(record["selected"])  # on disk: the last two saves and the kept copies
    values = {c["step"]: c["metrics"]["obim_en_loss"] for c in record["candidates"] if c["step"] in available}
    assert [c.step for c in by_en] == sorted(values, key=lambda s: (values[s], -s))[:3]


def test_the_example_resumes_from_the_yaml_key_and_from_resume(inputs, tmp_path):
    example, output = load_example(), tmp_path / "run"

    def run(max_steps: int, extra: list[str], **training) -> None:
        training |= {"max_steps": max_steps, "per_device_train_batch_size": 4, "report_to": "none"}
        obim = {"merge_every_saves": 0, "merge_at_end": False, "log_saliency": False}
        config = example_config(inputs, output, tmp_path, training, obim)
        assert example.main(["--config", str(config), *extra]) == 0

    run(4, [])
    run(6, [], resume_from_checkpoint=str(output / "checkpoint-4"))
    run(8, ["--resume"])
    state = json.loads((output / "checkpoint-8" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_ja_loss" in e] == [2, 4, 6, 8]  # one run, not restarts
    record = json.loads((output / "obim" / "candidates.json").read_text())
    assert [c["step"] for c in record["candidates"]] == [2, 4, 6, 8]
    assert not list(output.glob("obim.previous-*"))
    assert not any(k.startswith("obim_") for c in record["candidates"] for k in c["metrics"])  # evaluated once
