"""Saliency histograms and ownership per layer type, measured on sampled decoder blocks of a merge."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from obim_trainer.calibration import ActivationStats, tokenize_calibration
from obim_trainer.checkpoints import open_checkpoint
from obim_trainer.merging import build_method
from obim_trainer.tracking import block_group, layer_type, sampled_blocks, summarize_merge
from tests.conftest import make_texts


def test_layer_type_drops_the_block():
    assert layer_type("model.layers.7.mlp.up_proj.weight") == "mlp.up_proj"
    assert layer_type("transformer.h.0.attn.c_attn.bias") == "attn.c_attn.bias"
    assert layer_type("lm_head.weight") == "lm_head"


def test_sampled_blocks_are_evenly_spaced_with_both_ends():
    assert sampled_blocks(set(range(32)), 3) == [0, 16, 31]
    assert sampled_blocks(set(range(32)), 1) == [16]
    assert sampled_blocks({0, 1}, 3) == [0, 1]


@pytest.fixture(scope="module")
def family_stats(llama_family, tokenizer_dir):
    base, ckpts = llama_family
    calibration = tokenize_calibration(make_texts(6, seed=9), AutoTokenizer.from_pretrained(tokenizer_dir), 32)
    stats = [
        ActivationStats.collect(AutoModelForCausalLM.from_pretrained(c), calibration, progress=False) for c in ckpts
    ]
    return base, ckpts, stats


def test_obim_shares_every_position_among_the_checkpoints(family_stats):
    base, ckpts, stats = family_stats
    layers = summarize_merge(base, ckpts, build_method("obim", {}, num_models=3), stats, blocks=1)
    assert set(layers) >= {"self_attn.q_proj", "mlp.down_proj", "input_layernorm"}
    q_proj = layers["self_attn.q_proj"]
    assert q_proj.numel == 64 * 64  # one sampled block
    assert q_proj.retained_fraction() == 1.0  # n_k = 1/K: every position comes from one checkpoint
    assert q_proj.ownership_share() == pytest.approx([1 / 3] * 3, abs=1 / q_proj.numel)


def test_histograms_cover_each_checkpoints_saliency(family_stats):
    base, ckpts, stats = family_stats
    layers = summarize_merge(base, ckpts[:2], build_method("obim", {}, num_models=2), stats[:2], blocks=2)
    histograms = layers["mlp.up_proj"].histograms(bins=10)
    assert len(histograms) == 2 and all(h is not None for h in histograms)
    # eq. 5 computed here from the files: s = mean(x²)·δ² over both blocks of checkpoint 0
    with open_checkpoint(base) as b, open_checkpoint(ckpts[0]) as c:
        scores = torch.cat(
            [
                (stats[0].input_sq_mean(name) * (c.read(name) - b.read(name)).square()).flatten()
                for name in (f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1))
            ]
        )
    log_scores = scores[scores > 0].log10()
    first = histograms[0]
    assert sum(first.counts) == log_scores.numel()
    assert len(first.edges) == 11
    assert first.edges[0] <= float(log_scores.min()) + 1e-4 and first.edges[-1] >= float(log_scores.max()) - 1e-4


def test_methods_without_statistics_have_no_saliency(family_stats):
    base, ckpts, _ = family_stats
    layers = summarize_merge(base, ckpts, build_method("task_arithmetic", {}, num_models=3), [None] * 3, blocks=1)
    assert all(h is None for h in layers["mlp.up_proj"].histograms(8))
    assert layers["mlp.up_proj"].ownership_share() is None


def test_grouping_by_block_splits_each_blocks_ownership(family_stats):
    base, ckpts, stats = family_stats
    method = build_method("obim", {}, num_models=3)
    by_block = summarize_merge(base, ckpts, method, stats, blocks=2, group_by=block_group)
    by_type = summarize_merge(base, ckpts, method, stats, blocks=2)
    assert sorted(by_block) == ["block 0", "block 1"]
    assert sum(s.numel for s in by_block.values()) == sum(s.numel for s in by_type.values())
    totals = [sum(s.owned[k] for s in by_block.values()) for k in range(3)]
    assert totals == [sum(s.owned[k] for s in by_type.values()) for k in range(3)]
    rotation = [by_block[b].ownership_share() for b in ("block 0", "block 1")]
    assert rotation[0] != rotation[1]  # the merge order rotates by block, so the shares differ
