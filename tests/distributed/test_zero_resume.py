"""Resuming a two-process ZeRO-3 run on CPU that stopped during a save, before the callback wrote that
checkpoint's weights (no 16-bit gathering: DeepSpeed saved only its shards) or recorded it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.callback_run import build_inputs, eval_history
from tests.launch import ROOT, run_env, run_on_free_port, torchrun

pytestmark = pytest.mark.slow  # two processes

pytest.importorskip("deepspeed")
TIMEOUT_S = 300


def test_the_checkpoint_of_the_interrupted_save_gets_its_weights_is_recorded_and_merged(tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    inputs = build_inputs(tmp_path / "inputs")
    output = tmp_path / "run"
    script = [str(ROOT / "tests/distributed/zero_resume_run.py"), str(inputs.root), str(output)]
    env, log_file = run_env(DS_ACCELERATOR="cpu"), tmp_path / "launch.log"
    status, tail = run_on_free_port(lambda port: [*torchrun(2, port), *script], env, TIMEOUT_S, log_file)
    assert status == 0, tail
    assert "step(s) [4] were saved but not recorded" in log_file.read_text()

    written = load_file(output / "checkpoint-4" / "model.safetensors")  # from the live model, on resume
    reference = get_fp32_state_dict_from_zero_checkpoint(str(output / "checkpoint-4"))
    assert set(written) == set(reference) and all(torch.equal(written[k], reference[k]) for k in reference)

    record = json.loads((output / "obim" / "candidates.json").read_text())
    recovered = {c["step"]: c for c in record["candidates"]}
    assert sorted(recovered) == [2, 4, 6] and recovered[4]["stats_key"] is not None
    logged = eval_history(output, "eval_ja_loss")
    assert recovered[4]["metrics"]["eval_ja_loss"] == pytest.approx(logged[4])
    best = sorted(logged, key=lambda step: (-logged[step], -step))[:2]  # select_mode max: the early ones
    assert 4 in best and record["selected"] == best and record["merged"][-1]["checkpoints"] == best
