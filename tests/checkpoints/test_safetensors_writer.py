"""Streaming sharded safetensors: files that transformers and safetensors read as their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from obim_trainer.checkpoints import ShardedSafetensorsWriter, parse_size
from obim_trainer.checkpoints.direct_write import BLOCK, MIN_DIRECT_BYTES
from obim_trainer.checkpoints.safetensors_writer import ShardLayout
from obim_trainer.errors import ConfigError, OutputError
from tests.conftest import make_tiny_llama


def plan_of(state: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(n, tuple(t.shape), t.dtype) for n, t in state.items()]


def write_all(folder: Path, state: dict[str, torch.Tensor], max_shard: int, **kwargs) -> list[Path]:
    with ShardedSafetensorsWriter(folder, plan_of(state), max_shard, **kwargs) as writer:
        for n, t in state.items():
            writer.write(n, t)
        return writer.close()


def header_of(file: Path) -> tuple[int, dict]:
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return length, json.loads(raw[8 : 8 + length])


def test_tiny_model_round_trips_through_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(seed=5)
    model.config.save_pretrained(tmp_path)
    state = dict(model.state_dict())
    files = write_all(tmp_path, state, max_shard=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and [f.name for f in files] == [*shards, "model.safetensors.index.json"]
    assert index["weight_map"].keys() == state.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for shard in shards:
        in_shard = [n for n, s in index["weight_map"].items() if s == shard]
        size = sum(state[n].numel() * state[n].element_size() for n in in_shard)
        assert size <= 40_000 or len(in_shard) == 1
        with safe_open(tmp_path / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(in_shard)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(t, state[n]) for n, t in loaded.items())


def test_index_and_shard_names_are_those_transformers_writes(tmp_path):
    model = make_tiny_llama(seed=6)
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")  # no tensor exceeds it
    (tmp_path / "ours").mkdir()
    write_all(tmp_path / "ours", model.state_dict(), 100_000)
    ours, theirs = (tmp_path / d / "model.safetensors.index.json" for d in ("ours", "hf"))
    assert len(json.loads(theirs.read_text())["weight_map"]) == len(model.state_dict())
    assert ours.read_text() == theirs.read_text()


def test_mixed_dtypes_are_aligned_and_exact(tmp_path):
    state = {
        "odd_bf16": torch.randn(3, 5).to(torch.bfloat16),
        "bools": torch.tensor([True, False, True]),
        "i64": torch.arange(7),
        "i8": torch.tensor([-5, 3, 1], dtype=torch.int8),
        "f16": torch.randn(1).half(),
        "f32": torch.randn(3),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "f8": torch.randn(5).to(torch.float8_e5m2),
    }
    files = write_all(tmp_path, state, max_shard=10**9, metadata={"method": "obim"})
    assert [f.name for f in files] == ["model.safetensors"]
    length, header = header_of(files[0])
    assert length % 8 == 0 and header.pop("__metadata__") == {"format": "pt", "method": "obim"}
    for name, meta in header.items():
        assert (8 + length + meta["data_offsets"][0]) % state[name].element_size() == 0, name
    with safe_open(files[0], "pt") as f:
        for n, t in state.items():
            got = f.get_tensor(n)
            assert got.dtype == t.dtype and torch.equal(
                got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
            )


def test_large_tensors_written_by_two_workers_are_exact(tmp_path):
    # tensors past the direct-write minimum at offsets inside blocks, their neighbours small, split between
    # two writers of one layout (a parallel merge's workers) that write in either order
    state = {
        "norm": torch.randn(3, 5),
        "big_f32": torch.randn(700, 1001),
        "big_bf16": torch.randn(1001, 1003).to(torch.bfloat16),
        "small_bf16": torch.randn(7, 3).to(torch.bfloat16),
        "last_bf16": torch.randn(1500, 999).to(torch.bfloat16),
    }
    layout = ShardLayout.build(tmp_path, plan_of(state), 10**9)
    big = [n for n, t in state.items() if t.numel() * t.element_size() > MIN_DIRECT_BYTES + 2 * BLOCK]
    assert len(big) == 3 and all(layout.slots[n].offset % BLOCK for n in big)  # unaligned: partial blocks at both ends
    names = list(state)
    for part in (names[2:], names[:2]):
        with ShardedSafetensorsWriter.on_layout(layout, part=part) as writer:
            for name in part:
                writer.write(name, state[name])
    with safe_open(layout.files[0], "pt") as f:
        for name, tensor in state.items():
            assert torch.equal(f.get_tensor(name).view(torch.uint8), tensor.view(torch.uint8)), name


def test_oversized_tensor_gets_its_own_shard(tmp_path):
    small, big = torch.zeros(10), torch.zeros(100)  # 40 and 400 bytes
    state = {"a": small, "b": small, "big": big, "c": small, "d": small, "e": small}
    write_all(tmp_path, state, max_shard=100)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    groups = {}
    for name, shard in weight_map.items():
        groups.setdefault(shard, []).append(name)
    assert sorted(sorted(g) for g in groups.values()) == [["a", "b"], ["big"], ["c", "d"], ["e"]]
    assert sorted(groups) == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert groups["model-00002-of-00004.safetensors"] == ["big"], "shards follow plan order"


def test_the_split_differs_from_save_pretrained_only_for_an_oversized_tensor(tmp_path):
    """What the writer's docstring promises: save_pretrained's split (huggingface_hub's), except that a
    tensor over the shard size also ends the shard being filled instead of being set aside."""
    from huggingface_hub import split_torch_state_dict_into_shards

    def groups(weight_map: dict[str, str]) -> list[list[str]]:
        by_file: dict[str, list[str]] = {}
        for name, file in sorted(weight_map.items(), key=lambda item: item[1]):
            by_file.setdefault(file, []).append(name)
        return list(by_file.values())

    def small() -> torch.Tensor:
        return torch.zeros(10)  # 40 bytes, its own storage (the hub counts shared storage once)

    for state, ours_expected in (
        ({"a": small(), "b": small(), "c": small(), "d": small()}, [["a", "b"], ["c", "d"]]),
        ({"a": small(), "big": torch.zeros(100), "c": small()}, [["a"], ["big"], ["c"]]),
    ):
        folder = tmp_path / str(len(state))
        folder.mkdir()
        write_all(folder, state, max_shard=100)
        ours = groups(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
        hub = split_torch_state_dict_into_shards(state, max_shard_size=100)
        assert ours == ours_expected
        if "big" not in state:
            assert ours == groups(hub.tensor_to_filename)
        else:
            assert sorted(sorted(g) for g in groups(hub.tensor_to_filename)) == [["a", "c"], ["big"]]


def test_plan_violations_raise(tmp_path):
    plan = [("a", (2,), torch.float32), ("b", (3,), torch.float32)]
    writer = ShardedSafetensorsWriter(tmp_path, plan, 100)
    with pytest.raises(ValueError, match=r"expected tensor a \(2,\) torch.float32 next, got b"):
        writer.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="expected tensor a"):
        writer.write("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="expected tensor a"):
        writer.write("a", torch.zeros(1, 2))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="not written, first: b"):
        writer.close()
    writer.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="c was not planned"):
        writer.write("c", torch.zeros(1))
    assert [f.name for f in writer.close()] == ["model.safetensors"]


@pytest.mark.parametrize(
    ("plan", "size", "message"),
    [
        ([("a", (2,), torch.float32), ("a", (2,), torch.float32)], 100, "appears twice"),
        ([("a", (2,), torch.complex64)], 100, "cannot be stored in safetensors"),
        ([], 100, "empty"),
        ([("a", (2,), torch.float32)], 0, "max_shard_size must be a positive"),
    ],
)
def test_bad_plans_are_refused_before_writing(tmp_path, plan, size, message):
    with pytest.raises(ValueError, match=message):
        ShardedSafetensorsWriter(tmp_path, plan, size)
    assert not any(tmp_path.iterdir())


def test_context_manager_closes_on_success_and_leaves_partial_files_on_error(tmp_path):
    state = {"a": torch.ones(4), "b": torch.ones(4), "c": torch.ones(4)}
    (tmp_path / "ok").mkdir()
    with ShardedSafetensorsWriter(tmp_path / "ok", plan_of(state), 16) as writer:
        for n, t in state.items():
            writer.write(n, t)
    assert (tmp_path / "ok" / "model.safetensors.index.json").is_file(), "leaving the block closes the writer"
    assert writer.close()[-1].name == "model.safetensors.index.json", "close is idempotent"

    (tmp_path / "fail").mkdir()
    with pytest.raises(RuntimeError), ShardedSafetensorsWriter(tmp_path / "fail", plan_of(state), 16) as writer:
        writer.write("a", state["a"])
        raise RuntimeError("merge failed")
    assert sorted(p.name for p in (tmp_path / "fail").iterdir()) == ["model-00001-of-00003.safetensors"]


def test_write_failures_name_the_file(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path / "gone", [("a", (2,), torch.float32)], 100)
    with pytest.raises(OutputError, match=r"cannot write .*gone/model\.safetensors .*choose another output folder"):
        writer.write("a", torch.zeros(2))


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 5 * 10**8),
        ("2GiB", 2 * 2**30),
        ("1e9", 10**9),
        (1000, 1000),
        ("1.5 KB", 1500),
        ("64kib", 65536),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["five gigs", "5XB", "5G", "0", "", -3, True, 2.5])
def test_parse_size_rejects_junk(bad):
    with pytest.raises(ConfigError, match="5GB"):
        parse_size(bad)
