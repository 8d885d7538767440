"""Sequential forgetting-aware RegMean against a brute-force reference that runs whole models.

The reference loads every model in full and, for each linear map in forward order, runs the whole
partially merged model to get its inputs, solves the stacked weighted least-squares problem with
``torch.linalg.lstsq`` in float64, sets the weight and goes on. The streaming merge must give the
same tensors while holding one block per model.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from obim_trainer.calibration import CalibrationSet, tokenize_calibration
from obim_trainer.calibration.activation_stats import linear_layers
from obim_trainer.checkpoints import open_checkpoint
from obim_trainer.checkpoints.reader import CheckpointReader, TensorInfo
from obim_trainer.checkpoints.safetensors_writer import ShardedSafetensorsWriter
from obim_trainer.errors import CalibrationError, ConfigError
from obim_trainer.pipeline.engine import plan_merge
from obim_trainer.pipeline.layout import ModelLayout, block_index
from obim_trainer.pipeline.sequential_regmean import sequential_regmean, sequential_write_order
from tests.conftest import VOCAB_SIZE, make_texts, make_tiny_gpt2, make_tiny_llama, perturbed_copy, save_model_folder

BATCH = 5


@pytest.fixture(scope="module")
def languages(tokenizer_dir: Path) -> tuple[CalibrationSet, CalibrationSet]:
    """(old, new): two different text lists; each has more tokens than the widest map input (128)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    old = tokenize_calibration(make_texts(14, seed=21, min_words=10), tokenizer, max_length=64)
    new = tokenize_calibration(make_texts(12, seed=22, min_words=10), tokenizer, max_length=64)
    assert min(old.num_tokens, new.num_tokens) > 200
    return old, new


def _merge(base_dir: Path, ckpt_dirs: list[Path], old, new, **params) -> tuple[dict[str, Tensor], list[str], object]:
    """Run the sequential merge; return the written tensors, the names in write order and the report."""
    written: dict[str, Tensor] = {}
    names: list[str] = []

    def write(name: str, tensor: Tensor) -> None:
        assert name not in written, f"{name} written twice"
        names.append(name)
        written[name] = tensor.clone()

    with open_checkpoint(base_dir) as base:
        readers = [open_checkpoint(d) for d in ckpt_dirs]
        layout = ModelLayout.from_pretrained_dir(base_dir)
        plan = plan_merge(base, readers, layout)
        report = sequential_regmean(base, readers, base_dir, old, new, plan, write, progress=False, **params)
        assert names == [t.name for t in sequential_write_order(plan, layout).tensors]
        for t in plan.tensors:
            assert written[t.name].dtype == t.dtype and tuple(written[t.name].shape) == t.shape
        for reader in readers:
            reader.close()
    return written, names, report


# --- the brute-force reference -------------------------------------------------------------------------------------


def _load(folder: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _inputs(model: nn.Module, module: nn.Module, calibration: CalibrationSet) -> Tensor:
    """The non-pad tokens' inputs to ``module`` over the whole calibration set, float64 ``[n, in]``."""
    rows: list[Tensor] = []
    mask: list[Tensor] = []
    handle = module.register_forward_pre_hook(
        lambda _m, args: rows.append(args[0].reshape(-1, args[0].shape[-1])[mask[0]].double())
    )
    try:
        with torch.no_grad():
            for ids, attention in calibration.batches(BATCH):
                mask[:] = [attention.reshape(-1).bool()]
                model(input_ids=ids, attention_mask=attention, use_cache=False)
    finally:
        handle.remove()
    return torch.cat(rows)


def _forward_maps(model: nn.Module, calibration: CalibrationSet) -> list[tuple[str, int]]:
    """(module name, input axis of its weight) of every linear map, in the order a forward pass calls them."""
    axes = {id(m): axis for _n, m, axis, _f in linear_layers(model)}
    names = {id(m): n for n, m in model.named_modules()}
    tied = model.get_input_embeddings().weight
    order: list[tuple[str, int]] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, _a: order.append((names[id(mod)], axes[id(mod)])))
        for _n, m, _axis, _f in linear_layers(model)
        if m.weight is not tied
    ]
    ids, attention = next(calibration.batches(BATCH))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention, use_cache=False)
    for handle in handles:
        handle.remove()
    return order


