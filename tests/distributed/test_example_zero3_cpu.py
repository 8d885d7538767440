"""The README's DeepSpeed-on-CPU command: examples/continued_pretraining.py under ZeRO-3 in two gloo processes.

``DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 ... examples/continued_pretraining.py``
with ``use_cpu: true`` and ``deepspeed: configs/deepspeed/zero3_cpu.json`` in ``training``, as the README
gives it. The run merges, evaluates the merge with the Trainer, and its log holds no line the user cannot
act on (torch deprecations inside DeepSpeed, the zero_to_fp32 advice for weights the callback wrote).
"""

from __future__ import annotations

import json
import re

import pytest

from tests.callback_run import build_inputs, example_config
from tests.launch import ROOT, run_env, run_on_free_port, torchrun

pytestmark = pytest.mark.slow  # two processes

pytest.importorskip("deepspeed")
TIMEOUT_S = 300


def test_the_readme_command_trains_merges_and_logs_nothing_unactionable(tmp_path):
    inputs = build_inputs(tmp_path / "inputs")
    output = tmp_path / "run"
    training = {
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "report_to": "none",
        "deepspeed": str(ROOT / "configs/deepspeed/zero3_cpu.json"),
    }
    obim = {"merge_every_saves": 0, "log_saliency": False}
    config = example_config(inputs, output, tmp_path, training, obim)
    script = ["examples/continued_pretraining.py", "--config", str(config)]
    log_file = tmp_path / "launch.log"
    status, tail = run_on_free_port(
        lambda port: [*torchrun(2, port), *script], run_env(DS_ACCELERATOR="cpu"), TIMEOUT_S, log_file
    )
    assert status == 0, tail
    log = log_file.read_text()
    assert re.findall(r"training \S+ in (\d+) process\(es\)", log) == ["2"]
    assert re.search(r"merged checkpoints \[[\d, ]+\] into \S+merged-step-4 \(eval_en_loss", log), tail
    record = json.loads((output / "obim" / "candidates.json").read_text())
    assert record["merged"][-1]["metrics"]["eval_ja_loss"] > 0
    assert (output / "model.safetensors").is_file()  # the final model's weights, written by the example
    for unactionable in ("FutureWarning", "zero_to_fp32", "find_unused_parameters"):
        assert unactionable not in log, unactionable
