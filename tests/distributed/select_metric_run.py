"""One rank of a two-process DDP run on CPU whose ``select_metric`` the run never logs (torch.distributed.run).

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/distributed/select_metric_run.py INPUTS OUTPUT
Each rank writes ``OUTPUT/rank-<r>.json`` with the error it got and the step training stopped at.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from obim_trainer.distributed.ranks import rank
from obim_trainer.distributed.teardown import process_group_teardown
from obim_trainer.errors import ConfigError
from obim_trainer.settings.callback import OBIMConfig
from obim_trainer.training.callback import OBIMCallback
from tests.callback_run import RunInputs, callback_settings, make_trainer
from tests.tiny_training import training_arguments


def main(inputs_root: str, output_dir: str) -> None:
    inputs, output = RunInputs(Path(inputs_root)), Path(output_dir)
    settings = callback_settings(inputs, eval_data=None, select_metric="eval_fr_loss", log_saliency=False)
    args = training_arguments(output, ddp_find_unused_parameters=False)
    trainer = make_trainer(inputs, args, [OBIMCallback(OBIMConfig.build(settings))])
    outcome: dict = {"error": None}
    try:
        trainer.train()
    except ConfigError as exc:
        outcome["error"] = str(exc)
    outcome["step"] = trainer.state.global_step
    (output / f"rank-{rank()}.json").write_text(json.dumps(outcome))


if __name__ == "__main__":
    with process_group_teardown():
        main(*sys.argv[1:3])
