"""LiNeS' per-layer scales on a 4-block layout."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.errors import ConfigError
from obim_trainer.merging import ParamKind, TensorTask, build_method
from obim_trainer.merging.registry import StatisticsNeeds

K = 2
LAYOUT = [  # (name, kind, block): a 4-block decoder's tensors
    ("model.embed_tokens.weight", ParamKind.EMBEDDING, None),
    ("model.layers.0.self_attn.q_proj.weight", ParamKind.LINEAR, 0),
    ("model.layers.1.input_layernorm.weight", ParamKind.OTHER, 1),
    ("model.layers.2.mlp.up_proj.weight", ParamKind.LINEAR, 2),
    ("model.layers.3.self_attn.o_proj.bias", ParamKind.OTHER, 3),
    ("model.norm.weight", ParamKind.OTHER, None),
    ("lm_head.weight", ParamKind.LINEAR, None),
]


def merged_scale(params, name, kind, block, num_blocks=4):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=gen)
    deltas = [torch.randn(3, 4, generator=gen) for _ in range(K)]
    task = TensorTask.from_tensors(
        name, base, [base + d for d in deltas], kind=kind, block_index=block, num_blocks=num_blocks
    )
    merged = build_method("lines", params, num_models=K).merge(task).tensor
    mean = torch.stack(deltas).mean(0)
    scale = float(((merged - base) * mean).sum() / (mean * mean).sum())
    torch.testing.assert_close(merged, base + scale * mean, rtol=0, atol=1e-5)  # one scale for the whole tensor
    return scale


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]),  # defaults α = 0, β = 1
        ({"alpha": 0.6, "beta": 0.2}, [0.6, 0.6, 0.6 + 0.2 / 3, 0.6 + 0.4 / 3, 0.8, 0.8, 0.8]),
    ],
)
def test_scales_grow_linearly_with_depth(params, expected):
    scales = [merged_scale(params, name, kind, block) for name, kind, block in LAYOUT]
    assert scales == pytest.approx(expected, abs=1e-5)


def test_block_tensors_need_the_number_of_blocks():
    with pytest.raises(ValueError, match="number of decoder blocks is None"):
        merged_scale({}, "model.layers.0.mlp.up_proj.weight", ParamKind.LINEAR, 0, num_blocks=None)
    with pytest.raises(ValueError, match="decoder block 4"):
        merged_scale({}, "model.layers.4.mlp.up_proj.weight", ParamKind.LINEAR, 4, num_blocks=4)


def test_needs_no_statistics_and_refuses_unknown_params():
    assert build_method("lines", {}, num_models=2).statistics() == StatisticsNeeds()
    with pytest.raises(ConfigError, match="Parameters it accepts: alpha, beta"):
        build_method("lines", {"gamma": 1}, num_models=2)
