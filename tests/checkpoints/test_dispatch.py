"""open_checkpoint: each format detected opens with its reader, LoRA adapters against their base."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from obim_trainer.checkpoints import SafetensorsReader, TorchBinReader, open_checkpoint
from obim_trainer.errors import CheckpointError
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("dispatch") / "model"
    model = make_tiny_llama(seed=4)
    model.save_pretrained(folder)
    return folder, {n: t.clone() for n, t in model.state_dict().items()}


def test_hf_folders_open_with_the_plain_readers(saved, tmp_path):
    folder, state = saved
    with open_checkpoint(folder) as reader:
        assert isinstance(reader, SafetensorsReader) and reader.format == "safetensors"
        assert torch.equal(reader.read("model.norm.weight"), state["model.norm.weight"])
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    with open_checkpoint(tmp_path / "bin") as reader:
        assert isinstance(reader, TorchBinReader) and reader.format == "bin"


def test_zero_checkpoints_open_saved_weights_or_masters(zero_checkpoint, tmp_path):
    from obim_trainer.checkpoints.zero_reader import ZeroCheckpointReader

    run = zero_checkpoint(2)
    with open_checkpoint(run) as reader:
        assert isinstance(reader, SafetensorsReader)
        saved_q = reader.read("model.layers.0.self_attn.q_proj.weight")
    with open_checkpoint(run, zero_weights="master") as reader:
        assert isinstance(reader, ZeroCheckpointReader) and reader.format == "deepspeed-zero"
        master_q = reader.read("model.layers.0.self_attn.q_proj.weight")
    assert saved_q.dtype == torch.bfloat16 and master_q.dtype == torch.float32
    assert torch.equal(master_q.to(torch.bfloat16), saved_q)
    masters_only = Path(shutil.copytree(run, tmp_path / "c", ignore=shutil.ignore_patterns("model.safetensors")))
    with open_checkpoint(masters_only) as reader:
        assert isinstance(reader, ZeroCheckpointReader)
    with pytest.raises(CheckpointError, match=r"zero_weights='saved' was asked for, but .*c holds only"):
        open_checkpoint(masters_only, zero_weights="saved")


def test_a_lora_adapter_opens_against_its_base_and_only_so(saved, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from obim_trainer.checkpoints.lora_reader import LoraCheckpointReader

    folder = saved[0]
    config = peft.LoraConfig(r=2, target_modules=["q_proj"])
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder), config)
    model.save_pretrained(tmp_path / "adapter")
    with open_checkpoint(folder) as base, open_checkpoint(tmp_path / "adapter", base=base) as reader:
        assert isinstance(reader, LoraCheckpointReader) and reader.format == "peft-lora"
        assert list(reader.tensor_infos()) == list(base.tensor_infos())
    with pytest.raises(CheckpointError, match=r"adapter is a PEFT LoRA adapter, .*cannot be the base itself"):
        open_checkpoint(tmp_path / "adapter")


def test_a_folder_in_no_format_lists_what_it_holds_and_what_would_do(tmp_path):
    (tmp_path / "run" / "global_step5").mkdir(parents=True)
    (tmp_path / "run" / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(tmp_path / "run")
    message = str(caught.value)
    assert "(found: global_step5/, optimizer.pt)" in message and "Supported: model.safetensors" in message
    assert "DeepSpeed checkpoint is incomplete" in message
