"""Input Grams XᵀX/n of every linear map: equal to a hand computation, padding excluded, shared inputs shared,
stored and read back one Gram at a time."""

from __future__ import annotations

import pickle
import textwrap

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer
from transformers.pytorch_utils import Conv1D

from obim_trainer.calibration import CalibrationSet, tokenize_calibration
from obim_trainer.calibration.fisher_stats import FisherStats
from obim_trainer.calibration.gram_stats import GramRecorder, GramStats
from obim_trainer.errors import CalibrationError
from tests.conftest import make_texts, make_tiny_gpt2, make_tiny_llama
from tests.launch import run_env, run_on_free_port, torchrun


@pytest.fixture(scope="module")
def calibration(tokenizer_dir) -> CalibrationSet:
    return tokenize_calibration(make_texts(10, seed=3), AutoTokenizer.from_pretrained(tokenizer_dir), max_length=96)


def reference_grams(model: nn.Module, calibration: CalibrationSet) -> dict[str, torch.Tensor]:
    """One sample at a time (no padding at all), each map's whole input captured, XᵀX/n in float64."""
    sums, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):

            def grab(_m, args, name=f"{name}.weight"):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.T @ x

            handles.append(module.register_forward_pre_hook(grab))
    with torch.no_grad():
        for ids in calibration.input_ids:
            model(input_ids=ids[None], use_cache=False)
    for h in handles:
        h.remove()
    return {name: s / calibration.num_tokens for name, s in sums.items()}


@pytest.mark.parametrize("factory", [make_tiny_llama, make_tiny_gpt2])
def test_padded_batches_equal_the_hand_computed_gram_of_every_map(factory, calibration):
    model = factory(seed=2).eval()
    grams = GramStats.collect(model, calibration, batch_size=4, progress=False)
    reference = reference_grams(model, calibration)
    assert set(grams.maps) == set(reference) and len(reference) >= 8
    for name, expected in reference.items():
        gram = grams.gram(name)
        assert gram.dtype == torch.float64 and gram.shape == expected.shape
        torch.testing.assert_close(gram, expected, rtol=1e-5, atol=1e-7)  # padded vs unpadded float32 forward
        assert grams.count[grams.group(name)] == calibration.num_tokens


def test_maps_reading_the_same_input_share_one_gram(calibration):
    llama = GramStats.collect(make_tiny_llama(), calibration, batch_size=4, progress=False)
    for block in (0, 1):
        attention, mlp = f"model.layers.{block}.self_attn.", f"model.layers.{block}.mlp."
        assert {llama.group(attention + m + ".weight") for m in ("q_proj", "k_proj", "v_proj")} == {
            attention + "q_proj.weight"
        }
        assert llama.group(mlp + "up_proj.weight") == llama.group(mlp + "gate_proj.weight") == mlp + "gate_proj.weight"
        for alone in (attention + "o_proj.weight", mlp + "down_proj.weight"):
            assert llama.group(alone) == alone
    assert len(llama.count) == 2 * 4 + 1  # 4 distinct inputs per block and the LM head
    gpt2 = GramStats.collect(make_tiny_gpt2(), calibration, batch_size=4, progress=False)
    assert all(gpt2.group(n) == n for n in gpt2.maps) and gpt2.in_axis["transformer.h.0.attn.c_attn.weight"] == 0
    assert gpt2.gram("transformer.h.0.mlp.c_proj.weight").shape == (256, 256)


def test_padding_is_excluded():
    model = make_tiny_llama(seed=4)
    short, long = torch.tensor([1, 40, 41, 42]), torch.arange(1, 60)
    alone = [GramStats.collect(model, CalibrationSet([s], 40), progress=False) for s in (short, long)]
    together = GramStats.collect(model, CalibrationSet([short, long], pad_token_id=40), batch_size=2, progress=False)
    for name, group in together.maps.items():
        assert together.count[group] == 4 + 59
        sums = [stats.gram(name) * stats.count[group] for stats in (together, *alone)]
        torch.testing.assert_close(sums[0], sums[1] + sums[2], rtol=1e-4, atol=1e-7)
    unmasked = GramRecorder(model)
    with unmasked.attached(), torch.no_grad():
        ids, _mask = next(CalibrationSet([short, long], pad_token_id=40).batches(2))
        model(input_ids=ids, use_cache=False)  # no token mask: every position counts
    assert unmasked.stats().count["model.layers.0.mlp.down_proj.weight"] == 2 * 59


