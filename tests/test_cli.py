"""The obim-merge-ckpts command: YAML plus flags, listing, help."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from obim_trainer.cli import build_parser, config_from_args, main
from obim_trainer.errors import ConfigError
from obim_trainer.merging import available_methods
from tests.conftest import copy_tree

ROOT = Path(__file__).parents[1]


def test_yaml_with_flag_overrides_produces_a_loadable_model(llama_family, calibration_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    base, ckpts = llama_family
    base, ckpts = copy_tree(base, tmp_path / "base"), [copy_tree(c, tmp_path / c.name) for c in ckpts]
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base": str(base),
                "checkpoints": [str(c) for c in ckpts],
                "calibration_data": str(calibration_jsonl),
                "output": str(tmp_path / "from-yaml"),
                "method": "obim",
                "params": {"ratios": [0.2, 0.2, 0.2], "order": "given"},
                "seed": 3,
            }
        )
    )
    code = main(
        [
            "--config",
            str(config),
            "--output",
            str(tmp_path / "from-flags"),
            "--order",
            "rotation",
            "--no-progress",
            "--calibration-samples",
            "12",
        ]
    )
    assert code == 0
    out = tmp_path / "from-flags"
    assert not (tmp_path / "from-yaml").exists()
    manifest = json.loads((out / "obim_merge.json").read_text())
    assert manifest["method"] == {
        "method": "obim",
        "ratios": [0.2, 0.2, 0.2],
        "order": "rotation",
        "priority": None,
        "embedding_saliency": "random",
        "saliency": "obm",
    }
    assert manifest["seed"] == 3 and manifest["calibration"]["samples"] == 12
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = model.generate(__import__("torch").tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False)
    assert ids.shape == (1, 6)
    assert (out / "README.md").read_text().startswith("---")


def test_flags_override_yaml_params_entry_by_entry(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base": "b",
                "checkpoints": ["c1"],
                "output": "o",
                "method": "obim",
                "params": {"order": "given", "embedding_saliency": "token_frequency"},
            }
        )
    )
    args = build_parser().parse_args(["--config", str(config), "--order", "rotation", "--param", "ratios=[1.0]"])
    cfg, _ = config_from_args(args)
    assert cfg.params == {"order": "rotation", "embedding_saliency": "token_frequency", "ratios": [1.0]}
    assert str(cfg.base) == "b" and cfg.calibration_samples == 100


def test_list_methods_shows_every_method_with_parameters(capsys):
    assert main(["--list-methods"]) == 0
    text = capsys.readouterr().out
    for name, cls in available_methods().items():
        assert f"\n{name}" in f"\n{text}"
        for name, field in cls.Params.model_fields.items():
            assert f"{field.alias or name}:" in text
    assert "ratios: default None" in text and "[needs --calibration-data: activation statistics]" in text


def test_console_script_help_is_for_newcomers():
    out = subprocess.run(
        [sys.executable, "-m", "obim_trainer.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for fragment in ("Optimal Brain Iterative Merging", "--calibration-data", "--run-dir", "--dry-run", "examples:"):
        assert fragment in out


def test_help_examples_keep_their_line_breaks():
    out = subprocess.run(
        [sys.executable, "-m", "obim_trainer.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    examples = out.split("examples:", 1)[1].splitlines()
    joined = [line for line in examples if re.search(r"\S {2,}--", line)]  # a continuation pulled onto its line
    assert not joined, joined
    continued = [i for i, line in enumerate(examples) if line.endswith(" \\")]
    assert continued and all(examples[i + 1].startswith("      ") for i in continued)


def test_dry_run_of_several_methods_plans_each(llama_family, calibration_jsonl, capsys):
    base, ckpts = llama_family
    args = ["--base", str(base), "--checkpoints", *map(str, ckpts), "--calibration-data", str(calibration_jsonl)]
    assert main([*args, "--method", "obim,ties", "--param", "density=0.5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^# (\S+)$", out, flags=re.MULTILINE) == ["obim", "ties"]
    assert out.count("model.layers.1.mlp.up_proj.weight") == 2


def test_dry_run_prints_the_plan(llama_family, calibration_jsonl, tmp_path, capsys):
    base, ckpts = llama_family
    code = main(
        [
            "--base",
            str(base),
            "--checkpoints",
            *map(str, ckpts),
            "--calibration-data",
            str(calibration_jsonl),
            "--dry-run",
            "--ratios",
            "0.5",
            "0.25",
            "0.25",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert '"ratios": [0.5, 0.25, 0.25]' in out
    assert "model.layers.1.mlp.up_proj.weight" in out and "128x64" in out


def test_baseline_from_yaml_with_param_override(llama_family, tmp_path):
    import torch
    from safetensors.torch import load_file

    base, ckpts = llama_family
    code = main(
        [
            "--config",
            "configs/merge/dare_ties.yaml",
            "--base",
            str(base),
            "--checkpoints",
            *map(str, ckpts),
            "--param",
            "density=0.6",
            "--seed",
            "4",
            "--output",
            str(tmp_path / "m"),
            "--no-progress",
        ]
    )
    assert code == 0
    manifest = json.loads((tmp_path / "m" / "obim_merge.json").read_text())
    assert manifest["method"]["method"] == "dare_ties" and manifest["method"]["density"] == 0.6
    assert manifest["method"]["rescale_mode"] == "inverse" and manifest["calibration"] is None
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in merged.values())


def test_checkpoint_format_flags_reach_the_config():
    required = ["--base", "b", "--checkpoints", "c", "--output", "o"]
    flags = ["--zero-weights", "master", "--new-rows", "average", "--dtype", "bfloat16"]
    args = build_parser().parse_args([*required, *flags])
    cfg, _ = config_from_args(args)
    assert (cfg.zero_weights, cfg.new_rows, cfg.dtype) == ("master", "average", "bfloat16")
    defaults, _ = config_from_args(build_parser().parse_args(required))
    assert (defaults.zero_weights, defaults.new_rows, defaults.dtype) == ("auto", "obim", "auto")


def test_speed_flags_reach_the_config_and_bad_ones_are_refused():
    required = ["--base", "b", "--checkpoints", "c", "--output", "o"]
    cfg, _ = config_from_args(build_parser().parse_args([*required, "--workers", "4", "--device", "cuda:1"]))
    assert (cfg.workers, cfg.device) == (4, "cuda:1")
    defaults, _ = config_from_args(build_parser().parse_args(required))
    assert (defaults.workers, defaults.device) == (1, "cpu")
    for flags, message in ((["--workers", "0"], "workers"), (["--device", "tpu"], "device")):
        with pytest.raises(ConfigError, match=message):
            config_from_args(build_parser().parse_args([*required, *flags]))


def test_mixed_dtype_checkpoints_with_dtype_flag(llama_family, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    base, ckpts = llama_family
    half = copy_tree(ckpts[0], tmp_path / "half")
    save_file({n: t.half() for n, t in load_file(half / "model.safetensors").items()}, half / "model.safetensors")
    args = ["--base", str(base), "--checkpoints", str(half), str(ckpts[1]), "--method", "task_arithmetic"]
    assert main([*args, "--output", str(tmp_path / "m"), "--dtype", "bfloat16", "--no-progress"]) == 0
    assert {t.dtype for t in load_file(tmp_path / "m" / "model.safetensors").values()} == {torch.bfloat16}


def test_a_folder_in_no_format_exits_2_naming_it(llama_family, tmp_path, caplog):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("x")
    code = main(["--base", str(llama_family[0]), "--checkpoints", str(junk), "--output", str(tmp_path / "m")])
    assert code == 2 and not (tmp_path / "m").exists()
    assert f"no checkpoint format recognised in {junk} (found: notes.txt)" in caplog.text


def test_param_with_several_values_is_a_sweep_and_a_bracketed_list_is_one_value(tmp_path):
    required = ["--base", "b", "--checkpoints", "c", "--output", "o", "--method", "regmean,magmax"]
    flags = ["--param", "base_weight=0.3,1,3", "--param", "lambda=0.5", "--param", "alpha=[0.9]"]
    config, comparison = config_from_args(build_parser().parse_args([*required, *flags]))
    assert comparison.sweep == {"base_weight": [0.3, 1, 3]} and comparison.several
    assert config.params == {"lambda": 0.5, "alpha": [0.9]}
    swept = tmp_path / "sweep.yaml"
    swept.write_text(
        yaml.safe_dump({"base": "b", "checkpoints": ["c"], "sweep": {"base_weight": [1, 2], "alpha": [1]}})
    )
    _, from_yaml = config_from_args(build_parser().parse_args(["--config", str(swept), "--output", "o"]))
    assert from_yaml.sweep == {"base_weight": [1, 2], "alpha": [1]}
    args = ["--config", str(swept), "--output", "o", "--param", "alpha=0.5", "--param", "base_weight=3,4"]
    config, overridden = config_from_args(build_parser().parse_args(args))  # flags replace the YAML's sweep per key
    assert overridden.sweep == {"base_weight": [3, 4]} and config.params == {"alpha": 0.5}


def test_dry_run_lists_every_swept_merge(llama_family, capsys):
    base, ckpts = llama_family
    args = ["--base", str(base), "--checkpoints", *map(str, ckpts), "--method", "magmax,lines", "--dry-run"]
    code = main([*args, "--param", "lambda=0.5,1", "--param", "beta=0.2,0.4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "4 merge(s) of the same checkpoints:" in out
    for name in ("magmax@lambda=0.5:", "magmax@lambda=1:", "lines@beta=0.2:", "lines@beta=0.4:"):
        assert name in out
    assert "model.layers.1.mlp.up_proj.weight" in out  # and the first merge's per-tensor plan


def test_list_methods_says_which_statistics_each_method_needs(capsys):
    assert main(["--list-methods"]) == 0
    heads = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line and not line[0].isspace()}
    per_language = "[needs per-language --calibration-data (LANG=FILE ...) and --new-language:"
    assert heads["regmean"].endswith(f"{per_language} layer inputs, merged layer by layer]")
    assert heads["fisher_merging"].endswith(f"{per_language} Fisher diagonals]")
    assert heads["obim"].endswith("[needs --calibration-data: activation statistics]")
    assert heads["lines"] == "lines" and heads["magmax"] == "magmax"


def test_calibration_per_language_and_new_languages_reach_the_config(tmp_path):
    required = ["--base", "b", "--checkpoints", "c", "--output", "o"]

    def parsed(*flags: str):
        return config_from_args(build_parser().parse_args([*required, *flags]))

    cfg, comparison = parsed("--calibration-data", "en=en.jsonl", "ru=ru.jsonl", "--new-language", "ru")
    assert cfg.calibration_data == {"en": "en.jsonl", "ru": "ru.jsonl"} and cfg.new_languages == ["ru"]
    assert comparison.objective.new_language == "ru", "one flag names the new language for both"
    cfg, _ = parsed("--calibration-data", "en=en.jsonl", "zh=zh.jsonl", "ru=ru.jsonl", "--new-language", "ru", "zh")
    assert list(cfg.calibration_data) == ["en", "zh", "ru"] and cfg.new_languages == ["ru", "zh"]
    assert parsed("--calibration-data", "calib.jsonl")[0].calibration_data == "calib.jsonl"
    odd = tmp_path / "v=2.jsonl"
    odd.write_text("")
    assert parsed("--calibration-data", str(odd))[0].calibration_data == str(odd), "an existing file is a file"
    for flags, message in (
        (["--calibration-data", "en=en.jsonl", "ru.jsonl"], "LANG=FILE pairs"),
        (["--calibration-data", "en=a.jsonl", "en=b.jsonl"], "'en' twice"),
    ):
        with pytest.raises(ConfigError, match=message):
            parsed(*flags)


def test_an_unknown_key_in_the_yaml_names_the_file_and_the_key(tmp_path, caplog):
    config = tmp_path / "merge.yaml"
    config.write_text("base: base\ncheckpoints: [a, b]\nmethdo: ties\n")
    assert main(["--config", str(config), "--output", str(tmp_path / "out")]) == 2
    expected = f"invalid merge configuration {config}: methdo: Extra inputs are not permitted (did you mean 'method'?)"
    assert expected in caplog.text


def _family_flags(llama_family, calibration_jsonl) -> list[str]:
    base, ckpts = llama_family
    return ["--base", str(base), "--checkpoints", *map(str, ckpts), "--calibration-data", str(calibration_jsonl)]


def test_a_mistyped_param_gets_the_closest_name_as_users_write_it(llama_family, calibration_jsonl, tmp_path, caplog):
    flags = [*_family_flags(llama_family, calibration_jsonl), "--method", "ties", "--param", "densty=0.5"]
    assert main([*flags, "--output", str(tmp_path / "out")]) == 2
    assert "densty: Extra inputs are not permitted (did you mean 'density'?)" in caplog.text
    accepted = caplog.text.split("Parameters it accepts: ")[1]
    assert "lambda," in accepted and "lambda_" not in accepted
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "yaml_text", "names"),
    [
        (["--ratios", "0.2", "0.2", "0.2", "--total-share", "1.0,0.5"], None, ("--ratios", "--total-share")),
        ([], "params: {ratios: [0.2, 0.2, 0.2]}\ntotal_shares: [1.0, 0.5]\n", ("params: ratios:", "total_shares:")),
    ],
    ids=["flags", "yaml"],
)
def test_ratios_with_total_shares_is_a_conflict_named_as_written(
    extra, yaml_text, names, llama_family, calibration_jsonl, tmp_path, caplog
):
    flags = [*_family_flags(llama_family, calibration_jsonl), *extra]
    if yaml_text is not None:
        (tmp_path / "merge.yaml").write_text(yaml_text)
        flags += ["--config", str(tmp_path / "merge.yaml")]
    assert main([*flags, "--output", str(tmp_path / "out"), "--dry-run"]) == 2
    assert f"{names[0]} [0.2, 0.2, 0.2] and {names[1]} [1.0, 0.5] both set the shares n_k" in caplog.text
    assert not (tmp_path / "out").exists()


def _readme_command(marker: str) -> list[str]:
    """The README's shell command (backslash continuations joined) whose first line contains ``marker``."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    return next(line for line in text.splitlines() if marker in line).split()


