"""Errors name a setting as the user wrote it: the flag, the YAML key or the keyword argument."""

from __future__ import annotations

import pytest

from obim_trainer.cli import main
from obim_trainer.errors import OBIMError
from obim_trainer.pipeline.merge import merge_checkpoints
from obim_trainer.settings.names import setting_name, settings_spelled


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("cli", ["--calibration-data FILE", "--overwrite", "--total-share 0.5"]),
        ("yaml", ["calibration_data: FILE", "overwrite: true", "total_shares: 0.5"]),
        ("python", ["calibration_data=FILE", "overwrite=True", "total_shares=0.5"]),
    ],
)
def test_each_source_spells_settings_its_own_way(spelling, expected):
    with settings_spelled(spelling):
        assert [
            setting_name("calibration_data", "FILE"),
            setting_name("overwrite"),
            setting_name("total_shares", "0.5"),
        ] == expected
    assert setting_name("overwrite") == "overwrite=True"  # the Python API outside any run


def test_a_key_from_the_config_file_stays_a_yaml_key_on_the_command_line():
    with settings_spelled("cli", yaml_keys={"overwrite"}):
        assert setting_name("overwrite") == "overwrite: true"
        assert setting_name("output", "DIR") == "--output DIR"


def _family(llama_family, calibration_jsonl, tmp_path):
    base, ckpts = llama_family
    (tmp_path / "out").mkdir()
    return base, ckpts, tmp_path / "out"


def test_an_existing_output_is_refused_in_the_words_of_each_interface(
    llama_family, calibration_jsonl, tmp_path, caplog
):
    base, ckpts, out = _family(llama_family, calibration_jsonl, tmp_path)
    flags = ["--base", str(base), "--checkpoints", *map(str, ckpts), "--calibration-data", str(calibration_jsonl)]
    assert main([*flags, "--output", str(out)]) == 2
    assert "already exists; set --overwrite to replace it" in caplog.text
    caplog.clear()
    (tmp_path / "merge.yaml").write_text(f"output: {out}\noverwrite: false\n")
    assert main([*flags, "--config", str(tmp_path / "merge.yaml")]) == 2
    assert "already exists; set overwrite: true to replace it" in caplog.text
    with pytest.raises(OBIMError, match="already exists; set overwrite=True to replace it"):
        merge_checkpoints(base=base, checkpoints=ckpts, calibration_data=calibration_jsonl, output=out)
    assert not any(out.iterdir())


