"""The callback's record on resume: a checkpoint the run saved but did not record, holding only its ZeRO
shards (the run stopped before the callback wrote its weights), is rebuilt from those shards and recorded."""

from __future__ import annotations

import json
import logging

import torch
from safetensors.torch import load_file

from obim_trainer.calibration.preparation import prepare_calibration
from obim_trainer.checkpoints import open_checkpoint
from obim_trainer.checkpoints.detect import hf_format
from obim_trainer.settings.callback import OBIMConfig
from obim_trainer.training.callback import OBIMCallback
from obim_trainer.training.checkpoint_guard import CheckpointGuard
from tests.conftest import copy_tree, make_tiny_llama, save_model_folder


def test_a_zero_save_without_weights_is_rebuilt_from_its_shards_and_recorded(
    zero_checkpoint, tokenizer_dir, calibration_jsonl, tmp_path, caplog
):
    output = tmp_path / "run"
    folder = copy_tree(zero_checkpoint(3), output / "checkpoint-2")
    for weights in folder.glob("model*.safetensors*"):
        weights.unlink()
    assert hf_format(folder) is None
    state = json.loads((folder / "trainer_state.json").read_text())
    state["log_history"].append({"step": 2, "eval_loss": 1.5})  # as an evaluated save logs it
    (folder / "trainer_state.json").write_text(json.dumps(state))
    with open_checkpoint(folder) as shards:  # the fp32 masters, as zero_to_fp32.py gathers them
        masters = {name: shards.read(name) for name in shards.tensor_infos()}
    base = save_model_folder(make_tiny_llama(seed=0, tie=True), tmp_path / "base", tokenizer_dir)
    config = OBIMConfig.build(
        {
            "base_model": base,
            "calibration_data": calibration_jsonl,
            "select_metric": "eval_loss",
            "top_k": 1,
            "min_checkpoints": 1,
        }
    )
    callback = OBIMCallback(config)
    callback.root = output / "obim"
    callback.guard = CheckpointGuard(callback.root / "selected")
    callback.calibration = prepare_calibration(config, base)

    with caplog.at_level(logging.WARNING):
        callback._resume(4, output)  # resumed at step 4: checkpoint-2 is not the resume point

    assert hf_format(folder) is not None and not list(folder.glob(".obim-rebuild*"))
    rebuilt = load_file(folder / "model.safetensors")
    assert rebuilt.keys() == masters.keys()
    assert all(torch.equal(rebuilt[name], masters[name]) for name in masters)
    (candidate,) = callback.candidates.values()
    assert candidate.step == 2 and candidate.stats_key is not None and candidate.metrics["eval_loss"] == 1.5
    assert callback.selected == [2]
    assert (callback.root / "selected" / "checkpoint-2" / "model.safetensors").is_file()
    messages = [r.getMessage() for r in caplog.records]
    assert any("rebuilt from them" in m and str(folder) in m for m in messages)
    assert any("step(s) [2] were saved but not recorded" in m for m in messages)
