"""Statistics of MoE experts over the tokens routed to them (issue 15.1, issue 18 deliverable 2).

The hand computations route the tokens themselves, from the router logits of the stored (per-expert)
tensors, so they check the hooks and the stored-name mapping together.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F
from transformers import AutoTokenizer

from obim_trainer.calibration import ActivationRecorder, ActivationStats, GramRecorder, tokenize_calibration
from obim_trainer.pipeline.layout import ModelLayout
from obim_trainer.pipeline.merge import merge_checkpoints
from tests.architectures import tiny_causal_lm
from tests.calibration.test_activation_stats import run_two_ranks
from tests.conftest import VOCAB_SIZE, make_texts, perturbed_copy, save_model_folder

EXPERTS, LAYERS = 4, 2


def _moe_inputs(model: torch.nn.Module) -> tuple[list[torch.Tensor], list]:
    """Hooks that keep each sparse block's input hidden states (what its router and experts read)."""
    captured: list[torch.Tensor] = []
    handles = [
        layer.mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().clone()))
        for layer in model.model.layers
    ]
    return captured, handles


def test_each_expert_statistics_and_gram_equal_a_hand_computation_over_its_routed_tokens(tokenizer_dir, tmp_path):
    model = tiny_causal_lm("mixtral")
    stored = load_file(save_model_folder(model, tmp_path / "m", tokenizer_dir) / "model.safetensors")
    layout = ModelLayout.from_pretrained_dir(tmp_path / "m")
    ids = torch.randint(3, VOCAB_SIZE, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    activations, grams = ActivationRecorder(model), GramRecorder(model)
    captured, handles = _moe_inputs(model)
    with activations.attached(), grams.attached(), torch.no_grad():
        activations.set_token_mask(mask)
        grams.set_token_mask(mask)
        model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    stats, gram_stats = activations.stats(), grams.stats()
    keep = mask.flatten().bool()
    for layer, hidden in enumerate(captured):
        prefix = f"model.layers.{layer}.block_sparse_moe"
        h = hidden.reshape(-1, 64)
        router = layout.model_name(f"{prefix}.gate.weight")
        assert stats.count[router] == int(mask.sum())  # the router reads every real token
        chosen = (h @ stored[f"{prefix}.gate.weight"].T).topk(2, dim=-1).indices  # softmax keeps the order
        routed = 0
        for e in range(EXPERTS):
            x = h[(chosen == e).any(-1) & keep]
            w1, w3 = (stored[f"{prefix}.experts.{e}.{w}.weight"] for w in ("w1", "w3"))
            a = F.silu(x @ w1.T) * (x @ w3.T)  # what w2 reads
            first, down = (layout.model_name(f"{prefix}.experts.{e}.{w}.weight") for w in ("w1", "w2"))
            assert layout.model_name(f"{prefix}.experts.{e}.w3.weight") == first  # gate and up read the same x
            assert stats.count[first] == stats.count[down] == gram_stats.count[first] == x.shape[0]
            torch.testing.assert_close(stats.sq_sum[first], x.square().sum(0))
            torch.testing.assert_close(stats.sq_sum[down], a.square().sum(0))
            x64, a64 = x.double(), a.double()
            torch.testing.assert_close(gram_stats.gram(first), x64.T @ x64 / x.shape[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(gram_stats.gram(down), a64.T @ a64 / x.shape[0], rtol=1e-5, atol=1e-6)
            routed += x.shape[0]
        assert routed == 2 * int(mask.sum())  # top-2: every real token reached two experts


def _never_route_to_the_last_expert(model: torch.nn.Module) -> torch.nn.Module:
    """Router rows (w, −w, v, 0) with top-1 routing: the last expert's logit 0 never beats max(|h·w|, h·v)."""
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.mlp.gate.weight
            weight[1] = -weight[0]
            weight[EXPERTS - 1] = 0
    return model


def test_unreached_experts_are_scored_at_random_with_one_warning_and_the_seed_moves_only_them(
    tokenizer_dir, calibration_jsonl, tmp_path, caplog
):
    base = _never_route_to_the_last_expert(tiny_causal_lm("mixtral", num_experts_per_tok=1))
    base_dir = save_model_folder(base, tmp_path / "base", tokenizer_dir)
    ckpts = [
        save_model_folder(
            _never_route_to_the_last_expert(perturbed_copy(base, seed=10 + i, scale=0.05 * (i + 1))),
            tmp_path / f"c{i}",
            tokenizer_dir,
        )
        for i in range(2)
    ]
    merged = []
    for seed in (0, 1):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="obim_trainer"):
            result = merge_checkpoints(
                base=base_dir,
                checkpoints=ckpts,
                calibration_data=calibration_jsonl,
                output=tmp_path / f"seed{seed}",
                stats_beside_checkpoints=True,
                seed=seed,
                progress=False,
            )
        warnings = [r.getMessage() for r in caplog.records if "got no calibration token" in r.getMessage()]
        assert len(warnings) == 1  # once per merge, counted over all checkpoints
        merged.append(load_file(Path(result.output) / "model.safetensors"))
    unreached = int(warnings[0].split(" of ")[0])
    assert warnings[0].startswith(f"{unreached} of {EXPERTS * LAYERS} experts in {LAYERS} layer(s)")
    assert unreached >= LAYERS  # the last expert of every block, maybe more
    last = [n for n in merged[0] if f".experts.{EXPERTS - 1}." in n]
    routed = [n for n in merged[0] if ".experts.0." in n or ".experts.1." in n or n.endswith("gate.weight")]
    assert len(last) == 3 * LAYERS and len(routed) == 7 * LAYERS
    assert all(not torch.equal(merged[0][n], merged[1][n]) for n in last)  # random: the seed decides
    assert all(torch.equal(merged[0][n], merged[1][n]) for n in routed)  # statistics decide, not the seed


@pytest.mark.slow
def test_zero3_partitioned_experts_and_routers_get_the_statistics_of_one_process(tokenizer_dir, tmp_path):
    pytest.importorskip("deepspeed")
    calibration = tokenize_calibration(make_texts(12, seed=5), AutoTokenizer.from_pretrained(tokenizer_dir), 64)
    body = """
        import os
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from tests.architectures import tiny_causal_lm
        deepspeed.init_distributed(dist_backend="gloo")
        zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}
        tiny = tiny_causal_lm("mixtral", seed=2)
        model, *_ = deepspeed.initialize(model=tiny, config=config, model_parameters=list(tiny.parameters()))
        assert tiny.model.layers[0].mlp.experts.gate_up_proj.numel() == 0  # partitioned: no rank holds it
        assert tiny.model.layers[0].mlp.gate.weight.numel() == 0
    """
    run_two_ranks(tmp_path, calibration, body)
    single = ActivationStats.collect(tiny_causal_lm("mixtral", seed=2), calibration, batch_size=3, progress=False)
    reduced = ActivationStats.load(tmp_path / "reduced1.safetensors")
    assert reduced.count == single.count
    assert "model.layers.1.mlp.gate.weight" in single.count and "model.layers.1.mlp.experts.down_proj.3" in single.count
    for name, sums in single.sq_sum.items():
        torch.testing.assert_close(reduced.sq_sum[name], sums, rtol=1e-5, atol=1e-5)
