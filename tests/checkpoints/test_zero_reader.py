"""Reading DeepSpeed ZeRO-2 and ZeRO-3 checkpoints written by a real two-process CPU Trainer run."""

from __future__ import annotations

import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from obim_trainer.checkpoints.detect import SAFETENSORS, ZERO, ZERO_MASTER, ZERO_SAVED, detect_format
from obim_trainer.checkpoints.zero_reader import NEEDED, ZeroCheckpointReader, check_zero_to_fp32
from obim_trainer.errors import CheckpointError

zero_to_fp32 = pytest.importorskip("deepspeed.utils.zero_to_fp32")
STAGES = (2, 3)
TAG = "global_step2"


@pytest.fixture(scope="session")
def zero_checkpoints(zero_checkpoint) -> dict[int, Path]:
    """Stage → Trainer checkpoint folder (with model.safetensors); shared, do not modify."""
    return {stage: zero_checkpoint(stage) for stage in STAGES}


@pytest.fixture(scope="session")
def deepspeed_state_dicts(zero_checkpoints) -> dict[int, dict[str, torch.Tensor]]:
    """What DeepSpeed's own consolidation returns for each checkpoint."""
    return {s: zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(p)) for s, p in zero_checkpoints.items()}


def without_saved_weights(folder: Path, dest: Path) -> Path:
    """A copy of a checkpoint the way ZeRO-3 leaves it without stage3_gather_16bit_weights_on_model_save."""
    return Path(shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("model.safetensors")))


def assert_equals_deepspeed(reader: ZeroCheckpointReader, expected: dict[str, torch.Tensor]) -> None:
    infos = reader.tensor_infos()
    assert list(infos) == list(expected)
    for name, tensor in expected.items():
        got = reader.read(name)
        assert not got.requires_grad, name
        assert got.dtype == tensor.dtype == infos[name].dtype, name
        assert tuple(got.shape) == infos[name].shape, name
        assert torch.equal(got, tensor), name


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("saved_weights", [True, False], ids=["with-model-safetensors", "without"])
def test_every_tensor_equals_deepspeeds_consolidation(
    stage, saved_weights, zero_checkpoints, deepspeed_state_dicts, tmp_path
):
    folder = (
        zero_checkpoints[stage] if saved_weights else without_saved_weights(zero_checkpoints[stage], tmp_path / "c")
    )
    assert detect_format(folder, zero_weights=ZERO_MASTER) == ZERO
    with ZeroCheckpointReader(folder) as reader:
        assert reader.stage == stage
        assert_equals_deepspeed(reader, deepspeed_state_dicts[stage])


