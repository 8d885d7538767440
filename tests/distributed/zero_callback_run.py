"""One rank of a two-process DeepSpeed ZeRO run on CPU with the callback (started by torch.distributed.run).

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/distributed/zero_callback_run.py \\
    INPUTS OUTPUT RESULT STAGE [candidates]
STAGE 2 or 3 runs DeepSpeed ZeRO; ``ddp`` plain data parallelism. With ``candidates`` the callback
compares CANDIDATES (per-language calibration) and keeps the objective's pick.
Rank 0 writes RESULT (JSON): the callback's merges and selection, and whether the live model
holds the merged weights after training (load_merged_at_end).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from obim_trainer.checkpoints import open_checkpoint
from obim_trainer.distributed import StateEntry, ZeroGatherer, is_main_process, is_partitioned, rank, world_size
from obim_trainer.distributed.teardown import process_group_teardown
from obim_trainer.quiet import hide_deepspeed_deprecations
from obim_trainer.settings.callback import OBIMConfig
from obim_trainer.training.callback import OBIMCallback
from tests.callback_run import CANDIDATES, RunInputs, callback_settings, make_trainer, per_language_settings
from tests.launch import deepspeed_config
from tests.tiny_training import training_arguments


def live_equals(model: torch.nn.Module, folder: Path) -> bool:
    """Whether every tensor of the (partitioned) live model equals the one stored in ``folder``."""
    equal = []
    with open_checkpoint(folder) as reader:

        def compare(entry: StateEntry, tensor: torch.Tensor) -> None:
            equal.append(torch.equal(tensor.detach().cpu(), reader.read(entry.name)))

        ZeroGatherer(model).visit(compare, modify=False, what="comparing the live model")
    return bool(equal) and all(equal)


class RestoreChecked(OBIMCallback):
    """Records, after each merge and its evaluation in the live model, whether the live model holds the
    trained weights again (those of the checkpoint of that step, written from it at the save)."""

    restored: list[bool]

    def _merge_and_record(self, step, pending, timings) -> None:
        super()._merge_and_record(step, pending, timings)
        if pending is not None:
            self.restored.append(live_equals(self._trainer().model, self.root.parent / f"checkpoint-{step}"))


def main(inputs_root: str, output_dir: str, result_file: str, stage: str, candidates: str = "") -> None:
    from transformers import AutoModelForCausalLM

    inputs = RunInputs(Path(inputs_root))
    model = AutoModelForCausalLM.from_pretrained(inputs.base)  # partitioned by the engine, not by zero.Init
    deepspeed = None if stage == "ddp" else deepspeed_config(int(stage), gather_16bit=False)
    args = training_arguments(Path(output_dir), deepspeed=deepspeed, max_steps=6)
    hide_deepspeed_deprecations()  # as examples/continued_pretraining.py does
    if candidates:
        settings = per_language_settings(inputs, merges=CANDIDATES, load_merged_at_end=True)
    else:
        settings = callback_settings(inputs, load_merged_at_end=True)
    callback = RestoreChecked(OBIMConfig.build(settings))
    callback.restored = []
    trainer = make_trainer(inputs, args, [callback], model=model)
    trainer.train()
    partitioned = is_partitioned(trainer.model)
    assert callback.latest_merge is not None, f"rank {rank()} knows of no merge"
    matches = live_equals(trainer.model, callback.latest_merge)
    if is_main_process():
        result = {
            "world_size": world_size(),
            "partitioned": partitioned,
            "latest_merge": str(callback.latest_merge),
            "selected": [str(callback.candidates[s].merge_path) for s in callback.selected],
            "candidates": {str(c.step): c.metrics for c in callback.candidates.values()},
            "live_equals_merged": matches,
            "variant": callback.merged[-1].variant,
            "restored_after_merge_evaluation": callback.restored,
            "merged_metrics": callback.merged[-1].metrics,
        }
        Path(result_file).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    with process_group_teardown():  # main's trainer and engine are gone before the group is destroyed
        main(*sys.argv[1:6])
