"""The demo's text: per-language train and evaluation files, pretraining and calibration mixes."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from itertools import chain, zip_longest
from pathlib import Path

from obim_trainer.checkpoints.atomic import write_atomically
from obim_trainer.demo.config import DemoConfig
from obim_trainer.demo.fortunes import language_entries, split_entries


@dataclass(frozen=True)
class Corpus:
    """Where the demo's JSONL files (``{"text": ...}`` per line) are."""

    folder: Path

    def train(self, language: str) -> Path:
        return self.folder / f"{language}_train.jsonl"

    def eval(self, language: str) -> Path:
        return self.folder / f"{language}_eval.jsonl"

    @property
    def pretraining(self) -> Path:
        """The old languages, interleaved entry by entry."""
        return self.folder / "pretrain.jsonl"

    def calibration(self, language: str) -> Path:
        """Training entries of one language, sampled for the merge statistics."""
        return self.folder / f"{language}_calibration.jsonl"


def write_jsonl(path: Path, texts: list[str]) -> None:
    write_atomically(path, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]


def prepare_corpus(config: DemoConfig, folder: Path) -> Corpus:
    """Split each language's fortunes into train/eval (seeded) and write the files the demo reads.

    Calibration takes ``calibration_samples`` training entries of every language, one file each: the
    paper's post-pretraining statistics come from samples of all the languages it evaluates (OBIM reads
    them together), and the per-language methods measure the base on the old ones, the checkpoints on the new.
    """
    corpus = Corpus(Path(folder))
    corpus.folder.mkdir(parents=True, exist_ok=True)
    train: dict[str, list[str]] = {}
    for language in config.languages:
        entries, held_out = split_entries(language_entries(language), config.eval_entries, config.seed)
        train[language] = entries[: config.max_train_entries]
        write_jsonl(corpus.train(language), train[language])
        write_jsonl(corpus.eval(language), held_out)
    write_jsonl(corpus.pretraining, interleave([train[x] for x in config.old_languages]))
    rng = random.Random(config.seed + 1)
    for language in config.languages:
        write_jsonl(
            corpus.calibration(language),
            rng.sample(train[language], min(config.calibration_samples, len(train[language]))),
        )
    return corpus


def interleave(lists: list[list[str]]) -> list[str]:
    """One entry of each list in turn, until all are used up."""
    return [t for t in chain.from_iterable(zip_longest(*lists)) if t is not None]
