"""The input Grams and Fisher diagonals a merge method reads: which model is measured on which text,
computed once per model and calibration set, cached like the activation statistics, recorded.

With ``StatisticsNeeds.per_language`` the base is measured on the old languages' text (what the merge
should keep) and each checkpoint on the new languages' text (what it should add); otherwise every
model on all the calibration text. Each model is built from its reader (the tensors merged, whatever
their format) on the merge's device, measured, and released before the next.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from obim_trainer.calibration import CalibrationSet, load_or_compute_stats, stats_key
from obim_trainer.calibration.fisher_stats import KIND as FISHER_KIND
from obim_trainer.calibration.fisher_stats import FisherStats
from obim_trainer.calibration.gram_stats import KIND as GRAM_KIND
from obim_trainer.calibration.gram_stats import GramStats
from obim_trainer.calibration.languages import LanguageCalibration
from obim_trainer.calibration.stats_cache import StatsOrigin, default_cache_dir, stats_location
from obim_trainer.checkpoints import CheckpointReader
from obim_trainer.checkpoints.model_loading import load_model
from obim_trainer.errors import CheckpointError
from obim_trainer.merging.registry import StatisticsNeeds
from obim_trainer.pipeline.engine import MergePlan, ModelStatistics
from obim_trainer.settings.merge import MergeConfig

logger = logging.getLogger(__name__)

Side = Literal["base", "checkpoints"]
Stats = GramStats | FisherStats


@dataclass(frozen=True)
class StatisticsKind:
    """How one kind of statistics is named, keyed, collected and loaded."""

    name: str
    label: str
    key: str
    collect: Callable[[nn.Module, CalibrationSet, MergeConfig, torch.device, str, Path], Stats]
    """(model, texts, config, device, progress label, folder for a temporary file on the way to the cache)."""
    load: Callable[[Path, str], Stats]


GRAMS = StatisticsKind(
    "grams",
    "input Grams",
    GRAM_KIND,
    lambda model, texts, config, device, desc, spool_dir: GramStats.collect(
        model,
        texts,
        batch_size=config.calibration_batch_size,
        device=device,
        progress=config.progress,
        desc=desc,
        spool_dir=spool_dir,
    ),
    GramStats.load,
)
FISHERS = StatisticsKind(
    "fishers",
    "Fisher diagonals",
    FISHER_KIND,
    lambda model, texts, config, device, desc, _spool_dir: FisherStats.collect(
        model, texts, device=device, progress=config.progress, desc=desc
    ),
    FisherStats.load,
)


def requested_kinds(needs: StatisticsNeeds) -> list[StatisticsKind]:
    """The kinds of per-model statistics (besides activations) a method with ``needs`` reads."""
    return [kind for kind, wanted in ((GRAMS, needs.grams), (FISHERS, needs.fishers)) if wanted]


def describe_statistics(needs: StatisticsNeeds, calibration: LanguageCalibration | None) -> list[str]:
    """What a merge would measure, one line per kind (shown by ``--dry-run``)."""
    if calibration is None or not needs.any:
        return ["statistics: none (the method reads no calibration statistics)"]
    lines = []
    if needs.sequential:
        base = ", ".join(calibration.languages_of("base", needs.per_language))
        checkpoints = ", ".join(calibration.languages_of("checkpoints", needs.per_language))
        return [
            f"statistics: none cached; the model is merged block by block, the base run on {base} and each "
            f"checkpoint and the merged model on {checkpoints}"
        ]
    if needs.activations:
        lines.append(f"statistics: activations of each checkpoint on {', '.join(calibration.sets)}")
    for kind in requested_kinds(needs):
        base = ", ".join(calibration.languages_of("base", needs.per_language))
        checkpoints = ", ".join(calibration.languages_of("checkpoints", needs.per_language))
        lines.append(f"statistics: {kind.label} of the base on {base} and of each checkpoint on {checkpoints}")
    lines.append("statistics are computed unless cached for these inputs and texts (--recompute-stats: always)")
    return lines


def warn_stored_fused(plan: MergePlan, needs: StatisticsNeeds) -> int:
    """One warning when the checkpoints store MoE experts fused (3-D tensors, e.g. gpt-oss's
    ``mlp.experts.gate_up_proj`` ``[E, in, out]``) and the method would read per-map statistics for them:
    no statistics are kept per slice of a stored 3-D tensor, so OBIM scores them at random (as the paper does
    for parameters without a Hessian estimate) and RegMean gives them θ_B + mean δ/(1+c). Fisher diagonals
    are per element and cover them. Returns how many tensors it names."""
    fused = [t.name for t in plan.tensors if len(t.shape) == 3 and t.dtype.is_floating_point]
    if fused and (needs.activations or needs.grams):  # the sequential merge refuses them with the way out
        consequence = "scored at random" if needs.activations else "merged as θ_B + mean δ/(1+c)"
        logger.warning(
            "%d tensor(s) are stored fused, 3-D (MoE experts, e.g. %s): no per-expert statistics, they are %s",
            len(fused),
            fused[0],
            consequence,
        )
    return len(fused)


def raise_nonfinite(reader: CheckpointReader) -> None:
    """Name the tensor behind non-finite statistics (NaN/Inf weights), or say the activations overflow."""
    for name, info in reader.tensor_infos().items():
        tensor = reader.read(name)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"tensor {name} in {info.file} contains NaN or Inf. The checkpoint is broken (diverged "
                "training?); leave it out of the merge."
            )
    raise CheckpointError(
        f"checkpoint {reader.path} produces NaN/Inf activations on the calibration data although its weights are "
        "finite (overflow in its dtype?); check the checkpoint or leave it out of the merge."
    )


def stored_statistics(
    reader: CheckpointReader,
    kind: StatisticsKind,
    texts: CalibrationSet,
    config: MergeConfig,
    device: torch.device,
) -> tuple[Stats, dict[str, Any]]:
    """One model's statistics of ``kind`` on ``texts``: cached ones, or computed on the model and stored."""
    fingerprint = reader.fingerprint()
    key = stats_key(texts.fingerprint(), fingerprint, kind.key)
    cache = Path(config.stats_cache_dir) if config.stats_cache_dir is not None else default_cache_dir()

    def compute() -> Stats:
        logger.info("computing %s of %s (%s)", kind.label, reader.path, reader.format)
        model = load_model(reader, config.base, device)
        try:
            spool = stats_location(reader.path, key, cache, beside=config.stats_beside_checkpoints).parent
            if not _writable(spool):
                spool = cache
            stats = kind.collect(model, texts, config, device, f"{kind.label} of {reader.path.name}", spool)
        finally:
            del model
        if not stats.is_finite():
            raise_nonfinite(reader)
        return stats

    stats, source = load_or_compute_stats(
        reader.path,
        key,
        compute,
        cache_dir=cache,
        recompute=config.recompute_stats,
        load=kind.load,
        beside=config.stats_beside_checkpoints,
        origin=StatsOrigin.of(texts, reader.path, fingerprint, kind.key),
    )
    return stats, {"kind": kind.name, "checkpoint": str(reader.path), "key": key, "source": source}