def reference_merge(
    base_dir: Path, ckpt_dirs: list[Path], old: CalibrationSet, new: CalibrationSet, c: float
) -> dict[str, Tensor]:
    """Layer by layer with whole models: each map's X̂ from the partially merged model, X from the originals,
    W* = lstsq of [√(c/n_B)·X̂_B; √(1/(K·n_N))·X̂_N (K times)] against [√(c/n_B)·X_B·W_Bᵀ; √(1/(K·n_N))·X_k·W_kᵀ]."""
    base, ckpts, merged = _load(base_dir), [_load(d) for d in ckpt_dirs], _load(base_dir)
    k, n_b, n_n = len(ckpts), old.num_tokens, new.num_tokens
    maps = _forward_maps(base, old)
    solved = {f"{name}.weight" for name, _ in maps}
    states = [m.state_dict() for m in ckpts]
    with torch.no_grad():
        for name, param in merged.named_parameters():
            if name not in solved:
                mean_delta = sum(s[name] - param for s in states) / k
                param.copy_(param + mean_delta / (1 + c))
        for name, axis in maps:

            def transposed(model: nn.Module, name: str = name, axis: int = axis) -> Tensor:  # Wᵀ, [in, out]
                weight = model.get_submodule(name).weight.double()
                return weight.T if axis == 1 else weight

            merged_module = merged.get_submodule(name)
            xh_b, xh_n = _inputs(merged, merged_module, old), _inputs(merged, merged_module, new)
            x_b = _inputs(base, base.get_submodule(name), old)
            lhs = [math.sqrt(c / n_b) * xh_b] + [math.sqrt(1 / (k * n_n)) * xh_n] * k
            rhs = [math.sqrt(c / n_b) * x_b @ transposed(base)]
            for ckpt in ckpts:
                x_k = _inputs(ckpt, ckpt.get_submodule(name), new)
                rhs.append(math.sqrt(1 / (k * n_n)) * x_k @ transposed(ckpt))
            solution = torch.linalg.lstsq(torch.cat(lhs), torch.cat(rhs), driver="gelsd").solution  # Wᵀ
            merged_module.weight.copy_(solution.T if axis == 1 else solution)
    return merged.state_dict()


