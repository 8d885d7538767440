"""Reading model folders tensor by tensor, in every supported format, and every way it can fail."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from obim_trainer.checkpoints import SafetensorsReader, TorchBinReader, open_checkpoint
from obim_trainer.errors import CheckpointError
from tests.conftest import make_tiny_llama, save_model_folder

SHARD = "60KB"  # splits the tiny bf16 Llama into several shards


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(seed=3, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def single(model, tmp_path_factory) -> Path:
    """model.safetensors of the bf16 model; read-only for the tests."""
    return save_model_folder(model, tmp_path_factory.mktemp("single") / "m", None)


@pytest.fixture(scope="module")
def sharded(model, tmp_path_factory) -> Path:
    return save_model_folder(model, tmp_path_factory.mktemp("sharded") / "m", None, max_shard_size=SHARD)


def save_bin(model, folder: Path, shards: int = 1, legacy: bool = False) -> Path:
    """pytorch_model.bin (transformers 5 writes only safetensors), optionally sharded with an index."""
    folder.mkdir()
    model.config.save_pretrained(folder)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        return folder
    names = list(state)
    weight_map = {}
    for i in range(shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, folder / shard, _use_new_zipfile_serialization=not legacy)
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


class Opaque:
    """A Python object that weights_only loading refuses."""


def write_raw_safetensors(file: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return file


def copy_folder(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(folder) as reader:
        return {name: reader.read(name) for name in reader.tensor_infos()}


@pytest.mark.parametrize(
    ("fmt", "reader_type", "is_sharded"),
    [
        ("safetensors", SafetensorsReader, False),
        ("safetensors", SafetensorsReader, True),
        ("bin", TorchBinReader, False),
        ("bin", TorchBinReader, True),
        ("legacy-bin", TorchBinReader, True),
    ],
)
def test_every_format_reads_the_saved_tensors_bit_for_bit(
    model, single, sharded, tmp_path, fmt, reader_type, is_sharded
):
    if fmt == "safetensors":
        folder = sharded if is_sharded else single
    else:
        folder = save_bin(model, tmp_path / "m", shards=3 if is_sharded else 1, legacy=fmt == "legacy-bin")
    expected = model.state_dict()
    with open_checkpoint(folder) as reader:
        assert isinstance(reader, reader_type)
        assert (len(reader.weight_files()) > 1) == is_sharded
        infos = reader.tensor_infos()
        assert set(infos) == set(expected)
        for name, info in infos.items():
            t = reader.read(name)
            assert info.dtype == t.dtype == torch.bfloat16 and info.shape == tuple(t.shape), name
            assert t.is_contiguous() and t.device.type == "cpu"
            assert torch.equal(t.view(torch.int16), expected[name].view(torch.int16)), name
        files = [reader.weight_files().index(info.file) for info in infos.values()]
        assert files == sorted(files), "tensors are listed file by file"


def test_matches_transformers_and_safetensors_loading(sharded, model, tmp_path):
    from transformers import AutoModelForCausalLM

    ours = read_all(sharded)
    by_safetensors = {}
    for shard in sorted(sharded.glob("model-*.safetensors")):
        by_safetensors.update(load_file(shard))
    assert ours.keys() == by_safetensors.keys()
    assert all(torch.equal(ours[n], by_safetensors[n]) for n in ours)
    for folder in (sharded, save_bin(model, tmp_path / "bin", shards=2)):
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").state_dict()
        ours = read_all(folder)
        assert ours.keys() == loaded.keys()
        for name, tensor in ours.items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_read_returns_a_tensor_of_its_own(single):
    with open_checkpoint(single) as reader:
        first = reader.read("model.norm.weight")
        first.add_(1)
        assert not torch.equal(reader.read("model.norm.weight"), first)


def test_every_safetensors_dtype_and_odd_shapes(tmp_path):
    state = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "i64": torch.arange(-3, 4),
        "i8": torch.tensor([-1, 2, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4),
    }
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    ours = read_all(folder)
    for name, tensor in state.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_fingerprint_changes_when_and_only_when_a_weight_file_changes(single, sharded, tmp_path):
    folder = copy_folder(single, tmp_path / "m")
    weights = folder / "model.safetensors"
    first = open_checkpoint(folder).fingerprint()
    assert open_checkpoint(folder).fingerprint() == first
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    assert open_checkpoint(folder).fingerprint() == first, "files other than weights do not count"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = open_checkpoint(folder).fingerprint()
    assert touched != first
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, restored mtime: only the content differs
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert open_checkpoint(folder).fingerprint() not in (first, touched)

    shards = copy_folder(sharded, tmp_path / "s")
    before = open_checkpoint(shards).fingerprint()
    shard = sorted(shards.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes())
    os.utime(shard, ns=(0, 10**9))
    assert open_checkpoint(shards).fingerprint() != before


def test_a_single_safetensors_file_of_another_name_is_read(single, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(single / "model.safetensors", folder / "consolidated.safetensors")
    save_file({"lora_A": torch.zeros(2)}, folder / "adapter_model.safetensors")
    with open_checkpoint(folder) as reader:
        assert [f.name for f in reader.weight_files()] == ["consolidated.safetensors"]
        expected = load_file(single / "model.safetensors")
        assert all(torch.equal(reader.read(n), t) for n, t in expected.items())
    shutil.copy(single / "model.safetensors", folder / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"consolidated\.safetensors, other\.safetensors.*restore the index"):
        open_checkpoint(folder)


def test_legacy_bin_is_loaded_whole_and_says_so(model, tmp_path, caplog):
    folder = save_bin(model, tmp_path / "b", legacy=True)
    with caplog.at_level(logging.INFO, logger="obim_trainer.checkpoints.reader"):
        read_all(folder)
    assert "pytorch_model.bin" in caplog.text and "cannot be memory-mapped" in caplog.text


def test_safetensors_preferred_like_transformers(single, model, tmp_path):
    folder = copy_folder(single, tmp_path / "m")
    torch.save({"only.in.bin": torch.zeros(1)}, folder / "pytorch_model.bin")
    with open_checkpoint(folder) as reader:
        assert isinstance(reader, SafetensorsReader) and "only.in.bin" not in reader.tensor_infos()


# --- errors: each names the file and says what to do ---------------------------------------------


def test_missing_path_and_file_instead_of_folder(single, tmp_path):
    with pytest.raises(CheckpointError, match=r"nope does not exist; pass the folder that holds the checkpoint's"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a file, not a folder; pass the folder"):
        open_checkpoint(single / "model.safetensors")


def test_folder_without_weights_lists_files_and_formats(tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text("{}")
    (odd / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"in .*odd \(found: config\.json, weights\.npz\)\. Supported: .*bin"):
        open_checkpoint(odd)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    save_file({"a": torch.zeros(1)}, adapter / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"adapter is a PEFT LoRA adapter, .*set base=DIR to the base model"):
        open_checkpoint(adapter)
    zero = tmp_path / "zero"
    (zero / "global_step10").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"zero \(found: global_step10/\).*DeepSpeed checkpoint is incomplete"):
        open_checkpoint(zero)


def corrupted(single: Path, tmp_path: Path, edit) -> Path:
    folder = copy_folder(single, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(edit(weights.read_bytes()))
    return folder


@pytest.mark.parametrize(
    ("edit", "detail"),
    [
        (lambda b: b[:-100], "header describes .* bytes of tensor data but the file holds"),
        (lambda b: b + b"\0" * 8, "header describes .* bytes of tensor data but the file holds"),
        (lambda b: b[:5], "too short"),
        (lambda b: (10**12).to_bytes(8, "little") + b[8:], "announces a 1000000000000-byte header"),
        (lambda b: b[:8] + b"\xff" * 16 + b[24:], "not valid JSON"),
        (lambda b: b"\x02" + b"\0" * 7 + b"[]", "not a JSON object"),
    ],
    ids=["truncated-data", "trailing-bytes", "no-header", "huge-header", "garbage-header", "header-not-object"],
)
def test_corrupt_safetensors_fail_at_open(single, tmp_path, edit, detail):
    folder = corrupted(single, tmp_path, edit)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors is corrupt or truncated \(.*{detail}.*re-download"):
        open_checkpoint(folder)


@pytest.mark.parametrize(
    ("header", "data", "detail"),
    [
        ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "malformed header entry for tensor w"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "tensor w spans 4 bytes"),
        ({"w": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed shape"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "tensor b starts at data byte 4, expected 8",
        ),
    ],
    ids=["no-offsets", "wrong-span", "bad-shape", "overlap"],
)
def test_inconsistent_safetensors_headers(tmp_path, header, data, detail):
    folder = tmp_path / "m"
    folder.mkdir()
    write_raw_safetensors(folder / "model.safetensors", header, data)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors is corrupt .*{detail}.*re-save"):
        open_checkpoint(folder)


def test_unsupported_dtype_names_tensor_and_fix(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    write_raw_safetensors(
        folder / "model.safetensors", {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8
    )
    with pytest.raises(CheckpointError, match=r"tensor w in .*model\.safetensors has dtype 'C64'.*convert"):
        open_checkpoint(folder)


def test_broken_safetensors_index(sharded, tmp_path):
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    norm_shard = weight_map["model.norm.weight"]
    other_shard = next(s for s in sorted(weight_map.values()) if s != norm_shard)

    def edited(name: str, edit) -> Path:
        folder = copy_folder(sharded, tmp_path / name)
        index = folder / "model.safetensors.index.json"
        content = json.loads(index.read_text())
        index.write_text(edit(content))
        return folder

    def to_missing_shard(content):
        content["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
        return json.dumps(content)

    def to_wrong_shard(content):
        content["weight_map"]["model.norm.weight"] = other_shard
        return json.dumps(content)

    def with_ghost(content):
        content["weight_map"]["model.ghost.weight"] = other_shard
        return json.dumps(content)

    with pytest.raises(CheckpointError, match=r"index\.json names shard\(s\) model-00099-of-00099\.safetensors .*copy"):
        open_checkpoint(edited("missing", to_missing_shard))
    with pytest.raises(
        CheckpointError,
        match=rf"index\.json is corrupt .*tensor model\.norm\.weight in {other_shard}, but {norm_shard}",
    ):
        open_checkpoint(edited("wrong", to_wrong_shard))
    with pytest.raises(CheckpointError, match=rf"model\.ghost\.weight in {other_shard}, but no shard holds it"):
        open_checkpoint(edited("ghost", with_ghost))
    with pytest.raises(CheckpointError, match=r"index\.json is corrupt or truncated \(not valid JSON.*re-download"):
        open_checkpoint(edited("json", lambda content: "{not json"))
    with pytest.raises(CheckpointError, match=r"index\.json is corrupt or truncated \(no weight_map"):
        open_checkpoint(edited("no-map", lambda content: json.dumps({"metadata": {}})))
    folder = copy_folder(sharded, tmp_path / "dup")
    save_file({"model.norm.weight": torch.zeros(1)}, folder / other_shard)
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight is stored twice .*re-save"):
        open_checkpoint(folder)


def test_several_shards_without_index(sharded, tmp_path):
    folder = copy_folder(sharded, tmp_path / "m")
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"several safetensors files \(model-00001-of-0000\d\.safetensors.*index"):
        open_checkpoint(folder)


def test_read_errors_are_wrapped(single, tmp_path):
    folder = copy_folder(single, tmp_path / "m")
    weights = folder / "model.safetensors"
    with open_checkpoint(folder) as reader:
        name = next(iter(reader.tensor_infos()))
        data = weights.read_bytes()
        weights.write_bytes(data[: 8 + int.from_bytes(data[:8], "little")])  # the data is gone after open
        with pytest.raises(CheckpointError, match=rf"model\.safetensors is corrupt .*into tensor {name}.*re-download"):
            reader.read(name)
        with pytest.raises(CheckpointError, match=r"tensor model\.nope\.weight is not stored in .*same architecture"):
            reader.read("model.nope.weight")


def test_broken_bin_checkpoints(model, tmp_path):
    folder = save_bin(model, tmp_path / "garbage")
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 but not a zip archive")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is corrupt or truncated .*re-download"):
        open_checkpoint(folder)

    unsafe = save_bin(model, tmp_path / "unsafe")
    torch.save({"w": torch.zeros(1), "opt": Opaque()}, unsafe / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin holds Python objects .*save_pretrained"):
        open_checkpoint(unsafe)

    wrapped = save_bin(model, tmp_path / "wrapped")
    torch.save({"module": {"w": torch.zeros(1)}}, wrapped / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match=r"pytorch_model\.bin holds a dict with non-tensor values.*save_pretrained"
    ):
        open_checkpoint(wrapped)

    sharded = save_bin(model, tmp_path / "sharded", shards=2)
    (sharded / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match=r"bin\.index\.json names shard\(s\) pytorch_model-00002-of-00002\.bin"):
        open_checkpoint(sharded)