def _writable(folder: Path) -> bool:
    """Whether new files can be made in ``folder`` (created if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def model_statistics(
    base: CheckpointReader,
    readers: list[CheckpointReader],
    needs: StatisticsNeeds,
    calibration: LanguageCalibration,
    config: MergeConfig,
    device: torch.device,
    base_calibration: LanguageCalibration | None = None,
) -> tuple[ModelStatistics, list[dict[str, Any]]]:
    """The Grams and Fisher diagonals ``needs`` asks for, of the base and of every checkpoint, and their record.

    ``base_calibration``: the same texts tokenized for the base, when the checkpoints extend the vocabulary
    (the base cannot read the new tokens' ids); ``calibration`` by default.
    """
    found: dict[str, tuple[Stats, list[Stats]]] = {}
    records: list[dict[str, Any]] = []
    for kind in requested_kinds(needs):
        measured = []
        for side, models in (("base", [base]), ("checkpoints", readers)):
            languages = calibration.languages_of(side, needs.per_language)
            tokenized = base_calibration if side == "base" and base_calibration is not None else calibration
            texts = tokenized.joined(languages)
            for reader in models:
                stats, record = stored_statistics(reader, kind, texts, config, device)
                measured.append(stats)
                own_vocabulary = tokenized is base_calibration  # an extended vocabulary's base reads its own ids
                records.append(
                    {**record, "model": side.removesuffix("s"), "languages": languages, "own_tokenizer": own_vocabulary}
                )
        found[kind.name] = (measured[0], measured[1:])
    grams, fishers = found.get(GRAMS.name), found.get(FISHERS.name)
    statistics = ModelStatistics(
        base_grams=grams[0] if grams else None,  # type: ignore[arg-type]
        checkpoint_grams=grams[1] if grams else None,  # type: ignore[arg-type]
        base_fishers=fishers[0] if fishers else None,  # type: ignore[arg-type]
        checkpoint_fishers=fishers[1] if fishers else None,  # type: ignore[arg-type]
    )
    return statistics, records