def test_collect_restores_the_mode_and_touches_no_gradient(calibration):
    model = make_tiny_llama().train()
    GramStats.collect(model, calibration, batch_size=5, progress=False)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_saved_grams_are_read_back_one_at_a_time_and_pickle_without_tensors(calibration, tmp_path):
    grams = GramStats.collect(make_tiny_llama(), calibration, batch_size=4, progress=False)
    expected = {name: grams.gram(name) for name in grams.maps}
    grams.save(tmp_path / "g.safetensors", key="k1")
    assert grams.sums is None  # the memory is given back; the file serves the merge
    loaded = GramStats.load(tmp_path / "g.safetensors", expected_key="k1")
    shipped = pickle.loads(pickle.dumps(loaded))
    assert len(pickle.dumps(loaded)) < 10_000
    for name, gram in expected.items():
        for source in (grams, loaded, shipped):
            torch.testing.assert_close(source.gram(name), gram, rtol=1e-6, atol=1e-9)  # stored in float32
    assert loaded.gram("no.such.weight") is None
    with pytest.raises(CalibrationError, match="other inputs"):
        GramStats.load(tmp_path / "g.safetensors", expected_key="k2")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CalibrationError, match=r"bad\.safetensors is unreadable"):
        GramStats.load(tmp_path / "bad.safetensors")


def test_activation_statistics_files_are_not_grams(calibration, tmp_path):
    from obim_trainer.calibration import ActivationStats

    ActivationStats.collect(make_tiny_llama(), calibration, progress=False).save(tmp_path / "a.safetensors", key="k")
    with pytest.raises(CalibrationError, match="holds activations, not grams"):
        GramStats.load(tmp_path / "a.safetensors", expected_key="k")


def test_grams_and_fishers_reduced_over_two_processes_equal_the_sum_of_their_shares(calibration, tmp_path):
    """Each rank measures its half of the texts; after all_reduce every rank holds the statistics of both halves."""
    torch.save({"ids": calibration.input_ids, "pad": calibration.pad_token_id}, tmp_path / "calib.pt")
    script = tmp_path / "ranks.py"
    script.write_text(
        textwrap.dedent(f"""
        from pathlib import Path
        import torch, torch.distributed as dist
        from obim_trainer.calibration import CalibrationSet
        from obim_trainer.calibration.fisher_stats import FisherStats
        from obim_trainer.calibration.gram_stats import GramStats
        from tests.conftest import make_tiny_llama
        out = Path({str(tmp_path)!r})
        data = torch.load(out / "calib.pt")
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        share = CalibrationSet(data["ids"], data["pad"]).shard(rank, world)
        for kind in (GramStats, FisherStats):
            stats = kind.collect(make_tiny_llama(seed=2), share, progress=False)
            stats.all_reduce()
            stats.save(out / f"{{kind.__name__}}{{rank}}.safetensors", key="k")
        dist.destroy_process_group()
        """)
    )
    status, log = run_on_free_port(lambda port: [*torchrun(2, port), str(script)], run_env(), 300, tmp_path / "run.log")
    assert status == 0, log
    model = make_tiny_llama(seed=2)
    single = GramStats.collect(model, calibration, progress=False)
    halves = [FisherStats.collect(model, calibration.shard(r, 2), progress=False) for r in (0, 1)]
    batches = halves[0].batches + halves[1].batches
    for rank in (0, 1):
        grams = GramStats.load(tmp_path / f"GramStats{rank}.safetensors")
        assert grams.count == single.count and grams.maps == single.maps
        for name in single.maps:
            torch.testing.assert_close(grams.gram(name), single.gram(name), rtol=1e-5, atol=1e-7)
        fishers = FisherStats.load(tmp_path / f"FisherStats{rank}.safetensors")
        assert fishers.batches == batches
        for name in fishers.names:
            expected = (halves[0].sums[name] + halves[1].sums[name]) / batches
            torch.testing.assert_close(fishers.fisher(name), expected, rtol=1e-5, atol=1e-12)
