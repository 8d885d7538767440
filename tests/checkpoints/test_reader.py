"""Reading model folders tensor by tensor, in every supported format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from obim_trainer.checkpoints import open_checkpoint
from obim_trainer.checkpoints.reader import SafetensorsReader, TorchBinReader
from obim_trainer.errors import CheckpointError
from tests.conftest import make_tiny_llama, save_model_folder


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(seed=3, dtype=torch.bfloat16)


def save_bin(model, folder, shards: int = 1):
    """pytorch_model.bin (transformers 5 writes only safetensors), optionally sharded with an index."""
    folder.mkdir()
    model.config.save_pretrained(folder)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    names = list(state)
    weight_map = {}
    for i in range(shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize(
    ("fmt", "reader_type", "sharded"),
    [
        ("safetensors", SafetensorsReader, False),
        ("safetensors-sharded", SafetensorsReader, True),
        ("bin", TorchBinReader, False),
        ("bin-sharded", TorchBinReader, True),
    ],
)
def test_every_format_reads_bit_identical_tensors(model, tmp_path, fmt, reader_type, sharded):
    if fmt.startswith("bin"):
        folder = save_bin(model, tmp_path / "m", shards=3 if sharded else 1)
    else:
        folder = save_model_folder(model, tmp_path / "m", None, **({"max_shard_size": "60KB"} if sharded else {}))
    expected = model.state_dict()
    with open_checkpoint(folder) as reader:
        assert isinstance(reader, reader_type)
        assert (len(reader.weight_files()) > 1) == sharded
        infos = reader.tensor_infos()
        stored = {n for n in expected if n in infos}
        assert stored and stored == set(infos)
        for name in stored:
            t = reader.read(name)
            assert infos[name].dtype == torch.bfloat16 and t.dtype == torch.bfloat16
            assert infos[name].shape == tuple(t.shape)
            assert torch.equal(t, expected[name]), name


def test_fingerprint_changes_only_when_a_file_changes(model, tmp_path):
    folder = save_model_folder(model, tmp_path / "m", None)
    first = open_checkpoint(folder).fingerprint()
    assert open_checkpoint(folder).fingerprint() == first
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    assert open_checkpoint(folder).fingerprint() == first, "non-weight files do not matter"
    sd = load_file(folder / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"] + 1
    from safetensors.torch import save_file

    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    assert open_checkpoint(folder).fingerprint() != first


def test_missing_and_unrecognised_folders(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"found: weights.npz.*Supported"):
        open_checkpoint(tmp_path / "odd")


def test_corrupt_header_truncated_data_and_broken_index(model, tmp_path):
    folder = save_model_folder(model, tmp_path / "m", None)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors.*re-save or re-download"):
        open_checkpoint(folder)
    weights.write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        open_checkpoint(folder)
    sharded = save_model_folder(model, tmp_path / "s", None, max_shard_size="60KB")
    index = sharded / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    name = next(iter(content["weight_map"]))
    content["weight_map"][name] = "model-00099-of-00099.safetensors"
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=r"model-00099-of-00099\.safetensors"):
        open_checkpoint(sharded)


def test_corrupt_bin(model, tmp_path):
    folder = save_bin(model, tmp_path / "b")
    (folder / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        open_checkpoint(folder)
