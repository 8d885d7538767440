"""A two-step DeepSpeed ZeRO run on two CPU processes that leaves a Trainer checkpoint.

:func:`launch` starts it; each rank runs this file under torch.distributed.run:
python -m torch.distributed.run --nproc_per_node 2 tests/checkpoints/zero_run.py OUTPUT STAGE [LAYERS HIDDEN]

The tiny Llama ties its embeddings and freezes its final norm, so the checkpoint has shared and
frozen parameters besides the partitioned trainable ones; it trains in bfloat16, so the fp32 master
weights differ from the 16-bit model.safetensors the Trainer saves beside them (ZeRO-3 gathers it).
"""

from __future__ import annotations

import sys
from pathlib import Path

from obim_trainer.distributed.teardown import process_group_teardown
from tests.conftest import VOCAB_SIZE, make_tiny_llama
from tests.launch import deepspeed_config, run_env, run_on_free_port, torchrun
from tests.tiny_training import random_token_rows, training_arguments

SEQUENCE = 16


def launch(output: Path, stage: int, layers: int = 2, hidden: int = 64, timeout_s: float = 600) -> Path:
    """Train under ZeRO-``stage`` on two CPU processes; return the ``checkpoint-2`` folder the Trainer wrote."""
    script = [__file__, str(output), str(stage), str(layers), str(hidden)]
    log_file = output.parent / f"{output.name}-launch.log"
    env = run_env(DS_ACCELERATOR="cpu")
    status, log = run_on_free_port(lambda port: [*torchrun(2, port), *script], env, timeout_s, log_file)
    if status != 0:
        raise RuntimeError(f"the ZeRO-{stage} run failed ({status}):\n{log}")
    return output / "checkpoint-2"


def main(output_dir: str, stage: str, layers: str = "2", hidden: str = "64") -> None:
    from transformers import Trainer

    size = int(hidden)
    model = make_tiny_llama(
        seed=0, tie=True, num_hidden_layers=int(layers), hidden_size=size, intermediate_size=2 * size
    )
    model.model.norm.weight.requires_grad_(False)
    data = random_token_rows(16, SEQUENCE, 4, VOCAB_SIZE, seed=0)
    args = training_arguments(
        output_dir,
        deepspeed=deepspeed_config(int(stage), gather_16bit=True),
        bf16=True,
        max_steps=2,
        eval_strategy="no",
        per_device_train_batch_size=2,
        learning_rate=1e-2,
    )
    Trainer(model=model, args=args, train_dataset=data).train()


if __name__ == "__main__":
    with process_group_teardown():  # main's trainer and engine are gone before the group is destroyed
        main(*sys.argv[1:])
