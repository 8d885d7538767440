"""The empirical Fisher diagonal mean_b (∇L_b)²: equal to a brute-force autograd computation, the live
model's gradients untouched, stored and read back one tensor (or row range) at a time."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from obim_trainer.calibration import CalibrationSet, tokenize_calibration
from obim_trainer.calibration.fisher_stats import FISHER_BATCH_SIZE, FisherStats
from obim_trainer.errors import CalibrationError
from tests.conftest import make_texts, make_tiny_gpt2, make_tiny_llama


@pytest.fixture(scope="module")
def calibration(tokenizer_dir) -> CalibrationSet:
    return tokenize_calibration(make_texts(10, seed=5), AutoTokenizer.from_pretrained(tokenizer_dir), max_length=64)


def brute_force_fisher(model, calibration: CalibrationSet) -> dict[str, torch.Tensor]:
    """Per batch of 4 texts: the mean next-token cross-entropy over real tokens written out, ``backward``
    on a copy, gradients squared in float64 and averaged over the batches."""
    model = copy.deepcopy(model).eval()
    sums: dict[str, torch.Tensor] = {}
    batches = list(calibration.batches(FISHER_BATCH_SIZE))
    for ids, mask in batches:
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets, real = ids[:, 1:], mask[:, 1:].bool()
        loss = F.cross_entropy(logits[real].float(), targets[real])
        loss.backward()
        for name, p in model.named_parameters():
            sums[name] = sums.get(name, 0) + p.grad.double() ** 2
    return {name: s / len(batches) for name, s in sums.items()}


@pytest.mark.parametrize("factory", [make_tiny_llama, make_tiny_gpt2])
def test_fisher_equals_a_brute_force_autograd_computation(factory, calibration):
    model = factory(seed=3)
    fisher = FisherStats.collect(model, calibration, progress=False)
    expected = brute_force_fisher(model, calibration)
    assert fisher.names == set(expected) and fisher.batches == 3  # 10 texts in batches of 4
    for name, value in expected.items():
        got = fisher.fisher(name)
        assert got.dtype == torch.float32 and got.shape == value.shape
        torch.testing.assert_close(got.double(), value, rtol=1e-4, atol=1e-12)
    assert bool((fisher.fisher("lm_head.weight" if factory is make_tiny_llama else "transformer.wte.weight") > 0).any())


def test_the_live_model_keeps_its_gradients_flags_and_mode(calibration):
    model = make_tiny_llama(seed=1).train()
    model.model.norm.weight.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    fisher = FisherStats.collect(model, calibration, progress=False)
    assert model.training and not model.model.norm.weight.requires_grad
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
    assert bool((fisher.fisher("model.norm.weight") > 0).all()), "a frozen parameter has a Fisher too"


def test_saved_fishers_read_back_whole_or_by_rows(calibration, tmp_path):
    fisher = FisherStats.collect(make_tiny_llama(seed=1), calibration, progress=False)
    name = "model.embed_tokens.weight"
    whole = fisher.fisher(name)
    fisher.save(tmp_path / "f.safetensors", key="k")
    loaded = FisherStats.load(tmp_path / "f.safetensors", expected_key="k")
    assert fisher.sums is None and loaded.batches == 3 and loaded.names == fisher.names
    for source in (fisher, loaded):
        assert torch.equal(source.fisher(name), whole)
        assert torch.equal(source.fisher(name, slice(10, 20)), whole[10:20])
    assert loaded.fisher("no.such.weight") is None
    with pytest.raises(CalibrationError, match="other inputs"):
        FisherStats.load(tmp_path / "f.safetensors", expected_key="other")


def test_text_with_nothing_to_predict_is_an_error():
    with pytest.raises(CalibrationError, match="longer than one token"):
        FisherStats.collect(make_tiny_llama(), CalibrationSet([torch.tensor([5])], 0), progress=False)
