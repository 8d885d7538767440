"""Calibration text per language, and which text each model is measured on.

Data-aware merges weigh what the base knew against what the checkpoints learned. That only works
if the base is measured on the languages it should keep (the *old* ones) and each checkpoint on
the language continued pre-training added (the *new* one): ``calibration_data`` then maps each
language to a file and ``new_languages`` names the new ones. A method whose statistics are not
per language (OBIM's activation statistics, RegMean with ``statistics: mixed``) measures every
model on all the texts together, whether they come from one file or from several.

Everything here is checked from the configuration alone, before any file is read, so a mistake
costs nothing; :func:`load_language_texts` then reads every file (an empty or unreadable one is
one clear error) before any checkpoint is read or anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from obim_trainer.calibration.data import CalibrationSet, load_calibration_texts
from obim_trainer.errors import CalibrationError, ConfigError
from obim_trainer.merging.registry import StatisticsNeeds
from obim_trainer.settings.names import PER_LANGUAGE_CALIBRATION, setting_key, setting_name, settings_example

ALL = "all"
"""The name of the one calibration source when it is not given per language."""


def is_per_language(data: Any) -> bool:
    """Whether ``calibration_data`` maps languages to sources (``{"en": "en.jsonl", ...}``)."""
    return isinstance(data, Mapping)


def check_languages(data: Any, new_languages: Sequence[str], needs: StatisticsNeeds, method: str) -> None:
    """Raise one :class:`ConfigError` naming the setting and the fix when the calibration cannot serve ``method``.

    Checks only the configuration: per-language methods need old and new text, and with per-language
    data every name in ``new_languages`` must be one of its languages. With one file, ``new_languages``
    only names the comparison objective's new language (``--new-language`` serves both).
    No calibration at all is left to :func:`missing_calibration`, once the inputs are checked.
    """
    per_language = is_per_language(data)
    calibration, new = setting_key("calibration_data"), setting_key("new_languages")
    if per_language:
        if not data:
            raise ConfigError(f"{calibration} names no language; e.g. {settings_example(PER_LANGUAGE_CALIBRATION)}")
        bad = [str(k) for k, v in data.items() if not isinstance(k, str) or not k or v is None]
        if bad:
            raise ConfigError(
                f"{calibration} needs a file for every language "
                f"({setting_name('calibration_data', PER_LANGUAGE_CALIBRATION['calibration_data'])}); check "
                f"{', '.join(bad)}"
            )
        unknown = [lang for lang in new_languages if lang not in data]
        if unknown:
            raise ConfigError(
                f"{new} names {', '.join(map(repr, unknown))}, which {calibration} does not give; its languages "
                f"are {', '.join(data)}: name one of them"
            )
    if data is None or not needs.per_language:
        return  # no calibration at all is refused once the inputs are known good (missing_calibration)
    if not per_language:
        raise ConfigError(
            f"method '{method}' measures the base on old-language text and each checkpoint on new-language text, "
            f"but {calibration} is one file; give one file per language and name the new one(s), e.g. "
            f"{settings_example(PER_LANGUAGE_CALIBRATION)}"
        )
    if not new_languages:
        raise ConfigError(
            f"method '{method}' measures each checkpoint on new-language text, but no language is named new; add "
            f"{setting_name('new_languages', [next(iter(data))])} (one of {', '.join(data)})"
        )
    if set(data) <= set(new_languages):
        raise ConfigError(
            f"method '{method}' measures the base on old-language text, but every language of {calibration} is "
            f"named by {new}; add the base's languages, e.g. "
            f"{setting_name('calibration_data', {'en': 'en.jsonl', **{lang: f'{lang}.jsonl' for lang in data}})}"
        )


def missing_calibration(method: str, needs: StatisticsNeeds) -> ConfigError:
    """The error for a method that reads statistics but was given no calibration text."""
    wanted = (
        settings_example(PER_LANGUAGE_CALIBRATION) if needs.per_language else setting_name("calibration_data", "FILE")
    )
    return ConfigError(
        f"method '{method}' needs calibration text: set {wanted} (JSONL with a 'text' field, .txt or .parquet; "
        "~100 samples of each language)"
    )


def load_language_texts(data: Any, num_samples: int, text_field: str) -> dict[str, list[str]]:
    """The texts of every language (``{"all": texts}`` for one source), up to ``num_samples`` each.

    Raises :class:`CalibrationError` naming the language and file when one is missing, empty or unreadable.
    """
    if not is_per_language(data):
        return {ALL: load_calibration_texts(data, num_samples=num_samples, text_field=text_field)}
    texts = {}
    for language, source in data.items():
        try:
            texts[language] = load_calibration_texts(source, num_samples=num_samples, text_field=text_field)
        except CalibrationError as exc:
            raise CalibrationError(f"{setting_name('calibration_data', {language: str(source)})}: {exc}") from None
    return texts


@dataclass
class LanguageCalibration:
    """Tokenized calibration text per language (one entry, ``all``, for a single source) and which are new."""

    sets: dict[str, CalibrationSet]
    new_languages: list[str]

    @property
    def old_languages(self) -> list[str]:
        return [lang for lang in self.sets if lang not in self.new_languages]

    def joined(self, languages: Sequence[str]) -> CalibrationSet:
        """The samples of ``languages`` together, in the order of the languages as given."""
        first = self.sets[languages[0]]
        ids = [sample for lang in languages for sample in self.sets[lang].input_ids]
        return CalibrationSet(ids, first.pad_token_id)

    def all(self) -> CalibrationSet:
        """Every sample of every language: what a method without a language split measures every model on."""
        return self.joined(list(self.sets))

    def languages_of(self, side: str, per_language: bool) -> list[str]:
        """The languages the ``base`` or the ``checkpoints`` are measured on (all of them unless per language)."""
        if not per_language:
            return list(self.sets)
        return self.old_languages if side == "base" else list(self.new_languages)

    def side(self, side: str, per_language: bool) -> CalibrationSet:
        """The text the ``base`` (old languages) or each of the ``checkpoints`` (new ones) is measured on."""
        return self.joined(self.languages_of(side, per_language))
