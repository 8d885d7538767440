"""PEFT LoRA adapters trained by a real Trainer, read as full models and checked against peft's merge_and_unload()."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from obim_trainer.calibration import ActivationStats
from obim_trainer.calibration.data import CalibrationSet
from obim_trainer.checkpoints import open_checkpoint
from obim_trainer.checkpoints.lora_reader import LoraCheckpointReader
from obim_trainer.errors import CheckpointError
from obim_trainer.merging import build_method
from obim_trainer.pipeline.engine import MergeEngine, plan_merge
from obim_trainer.pipeline.layout import ModelLayout
from tests.checkpoints.lora_run import merged_state_dict, train_adapter
from tests.conftest import VOCAB_SIZE, make_tiny_gpt2, make_tiny_llama

peft = pytest.importorskip("peft")

LLAMA_ADAPTERS = {
    "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
    "rslora-patterns-embedding": {
        "r": 4,
        "lora_alpha": 16,
        "use_rslora": True,
        "target_modules": ["q_proj", "v_proj", "embed_tokens"],
        "modules_to_save": ["lm_head"],
        "rank_pattern": {"layers.1.self_attn.q_proj": 2},
        "alpha_pattern": {"v_proj": 6},
    },
}
GPT2_ADAPTER = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["c_attn", "c_proj"],
    "fan_in_fan_out": True,
    "lora_bias": True,
}


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lora") / "base"
    make_tiny_llama(seed=5).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_adapters(llama_base) -> dict[str, Path]:
    return {
        name: train_adapter(llama_base, llama_base.parent / name, config, seed=i)
        for i, (name, config) in enumerate(LLAMA_ADAPTERS.items())
    }


@pytest.fixture(scope="module")
def gpt2_adapter(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("lora_gpt2") / "base"
    make_tiny_gpt2(seed=6).save_pretrained(base)
    return base, train_adapter(base, base.parent / "lora", GPT2_ADAPTER, seed=3)


def edited_copy(adapter: Path, dest: Path, **config: object) -> Path:
    """A copy of ``adapter`` whose adapter_config.json has ``config`` written over it."""
    shutil.copytree(adapter, dest)
    file = dest / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **config}))
    return dest


def assert_equals_merged(base: Path, adapter: Path) -> None:
    expected = merged_state_dict(base, adapter)
    with open_checkpoint(base) as base_reader, LoraCheckpointReader(adapter, base_reader) as reader:
        infos = reader.tensor_infos()
        assert list(infos) == list(base_reader.tensor_infos())
        assert set(infos) <= set(expected)
        for name, info in infos.items():
            tensor = reader.read(name)
            assert (tensor.dtype, tuple(tensor.shape)) == (info.dtype, info.shape), name
            assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("adapter", list(LLAMA_ADAPTERS))
def test_llama_adapter_equals_merge_and_unload(adapter, llama_base, llama_adapters):
    assert_equals_merged(llama_base, llama_adapters[adapter])


def test_conv1d_fan_in_fan_out_and_lora_bias_equal_merge_and_unload(gpt2_adapter):
    base_dir, adapter = gpt2_adapter
    assert_equals_merged(base_dir, adapter)
    with open_checkpoint(base_dir) as base, LoraCheckpointReader(adapter, base) as reader:
        name = "transformer.h.0.attn.c_attn.bias"
        assert not torch.equal(reader.read(name), base.read(name))  # lora_B.bias moved the base bias


def test_task_vectors_are_low_rank_where_targeted_and_zero_elsewhere(llama_base, llama_adapters):
    with open_checkpoint(llama_base) as base, LoraCheckpointReader(llama_adapters["lora"], base) as reader:
        for name in reader.tensor_infos():
            delta = reader.read(name).float() - base.read(name).float()
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                assert 0 < int(torch.linalg.matrix_rank(delta)) <= 4, name
            elif name == "lm_head.weight":  # modules_to_save: a full, trained tensor
                assert int(torch.linalg.matrix_rank(delta)) > 4
            else:
                assert not delta.any(), name


def test_obim_over_adapters_equals_obim_over_merged_models(llama_base, llama_adapters, tmp_path):
    """The issue's acceptance test: the merge of LoRA checkpoints is the merge of their merged models."""
    from transformers import AutoModelForCausalLM

    merged_dirs, stats = [], []
    calibration = CalibrationSet(
        [torch.randint(4, VOCAB_SIZE, (12,), generator=torch.Generator()) for _ in range(4)], 0
    )
    for name, adapter in llama_adapters.items():
        model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_base), adapter)
        model = model.merge_and_unload()
        model.save_pretrained(tmp_path / name)
        merged_dirs.append(tmp_path / name)
        stats.append(ActivationStats.collect(model, calibration, progress=False))
    layout = ModelLayout.from_pretrained_dir(llama_base)
    method = build_method("obim", None, num_models=len(stats))

    def merge(readers) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        engine = MergeEngine(base, readers, method, layout, stats, seed=7)
        engine.run(plan_merge(base, readers, layout), out.__setitem__, progress=False)
        return out

    with open_checkpoint(llama_base) as base:
        from_adapters = merge([LoraCheckpointReader(a, base) for a in llama_adapters.values()])
        from_merged = merge([open_checkpoint(d) for d in merged_dirs])
        changed = [n for n in from_merged if not torch.equal(from_merged[n], base.read(n))]
    assert from_adapters.keys() == from_merged.keys()
    assert all(torch.equal(from_adapters[n], from_merged[n]) for n in from_merged)
    assert "lm_head.weight" in changed and "model.layers.0.self_attn.q_proj.weight" in changed