def _relative_error(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _assert_matches(written: dict[str, Tensor], reference: dict[str, Tensor], tolerance: float = 1e-5) -> None:
    for name, tensor in written.items():
        assert _relative_error(tensor, reference[name]) < tolerance, (name, _relative_error(tensor, reference[name]))


# --- tests -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mha_llama(tmp_path_factory, tokenizer_dir) -> tuple[Path, list[Path]]:
    """A tiny Llama with one key/value head per query head: its maps' input Grams are well conditioned."""
    root = tmp_path_factory.mktemp("mha_llama")
    base = make_tiny_llama(seed=2, num_key_value_heads=4)
    base_dir = save_model_folder(base, root / "base", tokenizer_dir)
    ckpts = [
        save_model_folder(perturbed_copy(base, 30 + i, 0.05 * (i + 1)), root / f"ckpt-{i}", None) for i in range(2)
    ]
    return base_dir, ckpts


@pytest.mark.parametrize(
    ("family", "tolerance"),
    [
        ("mha_llama", 1e-5),
        # grouped-query attention: o_proj's input (4 heads mixing 2 value heads) has an ill-conditioned Gram,
        # which amplifies the float32 rounding of the earlier merged weights (~1e-7) to ~1e-5
        ("llama_family", 1e-4),
    ],
)
def test_equals_brute_force_reference_on_llama(request, languages, family, tolerance):
    base_dir, ckpt_dirs = request.getfixturevalue(family)
    old, new = languages
    written, names, report = _merge(base_dir, ckpt_dirs[:2], old, new, base_weight=0.7, batch_size=BATCH)
    reference = reference_merge(base_dir, ckpt_dirs[:2], old, new, c=0.7)
    assert set(written) == set(reference)
    _assert_matches(written, reference, tolerance)
    # every linear map of the blocks and the untied head was solved, none needed a ridge
    assert report.solved == 2 * 7 + 1 and report.ridge_count == 0 and report.tensors == len(written)
    assert names[-1] == "lm_head.weight"
    # not a trivial merge: it moved the base's maps
    base = _load(base_dir).state_dict()
    down = "model.layers.1.mlp.down_proj.weight"
    assert _relative_error(written[down], base[down]) > 1e-3


@pytest.fixture(scope="module")
def gpt2_with_norms(tmp_path_factory, tokenizer_dir) -> tuple[Path, list[Path]]:
    """A tiny GPT-2 whose LayerNorms are not at their initial γ = 1, β = 0.

    At initialisation a LayerNorm's outputs sum to zero, so the next map's input Gram is singular and
    its least-squares solution is not unique (any two solvers may differ in the null space); trained
    norms have a bias that lifts the outputs off that hyperplane.
    """
    root = tmp_path_factory.mktemp("gpt2_norms")
    base = make_tiny_gpt2(seed=4)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in base.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(0.2 * torch.randn(module.weight.shape, generator=gen))
                module.bias.add_(0.5 * torch.randn(module.bias.shape, generator=gen))
    base_dir = save_model_folder(base, root / "base", tokenizer_dir)
    ckpts = [
        save_model_folder(perturbed_copy(base, 50 + i, 0.05 * (i + 1)), root / f"ckpt-{i}", None) for i in range(3)
    ]
    return base_dir, ckpts


def _tiny(architecture: str) -> nn.Module:
    """Small models of other families: Qwen2 (biases on q/k/v), Phi-3 (fused qkv_proj and gate_up_proj as one
    Linear each), Gemma (scaled embeddings, tied head)."""
    from transformers import GemmaConfig, GemmaForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 128,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    torch.manual_seed(0)
    if architecture == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    if architecture == "phi3":
        return Phi3ForCausalLM(Phi3Config(**common, tie_word_embeddings=False))
    return GemmaForCausalLM(GemmaConfig(**common, head_dim=16))


@pytest.mark.parametrize(("architecture", "solved"), [("qwen2", 2 * 7 + 1), ("phi3", 2 * 4 + 1), ("gemma", 2 * 7)])
def test_other_architectures_equal_the_reference(tmp_path, tokenizer_dir, languages, architecture, solved):
    base = _tiny(architecture)
    base_dir = save_model_folder(base, tmp_path / "base", tokenizer_dir)
    ckpt_dirs = [
        save_model_folder(perturbed_copy(base, 60 + i, 0.05 * (i + 1)), tmp_path / f"c{i}", None) for i in range(2)
    ]
    written, _names, report = _merge(base_dir, ckpt_dirs, *languages, batch_size=BATCH)
    assert report.solved == solved and report.ridge_count == 0
    _assert_matches(written, reference_merge(base_dir, ckpt_dirs, *languages, c=1.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_the_reference(mha_llama, languages):
    """The forward passes, the float64 statistics and the solves on the GPU; the reference on the CPU."""
    base_dir, ckpt_dirs = mha_llama
    old, new = languages
    written, _names, report = _merge(base_dir, ckpt_dirs, old, new, device="cuda", batch_size=BATCH)
    assert all(t.device.type == "cpu" for t in written.values())
    _assert_matches(written, reference_merge(base_dir, ckpt_dirs, old, new, c=1.0))
    assert report.solved == 15


def test_tied_bfloat16_llama_is_written_in_bfloat16(llama_tied_bf16_family, languages):
    """A tied head is not solved (it is the embedding, shrunk); bf16 in, bf16 out. The merged model runs with
    its bf16-rounded weights, the float32 reference with unrounded ones: they agree to bf16 precision."""
    base_dir, ckpt_dirs = llama_tied_bf16_family
    old, new = languages
    written, _names, report = _merge(base_dir, ckpt_dirs, old, new, batch_size=BATCH)
    assert report.solved == 2 * 7 and "lm_head.weight" not in written
    assert all(t.dtype == torch.bfloat16 for t in written.values())
    _assert_matches(written, reference_merge(base_dir, ckpt_dirs, old, new, c=1.0), tolerance=2e-2)


def test_gpt2_conv1d_and_fused_qkv_equal_the_reference(gpt2_with_norms, languages):
    base_dir, ckpt_dirs = gpt2_with_norms
    old, new = languages
    written, _names, report = _merge(base_dir, ckpt_dirs, old, new, batch_size=BATCH)
    reference = reference_merge(base_dir, ckpt_dirs, old, new, c=1.0)
    _assert_matches(written, reference)
    # c_attn (fused q/k/v, [in, 3·out]), attn.c_proj, mlp.c_fc, mlp.c_proj per block; the head is tied
    assert report.solved == 2 * 4 and report.ridge_count == 0
    assert "lm_head.weight" not in written and "transformer.wte.weight" in written


def test_writes_through_the_sharded_writer_in_order(gpt2_family, languages, tmp_path):
    """The write order is what the writer is built from; the folder loads as a model with the merged tensors."""
    base_dir, ckpt_dirs = gpt2_family
    old, new = languages
    out = tmp_path / "merged"
    out.mkdir()
    with open_checkpoint(base_dir) as base:
        readers = [open_checkpoint(d) for d in ckpt_dirs[:1]]
        layout = ModelLayout.from_pretrained_dir(base_dir)
        order = sequential_write_order(plan_merge(base, readers, layout), layout)
        with ShardedSafetensorsWriter(out, order.write_plan(), 200_000) as writer:
            sequential_regmean(base, readers, base_dir, old, new, order, writer.write, progress=False)
    shutil.copy2(base_dir / "config.json", out / "config.json")
    loaded = _load(out).state_dict()
    written, _names, _report = _merge(base_dir, ckpt_dirs[:1], old, new)
    for name, tensor in written.items():
        assert torch.equal(loaded[name], tensor), name


def test_identical_checkpoints_give_the_base(tmp_path, tokenizer_dir, languages):
    """All checkpoints equal to the base: every X̂ equals X and every W_k equals W_B, so W* = W_B."""
    base = make_tiny_llama(seed=3)
    base_dir = save_model_folder(base, tmp_path / "base", tokenizer_dir)
    copies = [save_model_folder(base, tmp_path / f"copy-{i}", None) for i in range(2)]
    written, _names, _report = _merge(base_dir, copies, *languages, base_weight=2.0, alpha=0.8)
    for name, value in base.state_dict().items():
        if name in written:
            assert _relative_error(written[name], value) < 1e-6, name


def _gram(model: nn.Module, module_name: str, calibration: CalibrationSet) -> Tensor:
    x = _inputs(model, model.get_submodule(module_name), calibration)
    return x.T @ x / x.shape[0]


def _shrunk(gram: Tensor, alpha: float) -> Tensor:
    return alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))


def test_first_group_reduces_to_non_sequential_formula(tmp_path, tokenizer_dir, languages):
    """Checkpoints that change only linear weights leave layer 0's q/k/v inputs as the originals', so their
    sequential merge is the non-sequential W* = (c·W_B·G_B + (1/K)·Σ W_k·G_k)(c·G_B + (1/K)·Σ G_k)⁻¹ with
    G shrunk by α; later maps see merged inputs and differ from it."""
    old, new = languages
    base = make_tiny_llama(seed=5)
    base_dir = save_model_folder(base, tmp_path / "base", tokenizer_dir)
    ckpts, ckpt_dirs = [], []
    for i in range(2):
        ckpt = make_tiny_llama(seed=5)
        gen = torch.Generator().manual_seed(40 + i)
        with torch.no_grad():
            for _name, module, _axis, _f in linear_layers(ckpt):
                module.weight.add_(0.3 * module.weight.std() * torch.randn(module.weight.shape, generator=gen))
        ckpts.append(ckpt.eval())
        ckpt_dirs.append(save_model_folder(ckpt, tmp_path / f"ckpt-{i}", None))
    c, alpha = 1.5, 0.6
    written, _names, _report = _merge(base_dir, ckpt_dirs, old, new, base_weight=c, alpha=alpha)
    base.eval()

    def non_sequential(module_name: str) -> Tensor:
        g_b = _shrunk(_gram(base, module_name, old), alpha)
        g_k = [_shrunk(_gram(m, module_name, new), alpha) for m in ckpts]
        w = [m.get_submodule(module_name).weight.double() for m in (base, *ckpts)]
        numerator = c * w[0] @ g_b + sum(wk @ gk for wk, gk in zip(w[1:], g_k, strict=True)) / len(ckpts)
        return numerator @ torch.linalg.inv(c * g_b + sum(g_k) / len(ckpts))

    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{proj}"
        assert _relative_error(written[f"{name}.weight"], non_sequential(name)) < 1e-5, proj
    later = "model.layers.1.self_attn.q_proj"
    assert _relative_error(written[f"{later}.weight"], non_sequential(later)) > 1e-4


class _RecordingReader(CheckpointReader):
    """A real reader that logs which tensors are read (to check the merge streams block by block)."""

    def __init__(self, inner: CheckpointReader, log: list[tuple[str, str]]) -> None:
        super().__init__(inner.path)
        self.inner, self.log = inner, log

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self.inner.tensor_infos()

    def read(self, name: str) -> Tensor:
        self.log.append(("read", name))
        return self.inner.read(name)

    def weight_files(self) -> list[Path]:
        return self.inner.weight_files()


def test_reads_one_block_at_a_time(llama_family, languages):
    """No tensor of block l+1 is read before every tensor of block l is written, and none of block l after."""
    base_dir, ckpt_dirs = llama_family
    log: list[tuple[str, str]] = []
    with open_checkpoint(base_dir) as base_inner:
        base = _RecordingReader(base_inner, log)
        readers = [_RecordingReader(open_checkpoint(d), log) for d in ckpt_dirs[:2]]
        layout = ModelLayout.from_pretrained_dir(base_dir)
        plan = plan_merge(base, readers, layout)
        sequential_regmean(
            base, readers, base_dir, *languages, plan, lambda name, _t: log.append(("write", name)), progress=False
        )
    for index in range(1):  # block 0 against block 1
        block_events = [i for i, (_kind, name) in enumerate(log) if block_index(name) == index]
        later_reads = [i for i, (kind, name) in enumerate(log) if kind == "read" and (block_index(name) or -1) > index]
        last_write = max(i for i in block_events if log[i][0] == "write")
        assert max(block_events) == last_write  # nothing of block l is read once it is written
        assert min(later_reads) > last_write
    assert log[-1] == ("write", "lm_head.weight")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"base_weight": 0.0}, "base_weight must be a positive"),
        ({"base_weight": -1.0}, "base_weight must be a positive"),
        ({"alpha": 1.5}, r"alpha must lie in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha must lie in \[0, 1\]"),
    ],
)
def test_bad_parameters_raise_before_writing(llama_family, languages, params, message):
    base_dir, ckpt_dirs = llama_family
    written: list[str] = []
    with open_checkpoint(base_dir) as base, open_checkpoint(ckpt_dirs[0]) as ckpt:
        plan = plan_merge(base, [ckpt], ModelLayout.from_pretrained_dir(base_dir))
        with pytest.raises(ConfigError, match=message):
            sequential_regmean(
                base, [ckpt], base_dir, *languages, plan, lambda n, _t: written.append(n), progress=False, **params
            )
    assert written == []


