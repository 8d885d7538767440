"""The NaN/Inf check of every input tensor: native and torch paths agree, and a bad tensor names its file."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.checkpoints import open_checkpoint
from obim_trainer.errors import CheckpointError
from obim_trainer.merging.native_library import native_library
from obim_trainer.pipeline.input_check import all_finite, check_finite
from tests.conftest import make_tiny_llama, save_model_folder

FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 70_000, 200_002])
def test_one_bad_value_anywhere_is_found(dtype, bad, where):
    assert native_library() is not None  # the native path is the one under test
    tensor = torch.randn(200_003, dtype=torch.float32).to(dtype)
    assert all_finite(tensor)
    tensor[where] = bad
    assert not all_finite(tensor)
    assert not all_finite(tensor[::2] if where % 2 == 0 else tensor[1::2])  # strided: torch's path


@pytest.mark.parametrize("dtype", FLOATS)
def test_extreme_finite_values_pass(dtype):
    info = torch.finfo(dtype)
    values = [info.max, -info.max, info.tiny, -info.tiny, info.smallest_normal / 4, 0.0, -0.0]
    tensor = torch.tensor(values, dtype=torch.float64).to(dtype).repeat(10_000)
    assert all_finite(tensor) and all_finite(tensor[::3])


def test_a_poisoned_checkpoint_names_its_file(tmp_path):
    folder = save_model_folder(make_tiny_llama(seed=0), tmp_path / "ckpt", None)
    reader = open_checkpoint(folder)
    name = next(n for n in reader.tensor_infos() if n.endswith("q_proj.weight"))
    tensor = reader.read(name).clone()
    assert check_finite(tensor, name, reader) is tensor
    tensor[1, 2] = float("nan")
    with pytest.raises(CheckpointError, match=rf"{name} in .*model\.safetensors contains NaN or Inf"):
        check_finite(tensor, name, reader)
    ints = torch.arange(3)
    assert check_finite(ints, "ints", reader) is ints  # integer buffers are not checked