def test_dora_is_refused_with_the_way_out(llama_base, tmp_path):
    from transformers import AutoModelForCausalLM

    config = peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(llama_base), config).save_pretrained(tmp_path / "dora")
    with open_checkpoint(llama_base) as base, pytest.raises(CheckpointError, match=r"DoRA.*merge_and_unload"):
        LoraCheckpointReader(tmp_path / "dora", base)


def test_a_base_changing_initialisation_is_refused(llama_base, llama_adapters, tmp_path):
    adapter = edited_copy(llama_adapters["lora"], tmp_path / "pissa", init_lora_weights="pissa")
    with open_checkpoint(llama_base) as base, pytest.raises(CheckpointError, match="path_initial_model_for_weight"):
        LoraCheckpointReader(adapter, base)


def test_a_config_whose_rank_differs_from_the_weights_is_an_error(llama_base, llama_adapters, tmp_path):
    adapter = edited_copy(llama_adapters["lora"], tmp_path / "r8", r=8)
    with open_checkpoint(llama_base) as base, pytest.raises(CheckpointError, match=r"rank 8 but .* holds rank 4"):
        LoraCheckpointReader(adapter, base)


def test_a_different_local_base_than_recorded_is_an_error(llama_base, llama_adapters, tmp_path):
    other = tmp_path / "other"
    make_tiny_llama(seed=99).save_pretrained(other)
    with open_checkpoint(other) as base, pytest.raises(CheckpointError, match=f"trained on {llama_base}.*differs"):
        LoraCheckpointReader(llama_adapters["lora"], base)


def test_an_adapter_of_another_architecture_names_the_missing_tensor(llama_base, gpt2_adapter):
    with open_checkpoint(llama_base) as base, pytest.raises(CheckpointError, match=r"updates transformer\.h\.0\."):
        LoraCheckpointReader(gpt2_adapter[1], base)


def test_a_copy_of_the_recorded_base_is_accepted_with_a_warning(llama_base, llama_adapters, tmp_path, caplog):
    copy = Path(shutil.copytree(llama_base, tmp_path / "copy"))
    with caplog.at_level(logging.WARNING), open_checkpoint(copy) as base:
        LoraCheckpointReader(llama_adapters["lora"], base).close()
    assert "holds the same weights" in caplog.text


def test_a_hub_base_cannot_be_checked_and_says_so(llama_base, llama_adapters, tmp_path, caplog):
    adapter = edited_copy(llama_adapters["lora"], tmp_path / "hub", base_model_name_or_path="org/some-model")
    with caplog.at_level(logging.WARNING), open_checkpoint(llama_base) as base:
        LoraCheckpointReader(adapter, base).close()
    assert "'org/some-model', which is not a local folder" in caplog.text


def test_the_fingerprint_follows_the_scaling(llama_base, llama_adapters, tmp_path):
    adapter = edited_copy(llama_adapters["lora"], tmp_path / "a", lora_alpha=8)
    with open_checkpoint(llama_base) as base:
        before = LoraCheckpointReader(adapter, base).fingerprint()
        edited_copy(adapter, tmp_path / "b", lora_alpha=16)
        assert LoraCheckpointReader(tmp_path / "b", base).fingerprint() != before
