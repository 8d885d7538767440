"""Token-weighted next-token loss and perplexity per language, on live models and model folders."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import AutoTokenizer

from obim_trainer.calibration import CalibrationSet, tokenize_calibration
from obim_trainer.evaluation import PerLanguageEvaluator, metric_names
from tests.conftest import make_texts, make_tiny_llama


def reference_loss(model, samples: CalibrationSet) -> float:
    """One unpadded sample at a time, summed in float64 over every predicted token."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids in samples.input_ids:
            logits = model(input_ids=ids[None]).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
            tokens += ids.numel() - 1
    return total / tokens


@pytest.fixture
def sets(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return {
        "en": tokenize_calibration(make_texts(7, seed=3), tokenizer, max_length=40),
        "ja": tokenize_calibration(make_texts(5, seed=4, max_words=10), tokenizer, max_length=40),
    }


def test_loss_is_the_mean_over_predicted_tokens_whatever_the_batching(sets):
    model = make_tiny_llama(seed=1)
    batched = PerLanguageEvaluator(sets, batch_size=3).evaluate_model(model, "cpu")
    for language, samples in sets.items():
        loss, perplexity = metric_names(language)
        assert batched[loss] == pytest.approx(reference_loss(model, samples), rel=1e-5)
        assert batched[perplexity] == pytest.approx(math.exp(batched[loss]), rel=1e-12)
    one_by_one = PerLanguageEvaluator(sets, batch_size=1).evaluate_model(model, "cpu")
    assert one_by_one == pytest.approx(batched, rel=1e-5)


def test_training_mode_is_restored(sets):
    model = make_tiny_llama(seed=1).train()
    PerLanguageEvaluator(sets).evaluate_model(model, "cpu")
    assert model.training


def test_a_folder_scores_as_the_same_model_in_memory(sets, llama_family):
    from transformers import AutoModelForCausalLM

    folder = llama_family[1][1]
    evaluator = PerLanguageEvaluator(sets, batch_size=4, prefix="merged_")
    from_folder = evaluator.evaluate_folder(folder)
    assert set(from_folder) == {"merged_en_loss", "merged_en_perplexity", "merged_ja_loss", "merged_ja_perplexity"}
    assert from_folder == evaluator.evaluate_model(AutoModelForCausalLM.from_pretrained(folder), "cpu")


def test_a_language_with_nothing_to_predict_has_no_metric(caplog):
    sets = {"xx": CalibrationSet([torch.tensor([5]), torch.tensor([7])], pad_token_id=0)}
    with caplog.at_level(logging.WARNING):
        assert PerLanguageEvaluator(sets).evaluate_model(make_tiny_llama(), "cpu") == {}
    assert "'xx' has no token to predict" in caplog.text
