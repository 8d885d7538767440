"""Next-token loss and perplexity per language, on a model folder or on the model being trained.

Continued pre-training trades the base's languages for the new one; the paper picks the
checkpoints to merge by their evaluation on the new language and judges the merge on all of
them (Table 2). One evaluator scores checkpoints and merged models alike, so their numbers
are comparable: the loss is the mean over every predicted token of the language (padding and
the first token of each sample excluded), perplexity its exponential.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from obim_trainer.calibration import CalibrationSet
from obim_trainer.distributed import Batch, all_reduce, is_distributed, lockstep_batches, plain_model_loading
from obim_trainer.errors import CheckpointError

logger = logging.getLogger(__name__)

METRIC_PREFIX = "obim_"


def metric_names(language: str, prefix: str = METRIC_PREFIX) -> tuple[str, str]:
    """The loss and perplexity metric names of one language (``obim_ja_loss``, ``obim_ja_perplexity``)."""
    return f"{prefix}{language}_loss", f"{prefix}{language}_perplexity"


def _token_loss(model: nn.Module, ids: Tensor, mask: Tensor) -> tuple[float, int]:
    """Summed cross-entropy of every predicted token of a batch and how many there are."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    if not bool(valid.any()):
        return 0.0, 0
    loss = F.cross_entropy(logits[:, :-1][valid].float(), ids[:, 1:][valid], reduction="sum")
    return float(loss), int(valid.sum())


class PerLanguageEvaluator:
    """Token-weighted loss and perplexity of a causal LM on one evaluation set per language.

    Args:
        sets: Tokenized samples per language (see :func:`~obim_trainer.evaluation.load_eval_sets`).
        batch_size: Samples per forward pass.
        prefix: Prefix of the metric names.
    """

    higher_is_better = False

    def __init__(self, sets: Mapping[str, CalibrationSet], *, batch_size: int = 8, prefix: str = METRIC_PREFIX) -> None:
        self.sets = dict(sets)
        self.batch_size = batch_size
        self.prefix = prefix

    @property
    def languages(self) -> list[str]:
        return list(self.sets)

    def language_metric(self, language: str) -> str:
        """The metric that stands for ``language`` in comparison tables: its loss."""
        return metric_names(language, self.prefix)[0]

    def _batches(self, samples: CalibrationSet, distributed: bool) -> Iterator[Batch]:
        if distributed:
            return lockstep_batches(samples, self.batch_size)
        return (Batch(ids, mask) for ids, mask in samples.batches(self.batch_size))

    def evaluate_model(
        self, model: nn.Module, device: torch.device | str, *, distributed: bool = True
    ) -> dict[str, float]:
        """Evaluate a model in memory; with ``distributed`` (and a process group), all ranks share the
        work and must all call this. The model is left in the training mode it had."""
        device = torch.device(device)
        distributed = distributed and is_distributed()
        sums = torch.zeros(2 * len(self.sets), dtype=torch.float64)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for i, samples in enumerate(self.sets.values()):
                    for batch in self._batches(samples, distributed):
                        loss, tokens = _token_loss(model, batch.input_ids.to(device), batch.attention_mask.to(device))
                        if batch.real:
                            sums[2 * i] += loss
                            sums[2 * i + 1] += tokens
        finally:
            model.train(was_training)
        if distributed:
            sums = all_reduce(sums)
        return self._metrics(sums.tolist())

    def _metrics(self, sums: list[float]) -> dict[str, float]:
        metrics = {}
        for i, language in enumerate(self.sets):
            loss_sum, tokens = sums[2 * i], sums[2 * i + 1]
            if tokens == 0:
                logger.warning("evaluation set '%s' has no token to predict; no metric for it", language)
                continue
            loss_name, ppl_name = metric_names(language, self.prefix)
            metrics[loss_name] = loss_sum / tokens
            metrics[ppl_name] = math.exp(min(metrics[loss_name], 700.0))  # exp overflows a float above ~709
        return metrics

    def evaluate_folder(self, folder: Path, device: torch.device | str = "cpu") -> dict[str, float]:
        """Load a model folder in this process alone (also during a ZeRO-3 run) and evaluate it."""
        from transformers import AutoModelForCausalLM

        try:
            with plain_model_loading():
                model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the model in {folder} to evaluate it ({exc})") from None
        try:
            return self.evaluate_model(model.to(device), device, distributed=False)
        finally:
            del model
