"""Format detection: every format a run leaves, which one wins when a folder holds several, and the
one error for a folder that holds none. (Real ZeRO runs are detected in test_zero_reader.py; here
a DeepSpeed checkpoint is its file layout, which is all detection looks at.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from obim_trainer.checkpoints.detect import (
    BIN,
    BIN_SHARDED,
    PEFT_LORA,
    SAFETENSORS,
    SAFETENSORS_OTHER,
    SAFETENSORS_SHARDED,
    ZERO,
    ZERO_MASTER,
    ZERO_SAVED,
    detect_format,
)
from obim_trainer.errors import CheckpointError, ConfigError
from tests.conftest import make_tiny_llama

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """One folder per format, as save_pretrained / torch.save / peft / DeepSpeed lay them out."""
    root = tmp_path_factory.mktemp("formats")
    model = make_tiny_llama(seed=2)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.save_pretrained(root / SAFETENSORS)
    model.save_pretrained(root / SAFETENSORS_SHARDED, max_shard_size="60KB")
    (root / BIN).mkdir()
    torch.save(state, root / BIN / "pytorch_model.bin")
    (root / BIN_SHARDED).mkdir()
    names = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, members in shards.items():
        torch.save({n: state[n] for n in members}, root / BIN_SHARDED / shard)
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (root / BIN_SHARDED / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / SAFETENSORS_OTHER).mkdir()
    save_file(state, root / SAFETENSORS_OTHER / "consolidated.safetensors")
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(root / PEFT_LORA)
    zero_layout(root / ZERO)
    return {
        fmt: root / fmt
        for fmt in (SAFETENSORS, SAFETENSORS_SHARDED, BIN, BIN_SHARDED, SAFETENSORS_OTHER, PEFT_LORA, ZERO)
    }


def zero_layout(folder: Path, step: int = 2) -> Path:
    """The files a DeepSpeed save leaves in a Trainer checkpoint (contents do not matter to detection)."""
    tag = folder / f"global_step{step}"
    tag.mkdir(parents=True)
    (folder / "latest").write_text(tag.name)
    for name in ("mp_rank_00_model_states.pt", *(f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1))):
        (tag / name).write_bytes(b"")
    return folder


def combined(dest: Path, *sources: Path) -> Path:
    for source in sources:
        shutil.copytree(source, dest, dirs_exist_ok=True)
    return dest


@pytest.mark.parametrize(
    "fmt", [SAFETENSORS, SAFETENSORS_SHARDED, BIN, BIN_SHARDED, SAFETENSORS_OTHER, PEFT_LORA, ZERO]
)
def test_every_format_is_detected(fmt, folders):
    assert detect_format(folders[fmt]) == fmt


def test_the_global_step_folder_itself_is_a_zero_checkpoint(folders):
    assert detect_format(folders[ZERO] / "global_step2") == ZERO


def test_saved_weights_win_over_zero_masters_unless_masters_are_asked_for(folders, tmp_path):
    folder = combined(tmp_path / "c", folders[ZERO], folders[SAFETENSORS])
    assert detect_format(folder) == SAFETENSORS
    assert detect_format(folder, zero_weights=ZERO_SAVED) == SAFETENSORS
    assert detect_format(folder, zero_weights=ZERO_MASTER) == ZERO


def test_asking_for_saved_weights_that_are_not_there_is_an_error(folders):
    assert detect_format(folders[ZERO]) == ZERO
    with pytest.raises(CheckpointError, match=r"zero_weights='saved' .* holds only DeepSpeed's ZeRO shards"):
        detect_format(folders[ZERO], zero_weights=ZERO_SAVED)


def test_an_adapter_wins_over_the_deepspeed_checkpoint_beside_it(folders, tmp_path):
    assert detect_format(combined(tmp_path / "c", folders[ZERO], folders[PEFT_LORA])) == PEFT_LORA


def test_safetensors_win_over_bin_as_in_transformers(folders, tmp_path):
    assert detect_format(combined(tmp_path / "c", folders[BIN], folders[SAFETENSORS])) == SAFETENSORS


def test_saved_weights_are_read_when_the_deepspeed_states_were_deleted(folders, tmp_path):
    folder = combined(tmp_path / "c", folders[ZERO], folders[SAFETENSORS])
    shutil.rmtree(folder / "global_step2")  # what users do to save space; `latest` stays
    assert detect_format(folder) == SAFETENSORS
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"latest names global_step2, but global_step2/ .* is missing"):
        detect_format(folder)


def test_an_unrecognised_folder_lists_what_it_holds(tmp_path):
    folder = tmp_path / "run"
    (folder / "logs").mkdir(parents=True)
    (folder / "notes.txt").write_text("x")
    (folder / "weights.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError) as caught:
        detect_format(folder)
    message = str(caught.value)
    assert "found: logs/, notes.txt, weights.pt" in message
    assert "Supported:" in message and "DeepSpeed ZeRO" in message and "PEFT LoRA" in message


@pytest.mark.parametrize(
    ("make", "hint"),
    [
        (lambda f: (f / "adapter_config.json").write_text("{}"), "no adapter_model.safetensors"),
        (lambda f: (f / "global_step4").mkdir(), r"global_step\* folders without"),
        (lambda f: (f / "config.json").write_text("{}"), "config.json but no weights"),
    ],
    ids=["adapter-config-only", "empty-global-step", "config-only"],
)
def test_near_misses_say_what_is_missing(make, hint, tmp_path):
    make(tmp_path)
    with pytest.raises(CheckpointError, match=hint):
        detect_format(tmp_path)


def test_several_safetensors_without_an_index_are_ambiguous(folders, tmp_path):
    folder = combined(tmp_path / "c", folders[SAFETENSORS_OTHER])
    shutil.copy(folder / "consolidated.safetensors", folder / "second.safetensors")
    with pytest.raises(CheckpointError, match=r"several safetensors files \(consolidated.safetensors, second"):
        detect_format(folder)


def test_a_missing_path_a_file_and_a_bad_choice_are_errors(folders, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        detect_format(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        detect_format(folders[BIN] / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="zero_weights must be"):
        detect_format(folders[ZERO], zero_weights="fp16")
