"""Σx² per input feature of every Linear/Conv1D, over real tokens only, and its reduction across ranks."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoTokenizer
from transformers.pytorch_utils import Conv1D

from obim_trainer.calibration import ActivationRecorder, ActivationStats, CalibrationSet, tokenize_calibration
from obim_trainer.errors import CalibrationError
from tests.conftest import make_texts, make_tiny_gpt2, make_tiny_llama
from tests.launch import run_env, run_on_free_port, torchrun


def reference_stats(model: nn.Module, calibration: CalibrationSet) -> tuple[dict, dict]:
    """One sample at a time (no padding at all), whole inputs captured and summed in float64."""
    sums, counts, handles = {}, {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):

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
def calibration(tokenizer_dir) -> CalibrationSet:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenize_calibration(make_texts(10, seed=3), tok, max_length=96)


@pytest.mark.parametrize("factory", [make_tiny_llama, make_tiny_gpt2])
def test_padded_batches_equal_the_unpadded_reference(factory, calibration):
    model = factory(seed=2).eval()
    stats = ActivationStats.collect(model, calibration, batch_size=4, progress=False)
    sums, counts = reference_stats(model, calibration)
    assert set(stats.sq_sum) == set(sums) and len(sums) >= 8
    for name in sums:
        assert stats.count[name] == counts[name] == calibration.num_tokens
        assert stats.sq_sum[name].dtype == torch.float32
        torch.testing.assert_close(stats.sq_sum[name].double(), sums[name], rtol=1e-4, atol=1e-5)
    assert torch.equal(stats.token_counts, calibration.token_counts(320))


def test_padding_is_excluded_from_sums_and_counts():
    model = make_tiny_llama(seed=4)
    short, long = torch.tensor([1, 40, 41, 42]), torch.arange(1, 60)
    # pad with a real, frequent token so that counting padding would change the sums
    batched = CalibrationSet([short, long], pad_token_id=40)
    alone = [ActivationStats.collect(model, CalibrationSet([s], 40), progress=False) for s in (short, long)]
    together = ActivationStats.collect(model, batched, batch_size=2, progress=False)
    for name, total in together.sq_sum.items():
        assert together.count[name] == 4 + 59
        torch.testing.assert_close(total, alone[0].sq_sum[name] + alone[1].sq_sum[name], rtol=1e-5, atol=1e-6)
    unmasked = ActivationRecorder(model)
    with unmasked.attached(), torch.no_grad():
        ids, _mask = next(batched.batches(2))
        model(input_ids=ids, use_cache=False)  # no token mask: every position counts
    name = "model.layers.0.mlp.down_proj.weight"
    assert unmasked.stats().count[name] == 2 * 59
    assert not torch.allclose(unmasked.stats().sq_sum[name], together.sq_sum[name])


def test_conv1d_axis_sizes_and_broadcast_shapes(calibration):
    gpt2 = make_tiny_gpt2()
    stats = ActivationStats.collect(gpt2, calibration, batch_size=8, progress=False)
    conv_names = {f"{n}.weight" for n, m in gpt2.named_modules() if isinstance(m, Conv1D)}
    assert len(conv_names) == 8 and set(stats.sq_sum) == conv_names | {"lm_head.weight"}
    weights = dict(gpt2.named_parameters(remove_duplicate=False))
    for name in conv_names:
        assert stats.in_axis[name] == 0 and stats.sq_sum[name].shape == (weights[name].shape[0],)
    assert stats.in_axis["lm_head.weight"] == 1
    for name in stats.sq_sum:
        mean = stats.input_sq_mean(name)
        assert (mean * weights[name]).shape == weights[name].shape
        torch.testing.assert_close(mean.flatten(), stats.sq_sum[name] / calibration.num_tokens)
    assert stats.input_sq_mean("transformer.h.0.mlp.c_proj.weight").shape == (4 * 64, 1)
    llama = ActivationStats.collect(make_tiny_llama(), calibration, batch_size=8, progress=False)
    assert llama.in_axis["model.layers.0.mlp.down_proj.weight"] == 1
    assert llama.input_sq_mean("model.layers.0.mlp.down_proj.weight").shape == (1, 128)
    assert llama.input_sq_mean("not.a.layer.weight") is None


def test_collect_restores_training_mode_and_names_the_model_in_the_progress_bar(calibration, capsys):
    model = make_tiny_llama().train()
    ActivationStats.collect(model, calibration, batch_size=5, progress=True)
    assert model.training and "activation statistics of LlamaForCausalLM" in capsys.readouterr().err


class ToyMoE(nn.Module):
    """Tokens routed by parity to one of two experts (called with a keyword input); one layer never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 8)
        self.router = nn.Linear(8, 2)
        self.experts = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.unused = nn.Linear(8, 3)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        hidden = self.embed(input_ids).reshape(-1, 8)
        self.router(hidden)
        routes = input_ids.reshape(-1) % 2
        return [expert(input=hidden[routes == e]) for e, expert in enumerate(self.experts)]