def test_a_missing_calibration_file_is_named_as_written(llama_family, tmp_path, caplog):
    base, ckpts = llama_family
    flags = ["--base", str(base), "--checkpoints", *map(str, ckpts), "--output", str(tmp_path / "out")]
    assert main([*flags, "--calibration-data", str(tmp_path / "typo.jsonl")]) == 2
    assert "typo.jsonl does not exist; set --calibration-data FILE to an existing file" in caplog.text
    with pytest.raises(OBIMError, match=r"set calibration_data=FILE to an existing file"):
        merge_checkpoints(base=base, checkpoints=ckpts, calibration_data=tmp_path / "typo.jsonl", output=tmp_path / "o")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_a_missing_base_and_run_folder_are_named_as_written(llama_family, calibration_jsonl, tmp_path, caplog):
    _, ckpts = llama_family
    missing = tmp_path / "no-base"
    flags = ["--checkpoints", *map(str, ckpts), "--calibration-data", str(calibration_jsonl)]
    assert main(["--base", str(missing), *flags, "--output", str(tmp_path / "out")]) == 2
    assert f"base folder {missing} does not exist; set --base DIR to the base model's folder" in caplog.text
    with pytest.raises(OBIMError, match=r"set run_dir=DIR to the Trainer's output_dir"):
        merge_checkpoints(base=llama_family[0], run_dir=missing, top_k=1, metric="eval_loss", output=tmp_path / "o")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def _write_yaml(path, data):
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("cli", "--new-language names 'fr', which --calibration-data does not give"),
        ("yaml", "new_languages names 'fr', which calibration_data does not give"),
        ("python", "new_languages names 'fr', which calibration_data does not give"),
    ],
)
def test_an_unknown_new_language_is_named_by_each_source(
    source, expected, llama_family, calibration_jsonl, tmp_path, caplog
):
    from obim_trainer.settings.callback import OBIMConfig

    base, ckpts = llama_family
    per_language = {"en": str(calibration_jsonl), "zh": str(calibration_jsonl)}
    out = tmp_path / "out"
    if source == "cli":
        languages = [f"{k}={v}" for k, v in per_language.items()]
        flags = ["--base", str(base), "--checkpoints", *map(str, ckpts), "--output", str(out)]
        assert main([*flags, "--calibration-data", *languages, "--new-language", "fr"]) == 2
        message = caplog.text
    elif source == "yaml":  # the callback's section of a YAML file
        settings = {"obim": {"base_model": str(base), "calibration_data": per_language, "new_languages": ["fr"]}}
        with pytest.raises(OBIMError) as info:
            OBIMConfig.from_yaml(_write_yaml(tmp_path / "run.yaml", settings), section="obim")
        message = str(info.value)
    else:
        with pytest.raises(OBIMError) as info:
            merge_checkpoints(
                base=base, checkpoints=ckpts, calibration_data=per_language, new_languages="fr", output=out
            )
        message = str(info.value)
    assert expected in message
    assert not out.exists()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("cli", "sweep their total with --total-share 1.0,0.6"),
        ("yaml", "sweep their total with total_shares: [1.0, 0.6]"),
        ("python", "sweep their total with total_shares=[1.0, 0.6]"),
    ],
)
def test_a_sweep_of_ratios_points_at_total_shares_in_each_sources_words(
    source, expected, llama_family, calibration_jsonl, tmp_path, caplog
):
    from obim_trainer.pipeline.variants import plan_variants
    from obim_trainer.settings.callback import OBIMConfig

    base, ckpts = llama_family
    if source == "cli":
        flags = ["--base", str(base), "--checkpoints", *map(str, ckpts), "--calibration-data", str(calibration_jsonl)]
        assert main([*flags, "--param", "ratios=0.5,0.5", "--dry-run"]) == 2
        message = caplog.text
    elif source == "yaml":
        merges = [{"method": "obim", "sweep": {"ratios": [[0.5, 0.5], [0.4, 0.6]]}}]
        settings = {"obim": {"base_model": str(base), "merges": merges, "eval_data": {"en": "en.jsonl"}}}
        with pytest.raises(OBIMError) as info:
            OBIMConfig.from_yaml(_write_yaml(tmp_path / "run.yaml", settings), section="obim")
        message = str(info.value)
    else:
        with pytest.raises(OBIMError) as info:
            plan_variants(["obim"], {}, None, 2, {"ratios": [[0.5, 0.5]]})
        message = str(info.value)
    assert expected in message


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("cli", "needs calibration text: set --calibration-data FILE"),
        ("callback", "needs calibration text: set calibration_data: FILE"),
        ("python", "needs calibration text: set calibration_data=FILE"),
    ],
)
def test_missing_calibration_is_named_by_each_source(source, expected, llama_family, tmp_path, caplog):
    """The callback's merges (run through its guard) name OBIMConfig's keys, as its YAML section has them."""
    from obim_trainer.settings.callback import OBIMConfig
    from obim_trainer.training.callback import OBIMCallback

    base, ckpts = llama_family
    out = tmp_path / "out"
    if source == "cli":
        assert main(["--base", str(base), "--checkpoints", *map(str, ckpts), "--output", str(out)]) == 2
        message = caplog.text
    elif source == "callback":
        callback = OBIMCallback(OBIMConfig.build({"base_model": base, "on_error": "raise"}))
        config = callback.config.merge_config(ckpts, out)
        with pytest.raises(OBIMError) as info:
            callback._guarded(lambda: merge_checkpoints(config), "the merge at step 4", everywhere=True)
        message = str(info.value)
    else:
        with pytest.raises(OBIMError) as info:
            merge_checkpoints(base=base, checkpoints=ckpts, output=out)
        message = str(info.value)
    assert expected in message
    assert not out.exists()


def test_the_callback_names_its_own_keys_for_renamed_settings():
    from obim_trainer.settings.callback import callback_spelling

    with callback_spelling():
        assert setting_name("base", "DIR") == "base_model: DIR" and setting_name("device", "cpu") == "merge_device: cpu"
    assert setting_name("base", "DIR") == "base=DIR"
