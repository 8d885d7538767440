"""Σx² per input feature of every Linear/Conv1D, over real tokens only."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from obim_trainer.calibration import ActivationStats, tokenize_calibration
from obim_trainer.errors import CalibrationError
from tests.conftest import make_texts, make_tiny_gpt2, make_tiny_llama


def reference_stats(model, calibration):
    """One sample at a time (no padding at all), inputs captured whole and summed in the test."""
    sums, counts, handles = {}, {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":

            def grab(_m, args, name=f"{name}.weight"):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x**2).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]

            handles.append(module.register_forward_pre_hook(grab))
    with torch.no_grad():
        for ids in calibration.input_ids:
            model(input_ids=ids[None], use_cache=False)
    for h in handles:
        h.remove()
    return sums, counts


@pytest.fixture(scope="module")
def calibration(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenize_calibration(make_texts(10, seed=3), tok, max_length=96)


@pytest.mark.parametrize("factory", [make_tiny_llama, make_tiny_gpt2])
def test_padded_batches_equal_the_unpadded_reference(factory, calibration):
    model = factory(seed=2).eval()
    stats = ActivationStats.collect(model, calibration, batch_size=4, progress=False)
    sums, counts = reference_stats(model, calibration)
    assert set(stats.sq_sum) == set(sums)
    for name in sums:
        assert stats.count[name] == counts[name] == calibration.num_tokens
        torch.testing.assert_close(stats.sq_sum[name].double(), sums[name], rtol=1e-4, atol=1e-5)
    assert int(stats.token_counts.sum()) == calibration.num_tokens


def test_conv1d_axis_and_broadcast_shapes(calibration):
    stats = ActivationStats.collect(make_tiny_gpt2(), calibration, batch_size=8, progress=False)
    name = "transformer.h.0.mlp.c_proj.weight"  # Conv1D weight [in=256, out=64]
    assert stats.in_axis[name] == 0 and stats.sq_sum[name].shape == (256,)
    assert stats.input_sq_mean(name).shape == (256, 1)
    llama = ActivationStats.collect(make_tiny_llama(), calibration, batch_size=8, progress=False)
    assert llama.in_axis["model.layers.0.mlp.down_proj.weight"] == 1
    assert llama.input_sq_mean("model.layers.0.mlp.down_proj.weight").shape == (1, 128)
    assert llama.input_sq_mean("not.a.layer.weight") is None


def test_save_load_round_trip_and_key_check(calibration, tmp_path):
    stats = ActivationStats.collect(make_tiny_llama(), calibration, batch_size=8, progress=False)
    path = tmp_path / "s.safetensors"
    stats.save(path, key="abc")
    again = ActivationStats.load(path, expected_key="abc")
    assert again.count == stats.count and again.in_axis == stats.in_axis
    assert all(torch.equal(again.sq_sum[n], stats.sq_sum[n]) for n in stats.sq_sum)
    assert torch.equal(again.token_counts, stats.token_counts)
    with pytest.raises(CalibrationError, match="key mismatch"):
        ActivationStats.load(path, expected_key="other")
    path.write_bytes(b"garbage")
    with pytest.raises(CalibrationError, match="unreadable"):
        ActivationStats.load(path)


def test_all_reduce_over_two_processes_equals_one_process(calibration, tmp_path):
    torch.save({"ids": calibration.input_ids, "pad": calibration.pad_token_id}, tmp_path / "calib.pt")
    script = tmp_path / "reduce.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, torch, torch.distributed as dist
        from obim_trainer.calibration import ActivationStats, CalibrationSet
        from tests.conftest import make_tiny_llama
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        data = torch.load({str(tmp_path / "calib.pt")!r})
        calib = CalibrationSet(data["ids"], data["pad"]).shard(rank, world)
        stats = ActivationStats.collect(make_tiny_llama(seed=2), calib, batch_size=3, progress=False)
        stats.all_reduce()
        if rank == 0:
            stats.save(__import__("pathlib").Path({str(tmp_path / "reduced.safetensors")!r}), key="k")
        dist.destroy_process_group()
    """)
    )
    root = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531", str(script)],
        timeout=240,
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    reduced = ActivationStats.load(tmp_path / "reduced.safetensors")
    single = ActivationStats.collect(make_tiny_llama(seed=2), calibration, batch_size=3, progress=False)
    assert reduced.count == single.count
    for name in single.sq_sum:
        torch.testing.assert_close(reduced.sq_sum[name], single.sq_sum[name], rtol=1e-5, atol=1e-5)
    assert torch.equal(reduced.token_counts, single.token_counts)
