"""Data-aware merges end to end: the engine hands a method the base's statistics on old-language text and each
checkpoint's on new-language text, cached per kind and model, recorded in the manifest; bad per-language input
is one clear error before anything is read or written."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from obim_trainer.calibration.fisher_stats import FisherStats
from obim_trainer.calibration.preparation import prepare_language_calibration
from obim_trainer.calibration.stats_cache import STATS_DIRNAME, stats_path
from obim_trainer.errors import CalibrationError, ConfigError
from obim_trainer.merging import MergeMethod, MergeOutput, TensorTask
from obim_trainer.merging.registry import _REGISTRY, MethodParams, StatisticsNeeds, register_method
from obim_trainer.pipeline import merge as merge_module
from obim_trainer.pipeline.layout import ModelLayout
from obim_trainer.pipeline.merge import merge_checkpoints
from obim_trainer.settings.merge import MergeConfig
from tests.calibration.test_fisher_stats import brute_force_fisher
from tests.calibration.test_gram_stats import reference_grams
from tests.conftest import VOCAB_SIZE, copy_tree, make_texts, write_jsonl
from tests.pipeline.test_merge import NEW_TOKENS, VOCAB_NAMES, copied_family, load_output, train_extended_vocabulary

LANGUAGES = {"en": 1, "zh": 2, "ru": 3}


class StatisticsProbe(MergeMethod):
    """A test-only method: checks every statistic the engine hands it against ``expected`` and returns θ_B,
    or the first checkpoint's tensor when any check failed (so the output shows it too)."""

    name = "test_statistics_probe"

    class Params(MethodParams):
        per_language: bool = True
        fishers: bool = True

    expected: ClassVar[dict[str, dict[str, list[torch.Tensor]]]] = {}
    problems: ClassVar[list[str]] = []
    gram_ids: ClassVar[dict[str, int]] = {}

    def statistics(self) -> StatisticsNeeds:
        return StatisticsNeeds(grams=True, fishers=self.params.fishers, per_language=self.params.per_language)

    def _check(self, task: TensorTask, what: str, got: list[torch.Tensor], rtol: float, atol: float) -> None:
        if not self.expected:  # tests of caching and records give no expected values
            return
        wanted = self.expected[what].get(task.name)
        if wanted is None or len(got) != len(wanted):
            self.problems.append(f"{task.name}: no {what} expected or wrong count")
            return
        for k, (g, w) in enumerate(zip(got, wanted, strict=True)):
            if g.shape != w.shape or not torch.allclose(g.double().cpu(), w.double(), rtol=rtol, atol=atol):
                self.problems.append(f"{task.name}: {what} of model {k} differs")

    def merge(self, task: TensorTask) -> MergeOutput:
        if task.num_blocks != 2:
            self.problems.append(f"{task.name}: num_blocks {task.num_blocks}")
        if task.kind.value == "linear":
            assert task.base_gram is not None and task.checkpoint_grams is not None
            if task.base_gram.dtype != torch.float64 or task.in_axis != 1:
                self.problems.append(f"{task.name}: Gram dtype {task.base_gram.dtype}, in_axis {task.in_axis}")
            self._check(task, "grams", [task.base_gram, *task.checkpoint_grams], 1e-5, 1e-7)
            self.gram_ids[task.name] = id(task.base_gram)
        elif task.base_gram is not None:
            self.problems.append(f"{task.name}: a Gram for a {task.kind.value} tensor")
        if self.params.fishers:
            assert task.base_fisher is not None and task.checkpoint_fishers is not None
            self._check(task, "fishers", [task.base_fisher, *task.checkpoint_fishers], 1e-4, 1e-12)
        ok = not self.problems
        return MergeOutput((task.base if ok else task.checkpoint(0)).clone())


@pytest.fixture
def probe() -> Iterator[type[StatisticsProbe]]:
    register_method(StatisticsProbe)
    StatisticsProbe.expected, StatisticsProbe.problems, StatisticsProbe.gram_ids = {}, [], {}
    yield StatisticsProbe
    _REGISTRY.pop(StatisticsProbe.name)


