"""One rank of a two-process ZeRO-3 run on CPU stopped during a save and resumed (torch.distributed.run).

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/distributed/zero_resume_run.py INPUTS OUTPUT
The first training stops on every rank when the Trainer has saved checkpoint-4 (DeepSpeed shards only:
no 16-bit gathering) and before the callback wrote its weights or recorded it; the second resumes it.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from obim_trainer.distributed.teardown import process_group_teardown
from obim_trainer.quiet import hide_deepspeed_deprecations
from obim_trainer.settings.callback import OBIMConfig
from obim_trainer.training.callback import OBIMCallback
from tests.callback_run import RunInputs, callback_settings, make_trainer
from tests.launch import deepspeed_config
from tests.tiny_training import training_arguments


class StopsAtTheSave(OBIMCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise SystemExit("stopped during the save of checkpoint-4")
        return super().on_save(args, state, control, **kwargs)


def train(inputs: RunInputs, output: Path, callback_type: type, resume: bool) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(inputs.base)
    args = training_arguments(output, deepspeed=deepspeed_config(3, gather_16bit=False), max_steps=6)
    settings = callback_settings(inputs, eval_data=None, select_mode="max", log_saliency=False)
    callback = callback_type(OBIMConfig.build(settings))
    make_trainer(inputs, args, [callback], model=model).train(resume_from_checkpoint=resume or None)


def main(inputs_root: str, output_dir: str) -> None:
    hide_deepspeed_deprecations()
    inputs, output = RunInputs(Path(inputs_root)), Path(output_dir)
    with contextlib.suppress(SystemExit):  # every rank stops at the same save
        train(inputs, output, StopsAtTheSave, resume=False)
    train(inputs, output, OBIMCallback, resume=True)


if __name__ == "__main__":
    with process_group_teardown():
        main(*sys.argv[1:3])
