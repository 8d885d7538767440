"""Every user-fixable error of issue 2: one clear message naming the file/tensor and the fix, and no output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from obim_trainer.cli import main
from obim_trainer.errors import OBIMError
from obim_trainer.pipeline.merge import merge_checkpoints
from tests.conftest import copy_tree


@pytest.fixture
def family(llama_family, tmp_path) -> tuple[Path, list[Path]]:
    base, ckpts = llama_family
    return copy_tree(base, tmp_path / "base"), [copy_tree(c, tmp_path / c.name) for c in ckpts]


def edit_weights(folder: Path, edit) -> None:
    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def assert_fails_cleanly(tmp_path: Path, *fragments: str, **kwargs) -> None:
    output = kwargs.setdefault("output", tmp_path / "merged")
    kwargs.setdefault("progress", False)
    with pytest.raises(OBIMError) as info:
        merge_checkpoints(**kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert not Path(output).exists()
    assert not [p for p in Path(output).parent.iterdir() if ".tmp-" in p.name], "temporary folder left behind"


def test_missing_base(family, calibration_jsonl, tmp_path):
    _, ckpts = family
    assert_fails_cleanly(
        tmp_path,
        "nope",
        "does not exist",
        base=tmp_path / "nope",
        checkpoints=ckpts,
        calibration_data=calibration_jsonl,
    )


def test_missing_checkpoint(family, calibration_jsonl, tmp_path):
    base, ckpts = family
    assert_fails_cleanly(
        tmp_path,
        "checkpoint-99",
        "does not exist",
        base=base,
        checkpoints=[ckpts[0], tmp_path / "checkpoint-99"],
        calibration_data=calibration_jsonl,
    )


def test_checkpoint_with_tensor_the_base_lacks(family, calibration_jsonl, tmp_path):
    base, ckpts = family
    edit_weights(ckpts[1], lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(3)))
    assert_fails_cleanly(
        tmp_path,
        "checkpoint-20",
        "model.extra.weight",
        "base",
        base=base,
        checkpoints=ckpts,
        calibration_data=calibration_jsonl,
    )


def test_checkpoint_missing_a_base_tensor(family, calibration_jsonl, tmp_path):
    base, ckpts = family
    edit_weights(ckpts[0], lambda sd: sd.pop("model.norm.weight"))
    assert_fails_cleanly(
        tmp_path,
        "checkpoint-10",
        "lacks",
        "model.norm.weight",
        base=base,
        checkpoints=ckpts,
        calibration_data=calibration_jsonl,
    )


def test_shape_mismatch(family, calibration_jsonl, tmp_path):
    base, ckpts = family
    edit_weights(ckpts[2], lambda sd: sd.__setitem__("model.norm.weight", torch.ones(65)))
    assert_fails_cleanly(
        tmp_path,
        "model.norm.weight",
        "(64,)",
        "(65,)",
        "checkpoint-30",
        base=base,
        checkpoints=ckpts,
        calibration_data=calibration_jsonl,
    )


def test_vocabulary_size_mismatch_between_checkpoints(family, calibration_jsonl, tmp_path):
    base, ckpts = family
    name = "model.embed_tokens.weight"
    edit_weights(ckpts[0], lambda sd: sd.__setitem__(name, torch.cat([sd[name], sd[name][:8]])))
    assert_fails_cleanly(
        tmp_path,
        name,
        "different vocabulary sizes",
        "328, ",
        "share one vocabulary",
        base=base,
        checkpoints=ckpts,
        calibration_data=calibration_jsonl,
    )


@pytest.mark.parametrize(
    ("bad", "method", "workers"),
    [(float("nan"), "obim", 1), (float("inf"), "obim", 1), (float("nan"), "ties_im", 2)],  # statistics / merge
)
def test_nan_or_inf_in_checkpoint(family, calibration_jsonl, tmp_path, bad, method, workers):
    base, ckpts = family
    name = "model.layers.1.mlp.down_proj.weight"

    def poison(sd):
        sd[name][3, 5] = bad

    edit_weights(ckpts[1], poison)
    assert_fails_cleanly(
        tmp_path,
        name,
        "NaN or Inf",
        "checkpoint-20",
        "leave it out",
        base=base,
        checkpoints=ckpts,
        calibration_data=calibration_jsonl,
        method=method,
        workers=workers,
    )


def test_ratios_of_wrong_count(family, calibration_jsonl, tmp_path):
    base, ckpts = family
    assert_fails_cleanly(
        tmp_path,
        "ratios",
        "3",
        base=base,
        checkpoints=ckpts,
        calibration_data=calibration_jsonl,
        params={"ratios": [0.5, 0.5]},
    )


def test_ratios_summing_above_one(family, calibration_jsonl, tmp_path):
    base, ckpts = family
    assert_fails_cleanly(
        tmp_path,
        "ratios",
        "1",
        base=base,
        checkpoints=ckpts,
        calibration_data=calibration_jsonl,
        params={"ratios": [0.5, 0.4, 0.3]},
    )


def test_unknown_order(family, calibration_jsonl, tmp_path):
    base, ckpts = family
    assert_fails_cleanly(
        tmp_path,
        "order",
        "rotation",
        base=base,
        checkpoints=ckpts,
        calibration_data=calibration_jsonl,
        params={"order": "sideways"},
    )


def test_unknown_method(family, tmp_path):
    base, ckpts = family
    assert_fails_cleanly(
        tmp_path, "unknown merge method 'obimm'", "--list-methods", base=base, checkpoints=ckpts, method="obimm"
    )


def test_empty_calibration_file(family, tmp_path):
    base, ckpts = family
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_fails_cleanly(tmp_path, "empty.jsonl", base=base, checkpoints=ckpts, calibration_data=empty)


def test_unreadable_calibration_file(family, tmp_path):
    base, ckpts = family
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert_fails_cleanly(tmp_path, "broken.jsonl", "2", base=base, checkpoints=ckpts, calibration_data=broken)


def test_missing_calibration_data_for_obim(family, tmp_path):
    base, ckpts = family
    assert_fails_cleanly(tmp_path, "calibration_data=FILE", base=base, checkpoints=ckpts)


def test_corrupt_safetensors(family, calibration_jsonl, tmp_path):
    base, ckpts = family
    weights = ckpts[2] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_fails_cleanly(
        tmp_path, "checkpoint-30", "model.safetensors", base=base, checkpoints=ckpts, calibration_data=calibration_jsonl
    )


def test_output_inside_an_input(family, calibration_jsonl, tmp_path):
    base, ckpts = family
    before = sorted(p.name for p in ckpts[0].iterdir())
    with pytest.raises(OBIMError, match="inside"):
        merge_checkpoints(
            base=base, checkpoints=ckpts, calibration_data=calibration_jsonl, output=ckpts[0] / "merged", progress=False
        )
    assert sorted(p.name for p in ckpts[0].iterdir()) == before


def test_existing_output_refused_without_overwrite(family, calibration_jsonl, tmp_path):
    base, ckpts = family
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    with pytest.raises(OBIMError, match="set overwrite=True"):
        merge_checkpoints(base=base, checkpoints=ckpts, calibration_data=calibration_jsonl, output=out, progress=False)
    assert (out / "keep.txt").read_text() == "earlier output"


def test_failed_overwrite_keeps_the_earlier_output(family, calibration_jsonl, tmp_path):
    base, ckpts = family
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    edit_weights(ckpts[0], lambda sd: sd["model.norm.weight"].fill_(float("nan")))
    with pytest.raises(OBIMError, match="NaN"):
        merge_checkpoints(
            base=base, checkpoints=ckpts, calibration_data=calibration_jsonl, output=out, overwrite=True, progress=False
        )
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_no_checkpoints(family, tmp_path):
    base, _ = family
    assert_fails_cleanly(tmp_path, "no checkpoints", "checkpoints=[DIR, ...]", base=base, checkpoints=[])


def test_cli_prints_one_line_not_a_traceback(family, calibration_jsonl, tmp_path, caplog, capsys):
    base, ckpts = family
    code = main(
        [
            "--base",
            str(base),
            "--checkpoints",
            *map(str, ckpts),
            "--calibration-data",
            str(calibration_jsonl),
            "--output",
            str(tmp_path / "m"),
            "--ratios",
            "0.9",
            "0.9",
            "0.9",
        ]
    )
    assert code == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "ratios" in errors[0].getMessage()
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