@pytest.fixture
def languages(tmp_path) -> dict[str, Path]:
    return {lang: write_jsonl(tmp_path / f"{lang}.jsonl", make_texts(6, seed=seed)) for lang, seed in LANGUAGES.items()}


def expected_statistics(base: Path, ckpts: list[Path], calibration, base_langs, ckpt_langs, fishers: bool):
    """Grams and Fishers recomputed here without the library's collectors, keyed like the stored tensors."""
    models = [AutoModelForCausalLM.from_pretrained(folder).eval() for folder in (base, *ckpts)]
    texts = [calibration.joined(base_langs), *[calibration.joined(ckpt_langs)] * len(ckpts)]
    grams = [reference_grams(m, t) for m, t in zip(models, texts, strict=True)]
    expected = {"grams": {name: [g[name] for g in grams] for name in grams[0]}}
    if fishers:
        found = [brute_force_fisher(m, t) for m, t in zip(models, texts, strict=True)]
        expected["fishers"] = {name: [f[name] for f in found] for name in found[0]}
    return expected


def files_under(folders: list[Path]) -> set[Path]:
    return {p for folder in folders for p in folder.rglob("*")}


@contextmanager
def pickling_pool(workers: int) -> Iterator[ThreadPoolExecutor | None]:
    """Workers as threads of this process (where the test-only method is registered), each receiving the job
    pickled and unpickled, as a spawned worker does."""
    if workers == 1:
        yield None
        return

    class Pool(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            return super().submit(fn, *pickle.loads(pickle.dumps(args)), **kwargs)

    with Pool(workers) as pool:
        yield pool


@pytest.mark.parametrize(("per_language", "workers"), [(True, 1), (True, 2), (False, 1)])
def test_the_method_gets_the_base_measured_on_old_text_and_checkpoints_on_new_text(
    per_language, workers, probe, llama_family, languages, tmp_path, monkeypatch
):
    base, ckpts = copied_family(llama_family, tmp_path)
    ckpts = ckpts[:2]
    monkeypatch.setattr(merge_module, "worker_pool", pickling_pool)
    config = MergeConfig(
        base=base,
        checkpoints=ckpts,
        method=probe.name,
        params={"per_language": per_language},
        calibration_data=languages,
        new_languages=["ru"],
        output=tmp_path / "merged",
        workers=workers,
        stats_cache_dir=tmp_path / "stats",
        progress=False,
    )
    calibration = prepare_language_calibration(config, config.base)
    old, new = (["en", "zh"], ["ru"]) if per_language else (["en", "zh", "ru"], ["en", "zh", "ru"])
    probe.expected = expected_statistics(base, ckpts, calibration, old, new, fishers=True)
    result = merge_checkpoints(config)
    assert probe.problems == []
    merged, base_sd = load_output(result.output), load_file(base / "model.safetensors")
    assert set(merged) == set(base_sd) and all(torch.equal(merged[n], base_sd[n]) for n in base_sd)
    if workers == 1:  # maps reading one input got one tensor (a worker's split may separate them)
        ids = probe.gram_ids
        for block in (0, 1):
            attention = f"model.layers.{block}.self_attn."
            assert len({ids[attention + f"{m}_proj.weight"] for m in "qkv"}) == 1
            assert ids[attention + "o_proj.weight"] != ids[attention + "q_proj.weight"]
    manifest = result.manifest
    records = {(r["kind"], Path(r["checkpoint"]).name): r for r in manifest["statistics"]}
    assert len(records) == 2 * 3 and all(r["source"] == "computed" for r in records.values())
    assert records[("grams", "base")]["languages"] == old and records[("fishers", "checkpoint-10")]["languages"] == new
    assert manifest["calibration"]["measured_on"] == {"base": old, "checkpoints": new}
    assert manifest["calibration"]["new_languages"] == ["ru"]
    assert manifest["calibration"]["languages"]["ru"]["new"] and not manifest["calibration"]["languages"]["en"]["new"]


def test_grams_are_cached_per_model_and_text_and_recomputed_when_either_changes(
    probe, llama_family, languages, tmp_path
):
    base, ckpts = copied_family(llama_family, tmp_path)
    cache = tmp_path / "stats"
    common = dict(base=base, checkpoints=ckpts[:2], method=probe.name, params={"fishers": False}, progress=False)
    common |= {"stats_cache_dir": cache}

    def sources(out: str, data: dict[str, Path] = languages) -> list[str]:
        result = merge_checkpoints(**common, calibration_data=data, new_languages=["ru"], output=tmp_path / out)
        return [r["source"] for r in result.manifest["statistics"]]

    assert sources("m1") == ["computed"] * 3
    assert sources("m2") == ["cached"] * 3
    sd = load_file(ckpts[0] / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"] + 0.01
    save_file(sd, ckpts[0] / "model.safetensors", metadata={"format": "pt"})
    assert sources("m3") == ["cached", "computed", "cached"]  # base, changed checkpoint, other checkpoint
    other_new = {**languages, "ru": write_jsonl(tmp_path / "ru2.jsonl", make_texts(6, seed=33))}
    assert sources("m4", other_new) == ["cached", "computed", "computed"]  # the base reads only en and zh
    other_old = {**languages, "en": write_jsonl(tmp_path / "en2.jsonl", make_texts(6, seed=44))}
    assert sources("m5", other_old) == ["computed", "cached", "cached"]
    assert len(list(cache.glob("base-*.safetensors"))) == 2
    assert not (base / STATS_DIRNAME).exists(), "nothing is written into the folders a merge reads"


def test_dry_run_says_which_statistics_it_would_compute(probe, llama_family, languages, tmp_path):
    base, ckpts = llama_family
    before = files_under([base, *ckpts])
    result = merge_checkpoints(
        base=base,
        checkpoints=ckpts,
        method=probe.name,
        calibration_data=languages,
        new_languages=["ru"],
        dry_run=True,
    )
    lines = result.plan_text.splitlines()
    assert "statistics: input Grams of the base on en, zh and of each checkpoint on ru" in lines
    assert "statistics: Fisher diagonals of the base on en, zh and of each checkpoint on ru" in lines
    assert files_under([base, *ckpts]) == before


def test_obim_reads_every_language_together_like_one_file_of_all_texts(llama_family, languages, tmp_path):
    base, ckpts = copied_family(llama_family, tmp_path)
    joined = tmp_path / "all.jsonl"
    joined.write_text("".join(languages[lang].read_text() for lang in LANGUAGES))
    common = dict(base=base, checkpoints=ckpts[:2], progress=False)
    per_language = merge_checkpoints(
        **common, calibration_data=languages, new_languages=["ru"], output=tmp_path / "a", recompute_stats=True
    )
    one_file = merge_checkpoints(**common, calibration_data=joined, output=tmp_path / "b")
    assert [r["source"] for r in one_file.manifest["statistics"]] == ["cached", "cached"], "the same texts and key"
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert per_language.manifest["statistics"][0]["languages"] == ["en", "zh", "ru"]
    assert per_language.manifest["calibration"]["measured_on"] == {"checkpoints": ["en", "zh", "ru"]}


@pytest.mark.parametrize(
    ("data", "new", "error", "match"),
    [
        ("none", [], ConfigError, r"needs calibration text: set calibration_data=\{'en': 'en.jsonl', 'zh'"),
        ("one", ["ru"], ConfigError, r"is one file; give one file per language and name the new one\(s\)"),
        ("one", [], ConfigError, "is one file; give one file per language"),
        ("all", [], ConfigError, r"no language is named new; add new_languages=\['en'\] \(one of en, zh, ru\)"),
        ("all", ["xx"], ConfigError, r"new_languages names 'xx', which calibration_data does not give"),
        ({"ru": "ru"}, ["ru"], ConfigError, "no old-language text|every language of calibration_data is named"),
        ("empty", ["ru"], CalibrationError, r"calibration_data=\{'ru': '.*ru_empty\.jsonl'\}: .* holds no non-empty"),
        ("missing", ["ru"], CalibrationError, r"calibration_data=\{'ru': '.*nowhere\.jsonl'\}: .*does not exist"),
    ],
)
def test_bad_per_language_input_is_one_clear_error_and_nothing_is_written(
    data, new, error, match, probe, llama_family, languages, tmp_path
):
    base, ckpts = copied_family(llama_family, tmp_path)
    empty = tmp_path / "ru_empty.jsonl"
    empty.write_text("")
    choices = {
        "none": None,
        "one": languages["en"],
        "all": languages,
        "empty": {**languages, "ru": empty},
        "missing": {**languages, "ru": tmp_path / "nowhere.jsonl"},
    }
    calibration = choices.get(data) if isinstance(data, str) else {k: languages[v] for k, v in data.items()}
    before = files_under([base, *ckpts])
    with pytest.raises(error, match=match):
        merge_checkpoints(
            base=base,
            checkpoints=ckpts[:2],
            method=probe.name,
            calibration_data=calibration,
            new_languages=new,
            output=tmp_path / "out",
            progress=False,
        )
    assert not (tmp_path / "out").exists() and files_under([base, *ckpts]) == before


def test_a_single_file_still_serves_methods_without_a_language_split(probe, llama_family, languages, tmp_path):
    base, ckpts = copied_family(llama_family, tmp_path)
    result = merge_checkpoints(
        base=base,
        checkpoints=ckpts[:2],
        method=probe.name,
        params={"per_language": False, "fishers": False},
        calibration_data=languages["en"],
        output=tmp_path / "out",
        progress=False,
    )
    assert [r["languages"] for r in result.manifest["statistics"]] == [["all"]] * 3
    assert result.manifest["calibration"]["measured_on"] == {"base": ["all"], "checkpoints": ["all"]}
    assert ModelLayout.from_pretrained_dir(base).num_blocks == 2
    assert json.loads((result.output / "obim_merge.json").read_text())["calibration"]["source"] == str(languages["en"])


class FisherRowsProbe(MergeMethod):
    """A test-only method that records the Fisher diagonals it is given and returns θ_B."""

    name = "test_fisher_rows_probe"
    seen: ClassVar[list[tuple[str, torch.Tensor, list[torch.Tensor]]]] = []

    def statistics(self) -> StatisticsNeeds:
        return StatisticsNeeds(fishers=True)

    def merge(self, task: TensorTask) -> MergeOutput:
        assert task.base_fisher is not None and task.checkpoint_fishers is not None
        self.seen.append((task.name, task.base_fisher.cpu(), [f.cpu() for f in task.checkpoint_fishers]))
        return MergeOutput(task.base.clone())


def test_extended_vocabulary_fishers_follow_the_rows_of_the_task(llama_family, tmp_path):
    base = copy_tree(llama_family[0], tmp_path / "base")
    ckpts = train_extended_vocabulary(base, tmp_path / "run")[:2]
    calib = write_jsonl(tmp_path / "calib.jsonl", [f"<ja{i % NEW_TOKENS}> {t}" for i, t in enumerate(make_texts(8))])
    register_method(FisherRowsProbe)
    FisherRowsProbe.seen = []
    try:
        result = merge_checkpoints(
            base=base,
            checkpoints=ckpts,
            method=FisherRowsProbe.name,
            calibration_data=calib,
            output=tmp_path / "m",
            stats_beside_checkpoints=True,
        )
    finally:
        _REGISTRY.pop(FisherRowsProbe.name)
    stored = {
        Path(r["checkpoint"]).name: FisherStats.load(stats_path(Path(r["checkpoint"]), r["key"]))
        for r in result.manifest["statistics"]
    }
    assert list(stored) == ["base", *(c.name for c in ckpts)]
    assert [r["own_tokenizer"] for r in result.manifest["statistics"]] == [True, False, False]
    for name in VOCAB_NAMES:
        kept, new = [(f_b, f_k) for n, f_b, f_k in FisherRowsProbe.seen if n == name]
        assert torch.equal(kept[0], stored["base"].fisher(name)) and kept[0].shape[0] == VOCAB_SIZE
        assert new[0].shape[0] == NEW_TOKENS and not bool(new[0].any()), "the base has no new rows"
        for k, ckpt in enumerate(ckpts):
            whole = stored[ckpt.name].fisher(name)
            assert torch.equal(kept[1][k], whole[:VOCAB_SIZE]) and torch.equal(new[1][k], whole[VOCAB_SIZE:])
        assert bool(new[1][0].any()), "the new rows' Fisher comes from the checkpoint"
