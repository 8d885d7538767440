"""Builders for single-tensor merge tests."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.merging import ParamKind, TensorTask, build_method


def random_family(k: int = 3, shape=(8, 12), seed: int = 0, scale: float = 0.1):
    """A random base and ``k`` checkpoints that differ from it by Gaussian noise of std ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return base, [base + scale * torch.randn(shape, generator=gen) for _ in range(k)]


def make_task(base, ckpts, *, kind=ParamKind.OTHER, seed: int = 0, name="model.layers.0.mlp.up_proj.weight", **kw):
    return TensorTask.from_tensors(name, base, ckpts, kind=kind, seed=seed, **kw)


def run(method: str, params: dict, base: torch.Tensor, ckpts, *, kind=ParamKind.OTHER, seed: int = 0, **kw):
    """Merge one tensor with a method built by name, as the engine does."""
    task = make_task(base, ckpts, kind=kind, seed=seed, **kw)
    return build_method(method, params, num_models=len(ckpts)).merge(task).tensor


@pytest.fixture
def family():
    return random_family()
