"""The demo's files: held-out evaluation per language, the pretraining mix and calibration per language."""

from __future__ import annotations

import pytest

from obim_trainer.demo.config import DemoConfig
from obim_trainer.demo.corpus import interleave, prepare_corpus, read_texts
from obim_trainer.demo.fortunes import language_entries, package_files


def test_interleave_takes_one_of_each_in_turn():
    assert interleave([["a1", "a2", "a3"], ["b1"]]) == ["a1", "b1", "a2", "a3"]


@pytest.mark.skipif(not package_files("fortunes-zh"), reason="run scripts/install_fortunes.sh")
def test_the_corpus_keeps_evaluation_apart_and_mixes_what_it_should(tmp_path):
    config = DemoConfig(max_train_entries=50, eval_entries=5, calibration_samples=7)
    corpus = prepare_corpus(config, tmp_path)
    for language in config.languages:
        train, held_out = read_texts(corpus.train(language)), read_texts(corpus.eval(language))
        assert len(train) == 50 and len(held_out) == 5 and not set(train) & set(held_out)
        assert set(held_out) <= set(language_entries(language))
    pretraining = read_texts(corpus.pretraining)
    assert pretraining[:4] == [
        read_texts(corpus.train("en"))[0],
        read_texts(corpus.train("de"))[0],
        read_texts(corpus.train("en"))[1],
        read_texts(corpus.train("de"))[1],
    ]
    assert not set(pretraining) & set(read_texts(corpus.train("zh")))  # the base never sees the new language
    for language in config.languages:  # per language, from that language's training entries, all different
        calibration = read_texts(corpus.calibration(language))
        assert len(set(calibration)) == 7 and set(calibration) <= set(read_texts(corpus.train(language)))
    assert prepare_corpus(config, tmp_path / "again").train("zh").read_text() == corpus.train("zh").read_text()