def test_the_readme_dry_run_line_works_as_written(llama_family, calibration_jsonl, tmp_path, capsys, monkeypatch):
    """README: ``obim-merge-ckpts --config configs/merge/obim_post_pretraining.yaml ... --dry-run``, run word
    for word in a folder where its relative paths (qwen2-7b, run/, calib.jsonl, configs/) are fixtures."""
    base, ckpts = llama_family
    line = _readme_command("obim_post_pretraining.yaml")
    assert line[0] == "obim-merge-ckpts" and "--dry-run" in line
    copy_tree(base, tmp_path / "qwen2-7b")
    for c in ckpts:
        copy_tree(c, tmp_path / "run" / c.name)
    history = [{"step": s, "eval_ja_loss": v} for s, v in {10: 2.0, 20: 1.5, 30: 1.7}.items()]
    (tmp_path / "run" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    copy_tree(ROOT / "configs" / "merge", tmp_path / "configs" / "merge")
    (tmp_path / "calib.jsonl").write_text(calibration_jsonl.read_text())
    monkeypatch.chdir(tmp_path)
    assert main(line[1:]) == 0
    plan = capsys.readouterr().out
    assert plan.count("checkpoint 2:") == 1 and "order [1, 2, 0]" in plan
    assert not (tmp_path / "merged").exists()


def test_every_setting_has_a_flag_with_the_fields_help_and_choices():
    """The flags are generated from the settings: each field's description (with its default) is the help,
    a Literal's values the choices; settings without a flag of their own say where they are set."""
    from typing import get_args

    from obim_trainer.cli import NO_FLAG, SPECIAL_FLAGS
    from obim_trainer.settings.comparison import ComparisonConfig
    from obim_trainer.settings.flags import describe
    from obim_trainer.settings.merge import MergeConfig

    actions = {action.dest: action for action in build_parser()._actions}
    for model in (MergeConfig, ComparisonConfig):
        for name, field in model.model_fields.items():
            if name in NO_FLAG:
                continue
            action = actions[SPECIAL_FLAGS.get(name, {}).get("dest", name)]
            assert describe(field.description).replace("%", "%%") in action.help, name
            literal = [arg for arg in get_args(field.annotation) if isinstance(arg, str)]
            if literal and action.choices is not None:
                assert list(action.choices) == literal, name
    assert actions["dtype"].choices == ["auto", "float32", "bfloat16", "float16"]
    assert actions["progress"].option_strings == ["--no-progress"] and actions["workers"].type is int
    assert "(default 100)" in actions["calibration_samples"].help
    titles = [group.title.split()[0].strip(":") for group in build_parser()._action_groups[2:]]
    assert titles == ["inputs", "calibration", "method", "evaluation", "output"]
