"""Saliency histograms and ownership per layer type, from the report of the merge that was written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from obim_trainer.calibration import ActivationStats
from obim_trainer.calibration.preparation import prepare_calibration
from obim_trainer.checkpoints import open_checkpoint
from obim_trainer.pipeline.merge import merge_checkpoints_on_ranks
from obim_trainer.tracking import block_group, layer_type, sampled_blocks, summarize_report


def test_layer_type_drops_the_block():
    assert layer_type("model.layers.7.mlp.up_proj.weight") == "mlp.up_proj"
    assert layer_type("transformer.h.0.attn.c_attn.bias") == "attn.c_attn.bias"
    assert layer_type("lm_head.weight") == "lm_head"


def test_sampled_blocks_are_evenly_spaced_with_both_ends():
    assert sampled_blocks(set(range(32)), 3) == [0, 16, 31]
    assert sampled_blocks(set(range(32)), 1) == [16]
    assert sampled_blocks({0, 1}, 3) == [0, 1]


@pytest.fixture(scope="module")
def merges(llama_family, calibration_jsonl, tmp_path_factory):
    """One real OBIM merge and one task-arithmetic merge of the family, with the engine's saliency on 1 block."""
    base, ckpts = llama_family
    root = tmp_path_factory.mktemp("summary")
    common = {"base": base, "checkpoints": ckpts, "calibration_data": calibration_jsonl, "progress": False}
    obim = merge_checkpoints_on_ranks(_config(common, method="obim", output=root / "obim"), saliency_blocks=1)
    plain = merge_checkpoints_on_ranks(_config(common, method="task_arithmetic", output=root / "ta"), saliency_blocks=1)
    return common, obim, plain


def _config(common, **values):
    from obim_trainer.settings.merge import MergeConfig

    return MergeConfig.build({**common, **values})


def test_ownership_is_the_merges_own_count_over_every_block(merges):
    _, obim, _ = merges
    layers = summarize_report(obim.report, obim.plan)
    assert set(layers) >= {"self_attn.q_proj", "mlp.down_proj", "input_layernorm"}
    q_proj = layers["self_attn.q_proj"]
    names = [t.name for t in obim.plan.tensors if layer_type(t.name) == "self_attn.q_proj"]
    assert len(names) == 2 and q_proj.numel == 2 * 64 * 64  # every block, not a sample
    assert q_proj.owned == [sum(obim.report.owned[n][k] for n in names) for k in range(3)]
    assert q_proj.retained_fraction() == 1.0  # n_k = 1/K: every position comes from one checkpoint
    assert q_proj.ownership_share() == pytest.approx([1 / 3] * 3, abs=0.05)
    assert obim.manifest["ownership_share"] == pytest.approx(obim.report.ownership_share(3))


def test_histograms_are_eq5_on_the_sampled_block_of_the_merge(merges):
    common, obim, _ = merges
    base, ckpts = common["base"], common["checkpoints"]
    (block,) = {int(n.split(".")[2]) for n in obim.report.log_saliency}
    assert block == sampled_blocks({0, 1}, 1)[0]
    histograms = summarize_report(obim.report, obim.plan)["mlp.up_proj"].histograms(bins=10)
    assert len(histograms) == 3 and all(h is not None for h in histograms)
    # eq. 5 from the files: s = mean(x²)·δ² of checkpoint 0, with its statistics measured here
    calibration = prepare_calibration(_config(common, method="obim", dry_run=True), base)
    stats = ActivationStats.collect(AutoModelForCausalLM.from_pretrained(ckpts[0]), calibration, progress=False)
    name = f"model.layers.{block}.mlp.up_proj.weight"
    with open_checkpoint(base) as b, open_checkpoint(ckpts[0]) as c:
        scores = (stats.input_sq_mean(name) * (c.read(name) - b.read(name)).square()).flatten()
    log_scores = scores[scores > 0].log10()
    assert sum(histograms[0].counts) == log_scores.numel()
    assert torch.allclose(obim.report.log_saliency[name][0].sort().values, log_scores.sort().values, atol=1e-4)


def test_methods_without_statistics_have_no_saliency_or_ownership(merges):
    _, _, plain = merges
    layers = summarize_report(plain.report, plain.plan)
    assert not plain.report.log_saliency
    assert all(h is None for h in layers["mlp.up_proj"].histograms(8))
    assert layers["mlp.up_proj"].ownership_share() is None


def test_grouping_by_block_splits_each_blocks_ownership(merges):
    _, obim, _ = merges
    by_block = summarize_report(obim.report, obim.plan, group_by=block_group)
    by_type = summarize_report(obim.report, obim.plan)
    assert sorted(by_block) == ["block 0", "block 1"]
    assert sum(s.numel for s in by_block.values()) == sum(s.numel for s in by_type.values())
    totals = [sum(s.owned[k] for s in by_block.values()) for k in range(3)]
    assert totals == [sum(s.owned[k] for s in by_type.values()) for k in range(3)]
    rotation = [by_block[b].ownership_share() for b in ("block 0", "block 1")]
    assert rotation[0] != rotation[1]  # the merge order rotates by block, so the shares differ


def test_sampling_saliency_leaves_the_merged_bytes_as_they_are(merges, tmp_path):
    common, obim, _ = merges
    unsampled = merge_checkpoints_on_ranks(_config(common, method="obim", output=tmp_path / "plain"))
    assert not unsampled.report.log_saliency
    ours, theirs = load_file(obim.output / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert unsampled.report.owned == obim.report.owned