@pytest.mark.parametrize("empty_side", ["old", "new"])
def test_empty_calibration_raises_before_writing(llama_family, languages, empty_side):
    base_dir, ckpt_dirs = llama_family
    old, new = languages
    empty = CalibrationSet(input_ids=[], pad_token_id=0)
    old, new = (empty, new) if empty_side == "old" else (old, empty)
    written: list[str] = []
    with open_checkpoint(base_dir) as base, open_checkpoint(ckpt_dirs[0]) as ckpt:
        plan = plan_merge(base, [ckpt], ModelLayout.from_pretrained_dir(base_dir))
        with pytest.raises(CalibrationError, match=f"{empty_side}-language calibration text"):
            sequential_regmean(base, [ckpt], base_dir, old, new, plan, lambda n, _t: written.append(n), progress=False)
    assert written == []


def test_extended_vocabulary_is_refused(tmp_path, tokenizer_dir, languages):
    base = make_tiny_llama(seed=1)
    base_dir = save_model_folder(base, tmp_path / "base", tokenizer_dir)
    bigger = make_tiny_llama(seed=1)
    bigger.resize_token_embeddings(base.config.vocab_size + 8)
    ckpt_dir = save_model_folder(bigger, tmp_path / "ckpt", None)
    written: list[str] = []
    with open_checkpoint(base_dir) as base_reader, open_checkpoint(ckpt_dir) as ckpt:
        plan = plan_merge(base_reader, [ckpt], ModelLayout.from_pretrained_dir(base_dir))
        with pytest.raises(ConfigError, match="sequential: false"):
            sequential_regmean(
                base_reader, [ckpt], base_dir, *languages, plan, lambda n, _t: written.append(n), progress=False
            )
    assert written == []
