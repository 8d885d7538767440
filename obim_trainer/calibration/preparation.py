"""Calibration text made ready for one model: read, tokenized with its tokenizer, cut to its length.

The merge (:mod:`~obim_trainer.pipeline.merge`) and the callback
(:mod:`~obim_trainer.training.setup`) both prepare their calibration here, from the calibration
settings they share (:class:`~obim_trainer.settings.blocks.CalibrationSettings`) and the folders of
the model and tokenizer, so the same texts give the same token ids, and hence the same
statistics cache keys, whichever of them measures.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from obim_trainer.calibration.data import CalibrationSet, tokenize_calibration
from obim_trainer.calibration.languages import LanguageCalibration, load_language_texts
from obim_trainer.calibration.token_cache import cached_tokenization
from obim_trainer.errors import CheckpointError, ConfigError
from obim_trainer.settings.blocks import CalibrationSettings
from obim_trainer.settings.names import setting_name

logger = logging.getLogger(__name__)


def model_max_positions(folder: Path) -> int | None:
    """The longest input the model accepts, from its ``config.json`` (``None`` if it does not say).

    Read as JSON (the text model's part of a multimodal config first): importing transformers for
    ``AutoConfig`` would take seconds of a merge that needs no tokenizer or model.
    """
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read the model config in {folder} ({exc}); the base folder must hold a transformers config.json"
        ) from None
    for section in (config.get("text_config"), config):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def prepare_language_calibration(
    settings: CalibrationSettings,
    model_dir: Path,
    tokenizer_dir: Path | None = None,
    texts: dict[str, list[str]] | None = None,
) -> LanguageCalibration:
    """Calibration texts per language (one entry, ``all``, for a single source), tokenized with ``tokenizer_dir``
    (default: ``model_dir``'s tokenizer) and cut to what ``model_dir``'s model accepts, or as they were the last
    time (:mod:`~obim_trainer.calibration.token_cache`). ``texts``: as :func:`load_language_texts` read them
    already."""
    if settings.calibration_data is None:
        raise ConfigError(
            f"statistics need calibration text: set {setting_name('calibration_data', 'FILE')} (JSONL with a "
            "'text' field, .txt or .parquet; ~100 samples of the new domain)"
        )
    tokenizer_dir = Path(tokenizer_dir or model_dir)
    if texts is None:
        texts = load_language_texts(
            settings.calibration_data, settings.calibration_samples, settings.calibration_text_field
        )
    longest = settings.calibration_max_length
    max_length = min(longest, model_max_positions(Path(model_dir)) or longest)
    if max_length < longest:
        logger.info("calibration samples are cut to %d tokens, the model's maximum number of positions", max_length)
    tokenizers: list[Any] = []  # loaded once, and only if some language is not in the token cache

    def tokenizer() -> Any:
        from transformers import AutoTokenizer

        if not tokenizers:
            try:
                tokenizers.append(AutoTokenizer.from_pretrained(tokenizer_dir))
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"cannot load a tokenizer from {tokenizer_dir} ({exc}); set "
                    f"{setting_name('tokenizer_source', 'DIR')} to a folder with tokenizer files"
                ) from None
        return tokenizers[0]

    if not tokenizer_dir.is_dir():
        raise ConfigError(
            f"tokenizer folder {tokenizer_dir} does not exist; set {setting_name('tokenizer_source', 'DIR')}"
        )
    sets = {
        language: cached_tokenization(
            samples, tokenizer_dir, max_length, lambda s=samples: tokenize_calibration(s, tokenizer(), max_length)
        )
        for language, samples in texts.items()
    }
    for language, calibration in sets.items():
        logger.info(
            "calibration %s: %d samples, %d tokens", language, len(calibration.input_ids), calibration.num_tokens
        )
    return LanguageCalibration(sets, list(settings.new_languages))


def prepare_calibration(
    settings: CalibrationSettings, model_dir: Path, tokenizer_dir: Path | None = None
) -> CalibrationSet:
    """All calibration texts together (every language's, when given per language), tokenized as by
    :func:`prepare_language_calibration`: what a method without a language split measures every model on."""
    return prepare_language_calibration(settings, model_dir, tokenizer_dir).all()