class Wrapper(nn.Module):
    """Stands in for DDP / a DeepSpeed engine: the model lives under ``module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_routed_layers_count_their_rows_and_unused_layers_are_reported(caplog):
    torch.manual_seed(0)
    model = ToyMoE()
    calib = CalibrationSet([torch.tensor([3, 4, 5, 6, 7]), torch.tensor([8, 9]), torch.tensor([10])], pad_token_id=1)
    with caplog.at_level(logging.INFO, logger="obim_trainer.calibration.activation_stats"):
        stats = ActivationStats.collect(model, calib, batch_size=2, progress=False)
    assert stats.count["router.weight"] == calib.num_tokens == 8
    expected_sq, expected_rows = [torch.zeros(8), torch.zeros(8)], [0, 0]
    with torch.no_grad():
        for ids, _mask in calib.batches(2):  # experts see every routed row, padding included
            hidden, routes = model.embed(ids).reshape(-1, 8), ids.reshape(-1) % 2
            for e in (0, 1):
                expected_sq[e] += hidden[routes == e].square().sum(0)
                expected_rows[e] += int((routes == e).sum())
    for e in (0, 1):
        assert stats.count[f"experts.{e}.weight"] == expected_rows[e]
        torch.testing.assert_close(stats.sq_sum[f"experts.{e}.weight"], expected_sq[e])
    assert sum(expected_rows) == 5 * 2 + 1 > calib.num_tokens
    assert "experts.0.weight sees" in caplog.text and caplog.text.count("experts.0.weight sees") == 1
    assert stats.count["unused.weight"] == 0 and torch.equal(stats.sq_sum["unused.weight"], torch.zeros(8))
    assert "1 layer(s) never ran" in caplog.text


def test_recorder_on_a_wrapped_live_model_uses_the_model_own_names(calibration):
    model = make_tiny_llama(seed=5)
    expected = ActivationStats.collect(model, calibration, batch_size=4, progress=False)
    model.train()  # a training loop's model, gradients enabled
    recorder = ActivationRecorder(Wrapper(model))
    for ids, mask in calibration.batches(3):
        with recorder.attached():  # attaching per step keeps accumulating
            recorder.set_token_mask(mask)
            model(input_ids=ids, attention_mask=mask, use_cache=False).logits.sum().backward()
    stats = recorder.stats()
    assert set(stats.sq_sum) == set(expected.sq_sum) and "model.layers.1.self_attn.o_proj.weight" in stats.sq_sum
    assert stats.count == expected.count
    for name in expected.sq_sum:
        torch.testing.assert_close(stats.sq_sum[name], expected.sq_sum[name], rtol=1e-4, atol=1e-5)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_save_load_round_trip_and_rejections(calibration, tmp_path):
    stats = ActivationStats.collect(make_tiny_llama(), calibration, batch_size=8, progress=False)
    path = tmp_path / "stats" / "s.safetensors"
    stats.save(path, key="abc", extra_metadata={"checkpoint": "ckpt-10", "key": "not-this"})
    assert [p.name for p in path.parent.iterdir()] == ["s.safetensors"]  # no temporary file left
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["key"] == "abc" and meta["checkpoint"] == "ckpt-10" and json.loads(meta["count"]) == stats.count
    again = ActivationStats.load(path, expected_key="abc")
    assert again.count == stats.count and again.in_axis == stats.in_axis
    assert all(torch.equal(again.sq_sum[n], stats.sq_sum[n]) for n in stats.sq_sum)
    assert torch.equal(again.token_counts, stats.token_counts)
    with pytest.raises(CalibrationError, match="key mismatch"):
        ActivationStats.load(path, expected_key="other")
    ActivationStats(stats.sq_sum, {}, stats.in_axis).save(path, key="abc")
    with pytest.raises(CalibrationError, match="inconsistent"):
        ActivationStats.load(path)
    stats.save(path, key="abc", extra_metadata={"format_version": "0"})  # our metadata wins over extras
    assert ActivationStats.load(path).count == stats.count
    path.write_bytes(b"garbage")
    with pytest.raises(CalibrationError, match=r"s\.safetensors is unreadable"):
        ActivationStats.load(path)


def test_all_reduce_is_a_no_op_without_a_process_group(calibration):
    stats = ActivationStats.collect(make_tiny_llama(), calibration, batch_size=8, progress=False)
    before = {n: t.clone() for n, t in stats.sq_sum.items()}, dict(stats.count)
    stats.all_reduce()
    assert stats.count == before[1] and all(torch.equal(stats.sq_sum[n], t) for n, t in before[0].items())


def test_the_callbacks_collection_is_the_merges_in_one_process(calibration):
    """``across_ranks`` (the callback on the live model) runs the same loop: outside a process group the
    statistics are bit-identical to a merge's."""
    model, samples = make_tiny_llama(seed=2), CalibrationSet(calibration.input_ids[:4], calibration.pad_token_id)
    merge = ActivationStats.collect(model, samples, batch_size=3, progress=False)
    live = ActivationStats.collect(model, samples, batch_size=3, progress=False, across_ranks=True)
    assert live.count == merge.count and live.in_axis == merge.in_axis
    assert all(torch.equal(live.sq_sum[n], merge.sq_sum[n]) for n in merge.sq_sum)
    assert torch.equal(live.token_counts, merge.token_counts)


