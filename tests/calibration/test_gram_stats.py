"""Input Grams XᵀX/n of every linear map: equal to a hand computation, padding excluded, shared inputs shared,
stored and read back one Gram at a time."""

from __future__ import annotations

import gc
import logging
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
from tests.architectures import tiny_causal_lm
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
    """Each rank measures its half of the texts; after all_reduce every rank holds the statistics of both halves
    (the Grams reduced block by block as they are collected)."""
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
        grams = GramStats.collect(make_tiny_llama(seed=2), share, progress=False, all_reduce=True)  # block by block
        grams.save(out / f"GramStats{{rank}}.safetensors", key="k")
        fishers = FisherStats.collect(make_tiny_llama(seed=2), share, progress=False)
        fishers.all_reduce()
        fishers.save(out / f"FisherStats{{rank}}.safetensors", key="k")
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


def whole_model_grams(model: nn.Module, calibration: CalibrationSet, batch_size: int) -> dict[str, torch.Tensor]:
    """Today's whole-model pass: the recorder on every map over full forward passes, G = XᵀX/n as stored."""
    recorder = GramRecorder(model)
    with recorder.attached(), torch.no_grad():
        for ids, mask in calibration.batches(batch_size):
            recorder.set_token_mask(mask)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    stats = recorder.stats()
    return {name: stats.gram(name).float() for name in stats.maps}


def tiny_qwen2_sliding():
    """Blocks that receive different attention masks (a sliding window on the second block only)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(5)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=400,
        max_position_embeddings=128,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        layer_types=["full_attention", "sliding_attention"],
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_mixtral(seed: int = 0) -> nn.Module:
    """MoE blocks: each expert's Grams come from the tokens routed to it inside the block."""
    return tiny_causal_lm("mixtral", seed=seed)


@pytest.mark.parametrize("factory", [make_tiny_llama, make_tiny_gpt2, tiny_mixtral, tiny_qwen2_sliding])
def test_block_by_block_grams_equal_one_whole_model_pass(factory, calibration, tmp_path, caplog):
    """Collected one block at a time (or, for blocks called with different masks, in one pass), the stored Grams
    are the whole-model pass's, bit for bit: the same float64 sums over the same tokens (experts included)."""
    model = (factory(seed=3) if factory is not tiny_qwen2_sliding else factory()).eval()  # GPT-2 has dropout
    collected = GramStats.collect(model, calibration, batch_size=4, progress=False, spool_dir=tmp_path)
    expected = whole_model_grams(model, calibration, batch_size=4)
    assert set(collected.maps) == set(expected)
    for name, gram in expected.items():
        assert torch.equal(collected.gram(name).float(), gram), name
    walked = "cannot be run block by block" not in caplog.text
    assert walked == (factory is not tiny_qwen2_sliding)


def test_each_blocks_grams_are_written_before_the_next_block_runs(calibration, tmp_path):
    """Memory holds one block's Grams: when block 1 starts, block 0's are already in the file."""
    model = make_tiny_llama(seed=1, num_hidden_layers=3)
    written: list[int] = []

    def file_size(_module, _args):
        partial = [p.stat().st_size for p in tmp_path.glob(".*.tmp")]
        written.append(partial[0] if partial else -1)

    handles = [model.model.layers[i].register_forward_pre_hook(file_size) for i in (1, 2)]
    stats = GramStats.collect(model, calibration, batch_size=100, progress=False, spool_dir=tmp_path)
    for handle in handles:
        handle.remove()
    per_block = 4 * (3 * 64 * 64 + 128 * 128)  # float32: q/k/v, o, gate/up (64²) and down (128²)
    assert len(written) == 2 + 2  # the probe batch runs whole first (nothing written yet), then each block once
    assert written[:2] == [0, 0]
    block_1, block_2 = written[2:]
    assert block_2 - block_1 == per_block and block_1 > per_block
    assert stats.file is not None and stats.file.path.parent == tmp_path


def test_collected_grams_are_moved_into_place_and_an_unsaved_or_broken_collection_leaves_no_file(calibration, tmp_path):
    spool = tmp_path / "spool"
    stats = GramStats.collect(make_tiny_llama(), calibration, batch_size=4, progress=False, spool_dir=spool)
    expected = {name: stats.gram(name) for name in stats.maps}
    stats.save(tmp_path / "cache" / "g.safetensors", key="a" * 64)
    assert list(spool.iterdir()) == []
    loaded = GramStats.load(tmp_path / "cache" / "g.safetensors", expected_key="a" * 64)
    assert all(torch.equal(loaded.gram(name), gram) for name, gram in expected.items())

    GramStats.collect(make_tiny_llama(), calibration, batch_size=4, progress=False, spool_dir=spool)
    gc.collect()
    assert list(spool.iterdir()) == [], "a collection nobody saved is removed"
    broken = make_tiny_llama()
    with torch.no_grad():
        broken.model.layers[0].self_attn.o_proj.weight[0, 0] = float("nan")
    nan = GramStats.collect(broken, calibration, batch_size=4, progress=False, spool_dir=spool)
    assert not nan.is_finite() and nan.file is None and list(spool.iterdir()) == []


def test_grams_of_the_previous_format_are_recomputed_never_read(calibration, tmp_path, caplog):
    from obim_trainer.calibration import load_or_compute_stats
    from obim_trainer.calibration.stats_file import write_stats_file

    model = make_tiny_llama()
    checkpoint = tmp_path / "checkpoint-5"
    old = tmp_path / "cache" / f"checkpoint-5-{'b' * 16}.safetensors"
    write_stats_file(old, {"x": torch.eye(2)}, "b" * 64, "grams-v1", {"maps": {}, "count": {}, "in_axis": {}})
    with caplog.at_level(logging.WARNING):
        stats, source = load_or_compute_stats(
            checkpoint,
            "b" * 64,
            lambda: GramStats.collect(model, calibration, progress=False, spool_dir=tmp_path / "cache"),
            cache_dir=tmp_path / "cache",
            load=GramStats.load,
        )
    assert source == "computed" and "holds grams-v1, not grams-v2" in caplog.text
    assert GramStats.load(old, expected_key="b" * 64).maps == stats.maps
