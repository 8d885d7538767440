"""Streaming sharded safetensors: files transformers and safetensors read as their own."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from obim_trainer.checkpoints import ShardedSafetensorsWriter, parse_size
from obim_trainer.errors import ConfigError
from tests.conftest import make_tiny_llama


def write_all(folder, state, max_shard):
    plan = [(n, tuple(t.shape), t.dtype) for n, t in state.items()]
    with ShardedSafetensorsWriter(folder, plan, max_shard) as writer:
        for n, t in state.items():
            writer.write(n, t)
        return writer.close()


def test_tiny_model_round_trips_through_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(seed=5)
    model.config.save_pretrained(tmp_path)
    state = {n: t for n, t in model.state_dict().items()}
    files = write_all(tmp_path, state, max_shard=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and [f.name for f in files[:-1]] == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for shard in shards:
        tensors_in_shard = [n for n, s in index["weight_map"].items() if s == shard]
        size = sum(state[n].numel() * state[n].element_size() for n in tensors_in_shard)
        assert size <= 40_000 or len(tensors_in_shard) == 1
        raw = (tmp_path / shard).read_bytes()
        header_len = int.from_bytes(raw[:8], "little")
        assert header_len % 8 == 0
        with safe_open(tmp_path / shard, "pt") as f:
            assert f.metadata()["format"] == "pt"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for n, t in loaded.state_dict().items():
        assert torch.equal(t, state[n]), n


def test_single_shard_is_model_safetensors_with_mixed_dtypes(tmp_path):
    state = {"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(5), "c": torch.randn(2).half()}
    files = write_all(tmp_path, state, max_shard=10**9)
    assert [f.name for f in files] == ["model.safetensors"]
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        for n, t in state.items():
            assert torch.equal(f.get_tensor(n), t)


def test_plan_violations_raise(tmp_path):
    plan = [("a", (2,), torch.float32), ("b", (3,), torch.float32)]
    writer = ShardedSafetensorsWriter(tmp_path, plan, 100)
    with pytest.raises(ValueError, match="expected tensor a"):
        writer.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="expected tensor a"):
        writer.write("a", torch.zeros(2, dtype=torch.float16))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="not written, first: b"):
        writer.close()


@pytest.mark.parametrize(
    ("text", "size"), [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1e9", 10**9), (1000, 1000)]
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["five gigs", "5XB", "0", -3])
def test_parse_size_rejects_junk(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)
