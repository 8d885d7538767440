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