@pytest.mark.parametrize("stage", STAGES)
def test_trainable_masters_are_fp32_frozen_keep_their_dtype_tied_share_values(stage, zero_checkpoints):
    with ZeroCheckpointReader(zero_checkpoints[stage]) as reader:
        infos = reader.tensor_infos()
        assert infos["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
        assert infos["model.norm.weight"].dtype == torch.bfloat16  # frozen: stored in the training dtype
        assert torch.equal(reader.read("lm_head.weight"), reader.read("model.embed_tokens.weight"))


@pytest.mark.parametrize("stage", STAGES)
def test_masters_round_to_the_saved_16bit_weights(stage, zero_checkpoints):
    """The fp32 masters are the exact version of what the Trainer saved in bfloat16 — and they differ from it."""
    folder = zero_checkpoints[stage]
    saved = load_file(folder / "model.safetensors")
    differing = 0
    with ZeroCheckpointReader(folder) as reader:
        for name, tensor in saved.items():
            master = reader.read(name)
            assert torch.equal(master.to(tensor.dtype), tensor), name
            differing += int(not torch.equal(master, tensor.to(master.dtype)))
    assert differing > 0


def test_saved_weights_are_read_unless_the_masters_are_asked_for(zero_checkpoints, tmp_path):
    folder = zero_checkpoints[2]
    assert detect_format(folder) == SAFETENSORS
    assert detect_format(folder, zero_weights=ZERO_SAVED) == SAFETENSORS
    assert detect_format(folder, zero_weights=ZERO_MASTER) == ZERO
    assert detect_format(without_saved_weights(folder, tmp_path / "c")) == ZERO


@pytest.mark.parametrize("stage", STAGES)
def test_each_read_owns_only_its_tensor(stage, zero_checkpoints):
    """A read copies the parameter's slices out of the mapped partitions: its storage is the tensor
    (ZeRO-3: plus padding below the world size), never a view into a whole flat group."""
    with ZeroCheckpointReader(zero_checkpoints[stage]) as reader:
        for name in reader.tensor_infos():
            tensor = reader.read(name)
            assert tensor.is_contiguous()
            assert tensor.untyped_storage().nbytes() < tensor.nbytes + 2 * tensor.element_size(), name


def test_the_global_step_folder_itself_and_an_explicit_tag_read_the_same(zero_checkpoints, deepspeed_state_dicts):
    folder = zero_checkpoints[3]
    for reader in (ZeroCheckpointReader(folder / TAG), ZeroCheckpointReader(folder, tag=TAG)):
        with reader:
            assert_equals_deepspeed(reader, deepspeed_state_dicts[3])


def test_a_missing_rank_is_an_error_naming_the_count(zero_checkpoints, tmp_path):
    folder = without_saved_weights(zero_checkpoints[3], tmp_path / "c")
    next((folder / TAG).glob("*zero_pp_rank_1_*optim_states.pt")).unlink()
    with pytest.raises(CheckpointError, match=r"holds 1 \*_optim_states.pt file\(s\) but the run had 2"):
        ZeroCheckpointReader(folder)


def test_latest_naming_a_missing_folder_is_an_error(zero_checkpoints, tmp_path):
    folder = without_saved_weights(zero_checkpoints[2], tmp_path / "c")
    (folder / "latest").write_text("global_step9")
    with pytest.raises(CheckpointError, match=r"latest names 'global_step9', but .*global_step9 does not exist"):
        ZeroCheckpointReader(folder)


def test_several_steps_without_latest_ask_for_the_tag(zero_checkpoints, tmp_path):
    folder = without_saved_weights(zero_checkpoints[2], tmp_path / "c")
    (folder / "latest").unlink()
    shutil.copytree(folder / TAG, folder / "global_step4")
    with pytest.raises(CheckpointError, match=r"global_step2, global_step4.*pass the tag"):
        ZeroCheckpointReader(folder)


class Payload:
    """Stands for any non-DeepSpeed object a pickle could smuggle in."""


def test_a_pickle_naming_foreign_code_is_refused(zero_checkpoints, tmp_path):
    folder = without_saved_weights(zero_checkpoints[2], tmp_path / "c")
    states = folder / TAG / "mp_rank_00_model_states.pt"
    state = torch.load(states, weights_only=False)
    torch.save({**state, "extra": Payload()}, states)
    with pytest.raises(CheckpointError, match=r"names tests\.checkpoints\.test_zero_reader\.Payload.*for safety"):
        ZeroCheckpointReader(folder)


def test_a_deepspeed_without_what_the_reader_uses_is_one_error_naming_the_version():
    from deepspeed.utils import zero_to_fp32

    assert check_zero_to_fp32(zero_to_fp32) is zero_to_fp32  # the installed one has everything
    older = types.ModuleType("zero_to_fp32")  # what DeepSpeed 0.15's module lacks: the lazy GatheredTensor
    for name in NEEDED[:-1]:
        setattr(older, name, getattr(zero_to_fp32, name))
    expected = r"needs deepspeed>=0\.16; the installed .* lacks zero_to_fp32\.GatheredTensor"
    with pytest.raises(CheckpointError, match=expected):
        check_zero_to_fp32(older)
