"""Architectures whose stored tensor names differ from the loaded ones, and MoE routers (issue 15.1–15.2)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from obim_trainer.merging import ParamKind
from obim_trainer.pipeline.layout import ModelLayout
from obim_trainer.pipeline.merge import merge_checkpoints
from tests.conftest import VOCAB_SIZE, perturbed_copy, save_model_folder

NEW_ROWS = 16


def make_tiny_neox(seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(cfg)


def test_gpt_neox_embed_out_is_the_lm_head_and_extended_vocabularies_merge(tokenizer_dir, calibration_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    base = make_tiny_neox()
    base_dir = save_model_folder(base, tmp_path / "base", tokenizer_dir)
    assert "embed_out.weight" in load_file(base_dir / "model.safetensors")  # stored name, not the loaded one
    layout = ModelLayout.from_pretrained_dir(base_dir)
    assert layout.model_name("embed_out.weight") == "lm_head.weight" == layout.output_embedding
    assert layout.kind("embed_out.weight") is ParamKind.LINEAR and layout.is_vocabulary_tensor("embed_out.weight")

    ckpts = []
    for i in range(2):
        model = perturbed_copy(base, seed=10 + i, scale=0.05 * (i + 1))
        model.resize_token_embeddings(VOCAB_SIZE + NEW_ROWS)
        ckpts.append(save_model_folder(model, tmp_path / f"checkpoint-{i + 1}", tokenizer_dir))
    result = merge_checkpoints(
        base=base_dir, checkpoints=ckpts, calibration_data=calibration_jsonl, output=tmp_path / "m", progress=False
    )
    merged = load_file(Path(result.output) / "model.safetensors")
    assert merged["embed_out.weight"].shape == (VOCAB_SIZE + NEW_ROWS, 64)
    sds = [load_file(c / "model.safetensors") for c in ckpts]
    new = merged["embed_out.weight"][VOCAB_SIZE:]
    assert bool(torch.stack([sd["embed_out.weight"][VOCAB_SIZE:] == new for sd in sds]).any(0).all())
    loaded = AutoModelForCausalLM.from_pretrained(result.output)
    assert torch.equal(loaded.get_output_embeddings().weight, merged["embed_out.weight"])


def make_tiny_mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return MixtralForCausalLM(cfg)


def test_mixtral_router_is_scored_from_the_hidden_states_it_reads(tokenizer_dir, calibration_jsonl, tmp_path):
    from obim_trainer.calibration import ActivationRecorder

    base = make_tiny_mixtral()
    router, stored_router = "model.layers.0.mlp.gate.weight", "model.layers.0.block_sparse_moe.gate.weight"
    base_dir = save_model_folder(base, tmp_path / "base", tokenizer_dir)
    stored = load_file(base_dir / "model.safetensors")
    assert stored_router in stored  # saved under the Mixtral name, loaded as mlp.gate
    layout = ModelLayout.from_pretrained_dir(base_dir)
    assert layout.model_name(stored_router) == router and layout.kind(stored_router) is ParamKind.LINEAR

    ids = torch.randint(3, VOCAB_SIZE, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    recorder = ActivationRecorder(base)
    with recorder.attached(), torch.no_grad():
        recorder.set_token_mask(mask)
        base(input_ids=ids, attention_mask=mask)
    stats = recorder.stats()
    assert stats.count[router] == int(mask.sum())  # real tokens only
    assert stats.sq_sum[router].shape == (64,) and bool((stats.sq_sum[router] > 0).all())

    ckpts = [
        save_model_folder(perturbed_copy(base, seed=10 + i, scale=0.05 * (i + 1)), tmp_path / f"c{i}", tokenizer_dir)
        for i in range(2)
    ]
    # the engine refuses a Linear weight without statistics: this merge finds the router's under its stored name
    result = merge_checkpoints(
        base=base_dir, checkpoints=ckpts, calibration_data=calibration_jsonl, output=tmp_path / "m", progress=False
    )
    merged = load_file(Path(result.output) / "model.safetensors")
    new = merged[stored_router]
    sources = torch.stack([load_file(c / "model.safetensors")[stored_router] == new for c in ckpts])
    assert bool((sources.any(0) | (new == stored[stored_router])).all())  # each entry from the base or a checkpoint
