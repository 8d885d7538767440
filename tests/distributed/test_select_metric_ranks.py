"""A ``select_metric`` the run never logs stops a two-process run at its first evaluated save, on every rank,
with the one ConfigError that names the metrics present (issue 13): no rank trains on alone, none hangs."""

from __future__ import annotations

import json

import pytest

from tests.callback_run import build_inputs
from tests.launch import run_env, run_on_free_port, torchrun

pytestmark = pytest.mark.slow  # two processes train

TIMEOUT_S = 240


def test_every_rank_raises_the_config_error_at_the_first_evaluated_save(tmp_path):
    inputs = build_inputs(tmp_path / "inputs")
    output = tmp_path / "run"
    output.mkdir()
    script = ["tests/distributed/select_metric_run.py", str(inputs.root), str(output)]
    status, log = run_on_free_port(
        lambda port: [*torchrun(2, port), *script], run_env(), TIMEOUT_S, tmp_path / "launch.log"
    )
    assert status == 0, log  # -1 would be a hang killed at the timeout
    outcomes = [json.loads((output / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for outcome in outcomes:
        assert outcome["step"] == 2
        assert "select_metric 'eval_fr_loss' is not among the metrics of the first evaluated save" in outcome["error"]
        assert "eval_en_loss" in outcome["error"] and "eval_ja_loss" in outcome["error"]
    assert not (output / "checkpoint-4").exists()