def run_two_ranks(tmp_path: Path, calibration: CalibrationSet, body: str) -> None:
    """``body`` (process group + ``model``) on 2 ranks; each collects its half, reduces, saves both states."""
    torch.save({"ids": calibration.input_ids, "pad": calibration.pad_token_id}, tmp_path / "calib.pt")
    script = tmp_path / "ranks.py"
    steps = textwrap.dedent(body) + textwrap.dedent("""
        rank, world = dist.get_rank(), dist.get_world_size()
        stats = ActivationStats.collect(model, CalibrationSet(data["ids"], data["pad"]).shard(rank, world),
                                        batch_size=3, progress=False)
        stats.save(out / f"rank{rank}.safetensors", key="k")
        stats.all_reduce()
        stats.save(out / f"reduced{rank}.safetensors", key="k")
        """)
    script.write_text(
        textwrap.dedent(f"""
        from pathlib import Path
        import torch, torch.distributed as dist
        from obim_trainer.calibration import ActivationStats, CalibrationSet
        from obim_trainer.distributed.teardown import process_group_teardown
        from tests.conftest import make_tiny_llama
        out = Path({str(tmp_path)!r})
        data = torch.load(out / "calib.pt")
        def run():
        """)
        + textwrap.indent(steps, "    ")
        + "with process_group_teardown():  # the model and engine go before the process group\n    run()\n"
    )
    log_file = tmp_path / "launch.log"
    status, log = run_on_free_port(lambda port: [*torchrun(2, port), str(script)], run_env(), 300, log_file)
    assert status == 0, log


def assert_reduced_equals_single_process(tmp_path: Path, calibration: CalibrationSet) -> None:
    single = ActivationStats.collect(make_tiny_llama(seed=2), calibration, batch_size=3, progress=False)
    share = ActivationStats.load(tmp_path / "rank0.safetensors")
    assert 0 < share.count["lm_head.weight"] < single.count["lm_head.weight"]  # each rank saw only its half
    for rank in (0, 1):
        reduced = ActivationStats.load(tmp_path / f"reduced{rank}.safetensors")
        assert reduced.count == single.count
        for name in single.sq_sum:
            torch.testing.assert_close(reduced.sq_sum[name], single.sq_sum[name], rtol=1e-5, atol=1e-5)
        assert torch.equal(reduced.token_counts, single.token_counts)


@pytest.mark.slow
def test_all_reduce_over_two_processes_equals_one_process(calibration, tmp_path):
    body = """
        dist.init_process_group("gloo")
        model = make_tiny_llama(seed=2)
    """
    run_two_ranks(tmp_path, calibration, body)
    assert_reduced_equals_single_process(tmp_path, calibration)


@pytest.mark.slow
def test_deepspeed_zero3_engine_with_partitioned_weights(calibration, tmp_path):
    pytest.importorskip("deepspeed")
    body = """
        import os
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo")
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
        tiny = make_tiny_llama(seed=2)
        model, *_ = deepspeed.initialize(model=tiny, config=config, model_parameters=list(tiny.parameters()))
        assert tiny.model.layers[0].mlp.up_proj.weight.numel() == 0  # partitioned: no rank holds the whole weight
    """
    run_two_ranks(tmp_path, calibration, body)  # the engine itself: names under its "module." are stripped
    assert_reduced_equals_single_process(tmp_path, calibration)
