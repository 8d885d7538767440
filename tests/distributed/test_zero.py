"""ZeroGatherer on an ordinary model (ZeRO-3 itself runs in test_zero3_callback), and loading plain
models during a ZeRO-3 run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from obim_trainer.distributed import ZeroGatherer, is_partitioned, plain_model_loading
from obim_trainer.errors import CheckpointError
from tests.conftest import make_tiny_llama


def saved_state(folder) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(folder / "model.safetensors")
    state = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(folder / shard))
    return state


@pytest.mark.parametrize("tie", [False, True])
def test_written_weights_are_what_save_pretrained_writes(tmp_path, tie):
    model = make_tiny_llama(seed=2, tie=tie)
    assert not is_partitioned(model)
    model.save_pretrained(tmp_path / "reference")
    ours = tmp_path / "ours"
    ours.mkdir()
    ZeroGatherer(model).write_checkpoint(ours, max_shard_size=10**9)
    reference, written = saved_state(tmp_path / "reference"), saved_state(ours)
    assert set(written) == set(reference)  # a tied lm_head is stored once, as the embedding
    assert all(torch.equal(written[k], reference[k]) for k in reference)
    assert [p.name for p in ours.iterdir()] == ["model.safetensors"]  # the staging folder is gone


def test_large_models_are_written_in_shards_with_an_index(tmp_path):
    model = make_tiny_llama(seed=2)
    ZeroGatherer(model).write_checkpoint(tmp_path, max_shard_size=100_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    state = saved_state(tmp_path)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_loading_replaces_every_weight(tmp_path):
    source = make_tiny_llama(seed=5)
    source.save_pretrained(tmp_path)
    model = make_tiny_llama(seed=6)
    ZeroGatherer(model).load_checkpoint(tmp_path)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_loading_a_foreign_model_names_the_tensor(tmp_path):
    make_tiny_llama(seed=5, intermediate_size=96).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight is of shape .* live model has shape"):
        ZeroGatherer(make_tiny_llama()).load_checkpoint(tmp_path)


def test_plain_model_loading_lifts_the_zero3_registration_for_the_block():
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    registered = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        with plain_model_loading():
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        del registered
