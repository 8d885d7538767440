"""Sequential forgetting-aware RegMean (RegMean++ style): linear maps merged in forward order, block by block.

Plain RegMean merges every linear map y = x·Wᵀ on the inputs each original model saw. Once earlier
layers are merged, the merged model's inputs to a map are no longer those; RegMean++ (Nguyen et al.
2026) therefore takes each map's inputs from the partially merged model, on the same texts, while its
targets stay the original models' outputs. With the base measured on old-language text and every
checkpoint on new-language text, the map that best reproduces both is

    W* = (c·W_B·C_B/n_B + (1/K)·Σ_k W_k·C_k/n_N) · (c·Ĝ_B/n_B + Ĝ_N/n_N)⁻¹

    C_B = X_BᵀX̂_B   (the base's own inputs × the merged model's inputs, old text, n_B non-pad tokens)
    C_k = X_kᵀX̂_N   (checkpoint k's own inputs × the merged model's inputs, new text, n_N tokens)
    Ĝ_B = X̂_BᵀX̂_B,  Ĝ_N = X̂_NᵀX̂_N

the normal equations of argmin_W c·‖X̂_B·Wᵀ − X_B·W_Bᵀ‖²/n_B + (1/K)·Σ_k ‖X̂_N·Wᵀ − X_k·W_kᵀ‖²/n_N.
RegMean's shrinkage α·M + (1−α)·diag(M) is applied to every matrix, the cross terms included: when
the merged model's inputs equal the originals' (C = Ĝ = G) the formula is then exactly the
non-sequential one with the same α. Everything that is not a solved linear map's weight (embeddings,
norms, biases, a tied LM head, a map the calibration text never reaches) gets θ_B + mean_k δ_k/(1+c)
(:func:`~obim_trainer.merging.least_squares.shrink_toward_base`).

Cost and memory. The model is never built whole: a skeleton with its parameters on the ``meta``
device (buffers real, so rotary tables exist) gives the architecture, the architecture's own code runs
everything before the first block (a "catcher" pre-hook on block 0 stores its arguments and stops the
forward, as GPTQ does), and one decoder block at a time is loaded from the readers. The hidden states at
the current block's input are kept, on ``device``, for K + 3 streams: the base on old text, each
checkpoint on new text, the merged model on old and on new text. Per block, every original model runs
once, one after the other, its inputs to each group of maps recorded on the CPU (float32, non-pad
tokens: (K + 1) × tokens × the summed input widths of the block's groups, about 5.7 hidden states per
model for a Llama); then the merged block runs once per group of maps reading the same input (q/k/v;
gate/up), stopping at that group, and once in full to advance its hidden states. So a merge costs the
originals' forward pass once and the merged model's about (groups per block + 1) times. Statistics
accumulate in float64; a group holds K + 3 float64 [in, in] matrices while it is solved.

Precision: the originals run in float32 whatever their stored dtype; the merged model runs with its
weights as they are written (rounded to the output dtype), so later maps see the model that is saved.

MoE: a router is solved as a linear map. A fused experts module (transformers loads Mixtral/Qwen-MoE experts
as 3-D parameters, the files store one 2-D tensor per expert) forms a group of its own, solved expert by
expert on the tokens the partially merged model routes to it — the merged model is what will run those
tokens — against each original's own inputs of the same tokens (whatever the original routed them to); each
side's terms are divided by its routed-token count, as the non-sequential per-expert Grams are, so the two
coincide when the merged inputs equal the originals'. ``down_proj`` reads act(gate)·up: the merged one from the
just-merged first projection, each original's from its own. An expert a side routes no token to gets the
shrink rule, counted in one warning.

Limits: maps run more than once per forward pass (shared weights) are refused, maps the calibration text
never reaches get the shrink rule; experts stored fused or with biases, and vocabularies the checkpoints
extend, are refused (use the non-sequential merge). Tested against a whole-model reference on Llama (MHA and
GQA, tied bf16 and untied), GPT-2 (Conv1D, fused qkv), Qwen2 (q/k/v biases), Phi-3 (fused qkv_proj,
gate_up_proj) and Gemma (scaled embeddings); on Mixtral, Qwen2-MoE and Qwen3-MoE against the non-sequential
solve where the two must agree.

The merge writes in a fixed order (:func:`sequential_write_order`): tensors outside the blocks first,
then block by block, the untied LM head last. Build the writer from that order.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from obim_trainer.calibration.activation_stats import expert_layers, linear_layers
from obim_trainer.calibration.block_walk import (
    BlockInput,
    BlockWalkError,
    Stop,
    Stream,
    advanced,
    catch_block_inputs,
    decoder_parts,
    run_block,
)
from obim_trainer.calibration.data import CalibrationSet
from obim_trainer.calibration.moe import FusedExperts, StoredSlice, routing_arguments, stored_expert_slices
from obim_trainer.checkpoints.reader import CheckpointReader
from obim_trainer.errors import CalibrationError, CheckpointError, ConfigError
from obim_trainer.merging.least_squares import regularize_gram, shrink_toward_base, solve_least_squares
from obim_trainer.merging.task import ParamKind
from obim_trainer.pipeline.engine import MergePlan, TensorPlan
from obim_trainer.pipeline.input_check import check_finite
from obim_trainer.pipeline.layout import ModelLayout

logger = logging.getLogger(__name__)

COMPUTE_DTYPE = torch.float32
ACCUMULATE_DTYPE = torch.float64


@dataclass
class SequentialReport:
    """What the sequential merge did: the maps whose solve needed a ridge, tensors written, MoE experts a side's
    text never reached (layer, expert), time."""

    ridged: list[str] = field(default_factory=list)
    unreached_experts: list[tuple[str, int]] = field(default_factory=list)
    tensors: int = 0
    solved: int = 0
    seconds: float = 0.0

    @property
    def ridge_count(self) -> int:
        return len(self.ridged)


def check_parameters(base_weight: float, alpha: float, old: CalibrationSet, new: CalibrationSet) -> None:
    """One clear error for a bad parameter or empty calibration text, before anything is read."""
    if not (isinstance(base_weight, (int, float)) and math.isfinite(base_weight) and base_weight > 0):
        raise ConfigError(f"regmean: base_weight must be a positive number (got {base_weight!r}); 1.0 is the default")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ConfigError(f"regmean: alpha must lie in [0, 1] (got {alpha!r}); 1.0 keeps the full input covariance")
    for side, calibration in (("old-language", old), ("new-language", new)):
        if not calibration.input_ids or calibration.num_tokens == 0:
            raise CalibrationError(
                f"sequential regmean needs {side} calibration text, and it is empty; give ~100 samples of the "
                f"{side.split('-')[0]} language(s)"
            )


# --- the model skeleton --------------------------------------------------------------------------------------


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the ``meta`` device; buffers stay real.

    Non-persistent buffers (rotary ``inv_freq``) are computed at construction and stored nowhere, so
    a model built entirely on ``meta`` could not run; parameters are what the readers provide.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:  # a meta one is kept as it is: tying assigns the same object
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@dataclass
class _Param:
    """One parameter of the skeleton: the module holding it, its attribute, and its stored name."""

    owner: nn.Module
    attr: str
    stored: str
    """The stored name; for a fused MoE parameter, its name in the model (the files store it per expert)."""
    slices: list[tuple[str, StoredSlice]] = field(default_factory=list)
    """A fused MoE parameter's stored 2-D tensors and where each lies in it; empty for any other."""

    def set(self, value: Tensor) -> None:
        self.owner._parameters[self.attr] = nn.Parameter(value, requires_grad=False)

    def release(self) -> None:
        current = self.owner._parameters[self.attr]
        assert current is not None
        self.owner._parameters[self.attr] = nn.Parameter(current.to("meta"), requires_grad=False)


@dataclass
class _Skeleton:
    """The base architecture with meta parameters, and where its blocks, final norm and LM head are."""

    model: nn.Module
    blocks: nn.ModuleList
    blocks_name: str
    stored_name: Callable[[str], str | None]
    outside: list[_Param]
    """Parameters outside the blocks the embedding stage needs (all but the untied head)."""
    tail: list[nn.Module]
    """Modules applied between the last block and the LM head (the final norm)."""
    tail_params: list[_Param]
    head: _Param | None
    """The untied LM head, solved as a linear map; ``None`` when tied or not stored."""
    head_axis: int = 1
    fused: dict[str, list[tuple[str, StoredSlice]]] = field(default_factory=dict)
    """Fused MoE parameter name in the model → its stored per-expert tensors and their places in it."""
    layout: ModelLayout = field(default_factory=ModelLayout)
    """The base's layout (stored names, kinds), built once from this skeleton."""

    def block_params(self, index: int) -> list[_Param]:
        return _params(self.blocks[index], f"{self.blocks_name}.{index}", self.stored_name, self.fused)


def _params(
    module: nn.Module,
    prefix: str,
    stored_name: Callable[[str], str | None],
    fused: dict[str, list[tuple[str, StoredSlice]]],
) -> list[_Param]:
    """Every parameter under ``module`` (a tied one once), with the name the files store it under (a fused
    MoE parameter with its stored per-expert tensors, ``fused``)."""
    found, seen = [], set()
    for owner_name, owner in module.named_modules():
        for attr, param in owner.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full = ".".join(part for part in (prefix, owner_name, attr) if part)
            if full in fused:
                found.append(_Param(owner, attr, full, fused[full]))
                continue
            stored = stored_name(full)
            if stored is None:
                raise CheckpointError(
                    f"the base stores no tensor {full}, which its architecture needs; re-save the base with "
                    "save_pretrained"
                )
            found.append(_Param(owner, attr, stored))
    return found


def _stored_name_function(stored_names: set[str], prefix: str, renamed: dict[str, str]) -> Callable[[str], str | None]:
    """Module parameter name → the name in the files (which may lack the ``base_model_prefix``, or be one that
    transformers renames on load, ``renamed``: loaded → stored, e.g. Mixtral's router ``mlp.gate`` is stored as
    ``block_sparse_moe.gate``)."""

    def stored_name(full: str) -> str | None:
        full = renamed.get(full, full)
        if full in stored_names:
            return full
        if prefix and full.startswith(prefix + ".") and full[len(prefix) + 1 :] in stored_names:
            return full[len(prefix) + 1 :]
        return None

    return stored_name


def _build_model(base_dir: Path, device: torch.device) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_dir)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the model config in {base_dir} ({exc}); it must hold config.json") from None
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(device)
    return model


def _build_skeleton(base_dir: Path, stored_names: set[str], device: torch.device) -> _Skeleton:
    """The base's architecture on ``meta`` (buffers on ``device``), with its parts located
    (:func:`~obim_trainer.calibration.block_walk.decoder_parts`)."""
    model = _build_model(base_dir, device)
    layout = ModelLayout.from_model(model)
    slices = stored_expert_slices(model, expert_layers(model))
    renamed = {loaded: stored for stored, loaded in layout.stored_names.items() if stored not in slices}
    stored_name = _stored_name_function(stored_names, layout.prefix, renamed)
    fused = _fused_parameters(model, slices, stored_names)
    try:
        parts = decoder_parts(model)
    except BlockWalkError as exc:
        raise _refusal(exc) from None
    blocks, blocks_name, tail = parts.blocks, parts.blocks_name, parts.tail
    head_module, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    head, head_axis = None, 1
    if head_module is not None and head_module.weight is not embedding.weight:
        head_name = next(n for n, m in model.named_modules() if m is head_module)
        stored = stored_name(f"{head_name}.weight")
        if stored is not None:
            head = _Param(head_module, "weight", stored)
            head_axis = next((axis for _n, m, axis, _f in linear_layers(model) if m is head_module), 1)
    in_blocks = {id(m) for m in blocks.modules()}
    outside = [
        p
        for p in _params(model, "", stored_name, fused)
        if id(p.owner) not in in_blocks and not (head is not None and p.owner is head.owner and p.attr == "weight")
    ]
    tail_ids = {id(m) for module in tail for m in module.modules()}
    tail_params = [p for p in outside if id(p.owner) in tail_ids]
    return _Skeleton(
        model, blocks, blocks_name, stored_name, outside, tail, tail_params, head, head_axis, fused, layout
    )


def _fused_parameters(
    model: nn.Module, slices: dict[str, StoredSlice], stored_names: set[str]
) -> dict[str, list[tuple[str, StoredSlice]]]:
    """Fused MoE parameter → its stored per-expert tensors. Experts the sequential walk cannot evaluate one at a
    time (biases, transposed layout, stored fused) are refused with the way out."""
    fused: dict[str, list[tuple[str, StoredSlice]]] = {}
    for stored, found in slices.items():
        fused.setdefault(found.param, []).append((stored, found))
    for experts in expert_layers(model):
        module = experts.module
        stored_whole = all(p in fused and {s for s, _ in fused[p]} <= stored_names for p in experts.params())
        if getattr(module, "has_bias", False) or experts.in_axis == 0 or not stored_whole:
            raise ConfigError(
                f"sequential regmean merges MoE experts stored one 2-D tensor per expert without biases; "
                f"{experts.name} is not (stored fused, transposed or with biases): use sequential: false"
            )
    return fused


def sequential_write_order(plan: MergePlan, layout: ModelLayout) -> MergePlan:
    """The plan in the order the sequential merge writes it: tensors outside the blocks, then block by block
    (each in plan order), the untied LM head last. Build the output writer from this plan."""
    head = next(
        (
            t.name
            for t in plan.tensors
            if t.block_index is None and t.kind is ParamKind.LINEAR and layout.is_vocabulary_tensor(t.name)
        ),
        None,
    )
    outside = [t for t in plan.tensors if t.block_index is None and t.name != head]
    blocks = sorted({t.block_index for t in plan.tensors if t.block_index is not None})
    in_blocks = [t for index in blocks for t in plan.tensors if t.block_index == index]
    last = [t for t in plan.tensors if t.name == head]
    return MergePlan(tensors=outside + in_blocks + last, dropped_tied=plan.dropped_tied, vocab_size=plan.vocab_size)


# --- hidden states and linear inputs ---------------------------------------------------------------------------


def _catch(skeleton: _Skeleton, calibration: CalibrationSet, batch_size: int, device: torch.device) -> Stream:
    """Every batch's first-block arguments, the hidden states in float32 (the merge's compute dtype)."""
    try:
        return catch_block_inputs(skeleton.model, skeleton.blocks[0], calibration, batch_size, device, COMPUTE_DTYPE)
    except BlockWalkError as exc:
        raise _refusal(exc) from None


def _refusal(exc: BlockWalkError) -> ConfigError:
    return ConfigError(f"{exc}; sequential regmean runs the model block by block: use sequential: false")


def _sharing_arguments(stream: Stream, like: Stream) -> Stream:
    """``stream`` with the block arguments of ``like`` (the same text): the mask and position embeddings depend
    on the token ids only, so the streams on one text keep one copy of them."""
    return [BlockInput(b.hidden, a.rest, a.kwargs, a.mask) for b, a in zip(stream, like, strict=True)]


def _rows(inputs: Tensor, in_features: int, mask: Tensor) -> Tensor:
    """The non-pad tokens' inputs as ``[n, in]`` rows."""
    rows = inputs.detach().reshape(-1, in_features)
    if rows.shape[0] != mask.numel():
        raise ConfigError(
            f"a linear map reads {rows.shape[0]} rows for {mask.numel()} token positions (MoE experts as separate "
            "Linear layers see only their routed tokens), which the layer-by-layer merge cannot align: use "
            "sequential: false"
        )
    return rows[mask]


@dataclass
class _Map:
    """A linear map of a block: its stored weight name, module, input axis of the weight, input width."""

    name: str
    module: nn.Module
    axis: int
    in_features: int
    experts: FusedExperts | None = None
    """For a fused experts module (``name`` its name in the model): merged expert by expert, in a group alone."""


def _groups(block: nn.Module, batch: BlockInput, maps: list[_Map]) -> list[list[_Map]]:
    """The block's linear maps in forward order, grouped by the input tensor they read (q/k/v; gate/up).

    Found by running the block once with hooks; a map called twice per forward (shared weights) cannot be
    merged one input at a time and is an error; maps never called are left out (they get the shrink rule).
    """
    calls: list[tuple[_Map, Tensor]] = []

    def hook(entry: _Map) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls.append((entry, args[0] if args else next(iter(kwargs.values()))))

        return record

    handles = [m.module.register_forward_pre_hook(hook(m), with_kwargs=True) for m in maps]
    try:
        run_block(block, batch)
    finally:
        for handle in handles:
            handle.remove()
    names = [entry.name for entry, _ in calls]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(
            f"{repeated[0]} runs more than once per forward pass (shared weights or MoE experts); sequential "
            "regmean merges each map on one input: use sequential: false"
        )
    groups: list[list[_Map]] = []
    previous: Tensor | None = None
    for entry, inputs in calls:
        alone = entry.experts is not None or bool(groups and groups[-1][0].experts is not None)
        if previous is not None and inputs is previous and not alone:
            groups[-1].append(entry)
        else:
            groups.append([entry])
        previous = inputs
    unused = [m.name for m in maps if m.name not in names]
    if unused:
        logger.warning(
            "%d linear map(s) never ran on the calibration text; shrunk toward the base: %s",
            len(unused),
            ", ".join(unused),
        )
    return groups


def _record_inputs(block: nn.Module, leaders: list[_Map], stream: Stream) -> tuple[list[list[Tensor]], list[Tensor]]:
    """Run ``block`` (an original model's) over ``stream``: per group, its leader's inputs per batch (non-pad
    rows, on the CPU), and the block's outputs (the next block's hidden states)."""
    recorded: list[list[Tensor]] = [[] for _ in leaders]
    current: list[Tensor] = []

    def hook(index: int, entry: _Map) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs = args[0] if args else next(iter(kwargs.values()))
            recorded[index].append(_rows(inputs, entry.in_features, current[0]).to("cpu", COMPUTE_DTYPE))

        return record

    handles = [m.module.register_forward_pre_hook(hook(i, m), with_kwargs=True) for i, m in enumerate(leaders)]
    outputs = []
    try:
        for batch in stream:
            current[:] = [batch.mask]
            outputs.append(run_block(block, batch))
    finally:
        for handle in handles:
            handle.remove()
    return recorded, outputs


def _first_call(block: nn.Module, module: nn.Module, batch: BlockInput) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments ``module`` is first called with when the partially merged ``block`` runs on one batch (the
    forward stops there)."""
    found: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        found.append((args, kwargs))
        raise Stop

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run_block(block, batch)
    except Stop:
        pass
    finally:
        handle.remove()
    return found[0]


def _merged_inputs(block: nn.Module, leader: _Map, batch: BlockInput) -> Tensor:
    """The partially merged block's inputs to ``leader`` on one batch, non-pad rows."""
    args, kwargs = _first_call(block, leader.module, batch)
    return _rows(args[0] if args else next(iter(kwargs.values())), leader.in_features, batch.mask)


def _merged_routing(block: nn.Module, experts: _Map, batch: BlockInput) -> tuple[Tensor, Tensor]:
    """The partially merged block's inputs to a fused experts module on one batch and its routing (``[n, k]``
    expert indices), non-pad rows."""
    routed = routing_arguments(*_first_call(block, experts.module, batch))
    assert routed is not None, f"{experts.name} was called without its routing"
    hidden, index = routed
    return _rows(hidden, experts.in_features, batch.mask), index.reshape(hidden.shape[0], -1)[batch.mask]


# --- the normal equations ----------------------------------------------------------------------------------------


@dataclass
class _Side:
    """One calibration text: the merged model's stream on it, and the originals measured on it (with weights).

    ``originals[i][b]`` are original model i's inputs to the group on batch b; ``weights[i]`` its weight in
    the objective (c/n_B for the base on old text, 1/(K·n_N) for each checkpoint on new text). An MoE expert's
    sides carry only the weights; its rows are given to :func:`_accumulate` directly."""

    stream: Stream
    originals: list[list[Tensor]]
    weights: list[float]
    gram_weight: float
    """The merged inputs' Gram weight: c/n_B (old text), 1/n_N (new text)."""


def _normal_equations(
    sides: Sequence[_Side],
    merged_inputs: Callable[[BlockInput], Tensor],
    in_features: int,
    alpha: float,
    device: torch.device,
) -> tuple[list[Tensor], Tensor]:
    """Per original model (in side order), its weighted, shrunk cross term w_i·reg(X_iᵀX̂); and the weighted,
    shrunk Gram of the merged inputs Σ_sides w·reg(X̂ᵀX̂). Accumulated in float64 over non-pad tokens."""

    def chunks(side: _Side) -> Iterator[tuple[Tensor, list[Tensor]]]:
        for b, batch in enumerate(side.stream):
            yield merged_inputs(batch), [inputs[b] for inputs in side.originals]

    return _accumulate(sides, [chunks(side) for side in sides], in_features, alpha, device)


def _accumulate(
    sides: Sequence[_Side],
    rows: Sequence[Iterable[tuple[Tensor, Sequence[Tensor]]]],
    in_features: int,
    alpha: float,
    device: torch.device,
) -> tuple[list[Tensor], Tensor]:
    """:func:`_normal_equations` from each side's ``(merged rows, [each original's rows])`` chunks."""
    crosses: list[Tensor] = []
    gram_total = torch.zeros(in_features, in_features, dtype=ACCUMULATE_DTYPE, device=device)
    for side, chunks in zip(sides, rows, strict=True):
        gram = torch.zeros_like(gram_total)
        cross = [torch.zeros_like(gram_total) for _ in side.weights]
        for merged_rows, original_rows in chunks:
            merged = merged_rows.to(device, ACCUMULATE_DTYPE)
            gram.addmm_(merged.T, merged)
            for i, inputs in enumerate(original_rows):
                cross[i].addmm_(inputs.to(device, ACCUMULATE_DTYPE).T, merged)
        gram_total.add_(regularize_gram(gram, alpha), alpha=side.gram_weight)
        crosses += [regularize_gram(c, alpha).mul_(w) for c, w in zip(cross, side.weights, strict=True)]
    return crosses, gram_total


# --- the merge ----------------------------------------------------------------------------------------------------


@dataclass
class _Streams:
    """Hidden states at the current block's input: originals on their own text, the merged model on both."""

    base_old: Stream
    checkpoints_new: list[Stream]
    merged_old: Stream
    merged_new: Stream


class _SequentialMerge:
    """One sequential merge: the readers, the skeleton, the parameters and where results go."""

    def __init__(
        self,
        base: CheckpointReader,
        checkpoints: Sequence[CheckpointReader],
        skeleton: _Skeleton,
        plan: MergePlan,
        write: Callable[[str, Tensor], None],
        *,
        base_weight: float,
        alpha: float,
        device: torch.device,
        old_tokens: int,
        new_tokens: int,
    ) -> None:
        self.base, self.checkpoints, self.models = base, list(checkpoints), [base, *checkpoints]
        self.skeleton, self.write, self.device = skeleton, write, device
        self.dtypes = {t.name: t.dtype for t in plan.tensors}
        self.base_weight, self.alpha = base_weight, alpha
        self.old_tokens, self.new_tokens = old_tokens, new_tokens
        self.report = SequentialReport()
        self.tail_merged: dict[str, Tensor] = {}
        """The merged final norm's parameters, kept from the embedding stage for the LM head."""

    # reading and the shrink rule

    def read(self, reader: CheckpointReader, name: str) -> Tensor:
        return check_finite(reader.read(name), name, reader)

    def load(self, params: Sequence[_Param], reader: CheckpointReader) -> None:
        for p in params:
            if p.slices:
                p.set(self.assemble(p, lambda stored: self.read(reader, stored)))
            else:
                p.set(self.read(reader, p.stored).to(self.device, COMPUTE_DTYPE))

    def assemble(self, p: _Param, tensor: Callable[[str], Tensor]) -> Tensor:
        """A fused MoE parameter ``[E, d1, d2]`` from its stored per-expert tensors (``tensor(stored name)``)."""
        shape = p.owner._parameters[p.attr].shape
        fused = torch.empty(shape[0] * shape[1], shape[2], dtype=COMPUTE_DTYPE, device=self.device)
        for stored, place in p.slices:
            value = tensor(stored).to(self.device, COMPUTE_DTYPE)
            fused[place.rows.to(self.device)] = value.T if place.transposed else value
        return fused.view(shape)

    def expert_slice(self, p: _Param, expert: int, tensor: Callable[[str], Tensor]) -> Tensor:
        """One expert's ``[d1, d2]`` slice of a fused parameter from its stored tensors."""
        rows = p.owner._parameters[p.attr].shape[1]
        out = torch.empty(rows, p.owner._parameters[p.attr].shape[2], dtype=COMPUTE_DTYPE, device=self.device)
        for stored, place in p.slices:
            if place.expert == expert:
                value = tensor(stored).to(self.device, COMPUTE_DTYPE)
                out[(place.rows - expert * rows).to(self.device)] = value.T if place.transposed else value
        return out

    def shrink(self, name: str) -> Tensor:
        """θ_B + mean_k δ_k/(1+c) in the output dtype, on the CPU (integer buffers: the base's)."""
        base = self.read(self.base, name)
        dtype = self.dtypes.get(name, base.dtype)
        if not base.is_floating_point():
            return base
        base32 = base.to(self.device, COMPUTE_DTYPE)
        mean_delta = torch.zeros_like(base32)
        for reader in self.checkpoints:
            mean_delta += self.read(reader, name).to(self.device, COMPUTE_DTYPE) - base32
        mean_delta /= len(self.checkpoints)
        return shrink_toward_base(base32, mean_delta, self.base_weight).to("cpu", dtype).contiguous()

    def emit(self, name: str, tensor: Tensor) -> None:
        self.write(name, tensor)
        self.report.tensors += 1

    # the least-squares solve

    def weights(self, n_old: int, n_new: int) -> list[tuple[list[float], float]]:
        """Per side (old text with n_old tokens, new text with n_new), each original's weight and the merged
        inputs' Gram weight: c/n_B for the base, 1/(K·n_N) for each checkpoint, 1/n_N for the new side's Gram."""
        c, k = self.base_weight, len(self.checkpoints)
        return [([c / n_old], c / n_old), ([1.0 / (k * n_new)] * k, 1.0 / n_new)]

    def sides(self, merged: _Streams, base_inputs: list[Tensor], checkpoint_inputs: list[list[Tensor]]) -> list[_Side]:
        (old, old_gram), (new, new_gram) = self.weights(self.old_tokens, self.new_tokens)
        return [
            _Side(merged.merged_old, [base_inputs], old, old_gram),
            _Side(merged.merged_new, checkpoint_inputs, new, new_gram),
        ]

    def solve(self, name: str, axis: int, crosses: Sequence[Tensor], gram: Tensor) -> Tensor:
        """W* = Σ_i W_i·(w_i·reg(X_iᵀX̂)) · (Σ w·reg(X̂ᵀX̂))⁻¹ for one map, stored as the files store it."""
        numerator: Tensor | None = None
        for reader, cross in zip(self.models, crosses, strict=True):
            weight = self.read(reader, name).to(self.device, ACCUMULATE_DTYPE)
            term = (weight if axis == 1 else weight.T) @ cross
            numerator = term if numerator is None else numerator.add_(term)
        assert numerator is not None
        if not (bool(torch.isfinite(gram).all()) and bool(torch.isfinite(numerator).all())):
            raise CheckpointError(
                f"the inputs of {name} on the calibration text contain NaN or Inf although the weights are finite "
                "(overflow?); check the checkpoints, or use sequential: false"
            )
        solution, ridged = solve_least_squares(numerator, gram)
        if ridged:
            self.report.ridged.append(name)
        self.report.solved += 1
        stored = solution if axis == 1 else solution.T
        return stored.to("cpu", self.dtypes.get(name, COMPUTE_DTYPE)).contiguous()

    # the stages

    def embed(
        self, outside: Sequence[TensorPlan], old: CalibrationSet, new: CalibrationSet, batch_size: int
    ) -> _Streams:
        """Write the tensors outside the blocks (shrink rule) and catch every stream's first-block inputs."""
        merged: dict[str, Tensor] = {}
        for tensor in outside:
            merged[tensor.name] = self.shrink(tensor.name)
            self.emit(tensor.name, merged[tensor.name])
        params = self.skeleton.outside
        self.load(params, self.base)
        base_old = _catch(self.skeleton, old, batch_size, self.device)
        checkpoints_new = []
        for reader in self.checkpoints:
            self.load(params, reader)
            checkpoints_new.append(_catch(self.skeleton, new, batch_size, self.device))
        for p in params:
            value = merged[p.stored] if p.stored in merged else self.shrink(p.stored)
            p.set(value.to(self.device, COMPUTE_DTYPE))
        merged_old = _catch(self.skeleton, old, batch_size, self.device)
        merged_new = _catch(self.skeleton, new, batch_size, self.device)
        streams = _Streams(
            _sharing_arguments(base_old, merged_old),
            [_sharing_arguments(stream, merged_new) for stream in checkpoints_new],
            merged_old,
            merged_new,
        )
        self.tail_merged = {p.stored: p.owner._parameters[p.attr] for p in self.skeleton.tail_params}
        for p in params:
            p.release()
        return streams

    def run_originals(
        self, block: nn.Module, params: Sequence[_Param], leaders: list[_Map], streams: _Streams
    ) -> list[tuple[list[list[Tensor]], list[Tensor]]]:
        """Each original's block (the base's already loaded) over its own stream: per model, its inputs to each
        group and its outputs. One original block is in memory at a time."""
        results = [_record_inputs(block, leaders, streams.base_old)]
        for reader, stream in zip(self.checkpoints, streams.checkpoints_new, strict=True):
            self.load(params, reader)
            results.append(_record_inputs(block, leaders, stream))
        return results

    def shrunk_block(self, params: Sequence[_Param], solved: set[str]) -> dict[str, Tensor]:
        """The merged block before its maps are solved: every other parameter at its shrink value (returned,
        in the output dtype, to be written). The maps to solve go back to ``meta``: the forward stops at the
        group being merged, so no map runs before it is solved."""
        pending: dict[str, Tensor] = {}
        for p in params:
            if p.stored in solved or p.slices:
                p.release()
            else:
                pending[p.stored] = self.shrink(p.stored)
                p.set(pending[p.stored].to(self.device, COMPUTE_DTYPE))
        return pending

    def merge_group(
        self, block: nn.Module, group: list[_Map], streams: _Streams, originals: list[list[Tensor]]
    ) -> dict[str, Tensor]:
        """Solve the maps of one group (``originals``: the base's then each checkpoint's inputs to it, per batch)
        on the partially merged block's inputs; returns the merged weights in the output dtype."""
        leader = group[0]
        crosses, gram = _normal_equations(
            self.sides(streams, originals[0], originals[1:]),
            lambda batch: _merged_inputs(block, leader, batch),
            leader.in_features,
            self.alpha,
            self.device,
        )
        return {entry.name: self.solve(entry.name, entry.axis, crosses, gram) for entry in group}

    def merge_experts(
        self, block: nn.Module, entry: _Map, fused: list[_Param], streams: _Streams, originals: list[list[Tensor]]
    ) -> dict[str, Tensor]:
        """Solve every expert of a fused experts module (its stored per-expert tensors, in the output dtype).

        Expert e is solved on the tokens the partially merged model routes to it (its router is merged
        already): on old text X̂_B against the base's own inputs of those tokens, on new text X̂_N against each
        checkpoint's, whether or not the original routed them there, since the merged model is what will run
        them. Each side's terms are divided by its routed-token count, as the expert's non-sequential Grams
        are, so with identical models this is the non-sequential merge. First projection (gate/up, one input),
        then ``down_proj`` on act(gate)·up: the merged one from the just-merged slice, each original's from its
        own. An expert a side routes no token to keeps the shrink rule θ_B + mean δ/(1+c) (counted in the report).
        """
        assert entry.experts is not None
        experts, (first, down) = entry.experts, fused
        merged = []
        for stream in (streams.merged_old, streams.merged_new):
            hidden, routes = zip(*(_merged_routing(block, entry, batch) for batch in stream), strict=True)
            merged.append((torch.cat(hidden), torch.cat(routes)))
        inputs = [torch.cat(batches).to(self.device) for batches in originals]
        sides = [inputs[:1], inputs[1:]]
        pending: dict[str, Tensor] = {}
        for e in range(experts.num_experts):
            chosen = [(routes == e).any(1) for _hidden, routes in merged]
            counts = [int(c.sum()) for c in chosen]
            names = [s for p in fused for s, place in p.slices if place.expert == e]
            if min(counts) == 0:
                self.report.unreached_experts.append((entry.name, e))
                pending |= {name: self.shrink(name) for name in names}
                continue
            x_merged = [hidden[c] for (hidden, _r), c in zip(merged, chosen, strict=True)]
            x_originals = [[x[c] for x in side] for side, c in zip(sides, chosen, strict=True)]
            pending |= self.solve_expert(first, e, x_merged, x_originals, counts)
            merged_slice = self.expert_slice(first, e, pending.__getitem__)
            a_merged = [experts.activation(x, merged_slice) for x in x_merged]
            own = [self.expert_slice(first, e, lambda s, r=reader: self.read(r, s)) for reader in self.models]
            a_originals = [[experts.activation(x, w) for x, w in zip(x_originals[0], own[:1], strict=True)]]
            a_originals.append([experts.activation(x, w) for x, w in zip(x_originals[1], own[1:], strict=True)])
            pending |= self.solve_expert(down, e, a_merged, a_originals, counts)
        return pending

    def solve_expert(
        self, p: _Param, expert: int, merged: list[Tensor], originals: list[list[Tensor]], counts: list[int]
    ) -> dict[str, Tensor]:
        """One expert's stored tensors of fused parameter ``p`` on its routed rows (per side: merged, originals);
        each side's terms divided by its routed-token count, as the expert's non-sequential Grams are."""
        sides = [_Side([], [], weights, gram_weight) for weights, gram_weight in self.weights(*counts)]
        rows = [[(m, o)] for m, o in zip(merged, originals, strict=True)]
        crosses, gram = _accumulate(sides, rows, merged[0].shape[1], self.alpha, self.device)
        return {
            stored: self.solve(stored, place.in_axis, crosses, gram)
            for stored, place in p.slices
            if place.expert == expert
        }

    def block(self, index: int, streams: _Streams, tensors: Sequence[TensorPlan]) -> None:
        """Merge block ``index`` group by group, write its tensors, and advance every stream through it."""
        skeleton = self.skeleton
        block = skeleton.blocks[index]
        params = skeleton.block_params(index)
        by_name = {p.stored: p for p in params}
        maps = []
        for local, module, axis, in_features in linear_layers(block, routers=True):  # a router is a linear map
            stored = skeleton.stored_name(f"{skeleton.blocks_name}.{index}.{local}")
            if stored is not None:
                maps.append(_Map(stored, module, axis, in_features))
        for experts in expert_layers(block):
            name = f"{skeleton.blocks_name}.{index}.{experts.name}"
            maps.append(_Map(name, experts.module, 1, next(experts.maps())[1], experts))
        self.load(params, self.base)
        groups = _groups(block, streams.base_old[0], maps)
        leaders = [group[0] for group in groups]
        (base_inputs, base_out), *per_checkpoint = self.run_originals(block, params, leaders, streams)
        checkpoint_inputs = [inputs for inputs, _ in per_checkpoint]
        pending = self.shrunk_block(params, solved={m.name for group in groups for m in group})
        for g, group in enumerate(groups):
            originals = [base_inputs, *checkpoint_inputs]
            if group[0].experts is not None:
                fused = [by_name[f"{skeleton.blocks_name}.{index}.{param}"] for param in group[0].experts.params()]
                pending |= self.merge_experts(block, group[0], fused, streams, [inputs[g] for inputs in originals])
                for p in fused:
                    p.set(self.assemble(p, pending.__getitem__))
            else:
                solved = self.merge_group(block, group, streams, [inputs[g] for inputs in originals])
                for name, value in solved.items():
                    pending[name] = value
                    by_name[name].set(value.to(self.device, COMPUTE_DTYPE))
            for inputs in originals:
                inputs[g] = []  # the originals' inputs to this group are used up
        streams.merged_old = advanced(streams.merged_old, [run_block(block, b) for b in streams.merged_old])
        streams.merged_new = advanced(streams.merged_new, [run_block(block, b) for b in streams.merged_new])
        streams.base_old = advanced(streams.base_old, base_out)
        streams.checkpoints_new = [
            advanced(s, out) for s, (_, out) in zip(streams.checkpoints_new, per_checkpoint, strict=True)
        ]
        for p in params:
            p.release()
        for tensor in tensors:
            self.emit(tensor.name, pending.pop(tensor.name) if tensor.name in pending else self.shrink(tensor.name))

    def head(self, streams: _Streams, tensor: TensorPlan) -> None:
        """The untied LM head: a linear map whose inputs are the last hidden states after the final norm."""
        skeleton = self.skeleton
        assert skeleton.head is not None
        head_module = skeleton.head.owner
        in_features = next(f for _n, m, _a, f in linear_layers(skeleton.model) if m is head_module)

        def tail(batch: BlockInput) -> Tensor:
            hidden = batch.hidden
            for module in skeleton.tail:
                hidden = module(hidden)
            return _rows(hidden, in_features, batch.mask)

        self.load(skeleton.tail_params, self.base)
        base_inputs = [tail(b).to("cpu") for b in streams.base_old]
        checkpoint_inputs = []
        for reader, stream in zip(self.checkpoints, streams.checkpoints_new, strict=True):
            self.load(skeleton.tail_params, reader)
            checkpoint_inputs.append([tail(b).to("cpu") for b in stream])
        for p in skeleton.tail_params:
            p.set(self.tail_merged[p.stored])
        crosses, gram = _normal_equations(
            self.sides(streams, base_inputs, checkpoint_inputs), tail, in_features, self.alpha, self.device
        )
        self.emit(tensor.name, self.solve(tensor.name, skeleton.head_axis, crosses, gram))
        for p in skeleton.tail_params:
            p.release()


def sequential_regmean(
    base: CheckpointReader,
    checkpoints: Sequence[CheckpointReader],
    base_dir: Path,
    old: CalibrationSet,
    new: CalibrationSet,
    plan: MergePlan,
    write: Callable[[str, Tensor], None],
    *,
    base_weight: float = 1.0,
    alpha: float = 1.0,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    progress: bool = True,
) -> SequentialReport:
    """Merge ``checkpoints`` into ``base`` by sequential forgetting-aware RegMean and write every planned tensor.

    Args:
        base: The base model's reader (θ_B), measured on ``old`` text.
        checkpoints: The K checkpoints' readers, each measured on ``new`` text.
        base_dir: The base's folder, whose ``config.json`` gives the architecture.
        old: Calibration text of the languages the base knew (tokenized with the base's tokenizer).
        new: Calibration text of the new language.
        plan: The validated plan (:func:`~obim_trainer.pipeline.engine.plan_merge`); each tensor is written in its
            dtype. Extended vocabularies are not supported here.
        write: Called once per planned tensor, in :func:`sequential_write_order`, with a CPU tensor.
        base_weight: c > 0, the base's weight against the checkpoints'.
        alpha: α ∈ [0, 1], RegMean's shrinkage of every Gram and cross term toward its diagonal.
        device: Where the forward passes and the solves run.
        batch_size: Calibration samples per forward pass.
        progress: Show a progress bar over the blocks.

    Raises :class:`ConfigError` / :class:`CalibrationError` for bad parameters or empty calibration text
    before anything is read or written.
    """
    check_parameters(base_weight, alpha, old, new)
    if not checkpoints:
        raise ConfigError("no checkpoints to merge (K = 0); give at least one checkpoint folder")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"calibration_batch_size must be at least 1 (got {batch_size!r})")
    if plan.vocab_size is not None:
        raise ConfigError(
            f"the checkpoints extend the vocabulary to {plan.vocab_size} rows; sequential regmean runs the merged "
            "model with the base's vocabulary and cannot merge new rows: use sequential: false"
        )
    start = time.perf_counter()
    device = torch.device(device)
    skeleton = _build_skeleton(Path(base_dir), set(base.tensor_infos()), device)
    order = sequential_write_order(plan, skeleton.layout)
    blocks = len(skeleton.blocks)
    beyond = [t.name for t in order.tensors if t.block_index is not None and t.block_index >= blocks]
    if beyond:
        raise CheckpointError(f"tensor {beyond[0]} belongs to no block of the base's {blocks}-block architecture")
    head = order.tensors[-1] if skeleton.head is not None and order.tensors[-1].name == skeleton.head.stored else None
    merge = _SequentialMerge(
        base,
        checkpoints,
        skeleton,
        plan,
        write,
        base_weight=float(base_weight),
        alpha=float(alpha),
        device=device,
        old_tokens=old.num_tokens,
        new_tokens=new.num_tokens,
    )
    outside = [t for t in order.tensors if t.block_index is None and t is not head]
    bar = tqdm(total=blocks + (head is not None), desc="sequential regmean", unit="block", disable=not progress)
    try:
        with torch.no_grad():
            streams = merge.embed(outside, old, new, batch_size)
            for index in range(blocks):
                merge.block(index, streams, [t for t in order.tensors if t.block_index == index])
                bar.update()
            if head is not None:
                merge.head(streams, head)
                bar.update()
    finally:
        bar.close()
    merge.report.seconds = time.perf_counter() - start
    if unreached := merge.report.unreached_experts:
        logger.warning(
            "%d MoE expert(s) in %d layer(s) got no calibration token on the old or the new text in the merged "
            "model; they get θ_B + mean δ/(1+c) — give more calibration text",
            len(unreached),
            len({layer for layer, _e in unreached}),
        )
    logger.info(
        "sequential regmean: %d tensors (%d maps solved, %d with a ridge) in %.1fs",
        merge.report.tensors,
        merge.report.solved,
        merge.report.ridge_count,
        merge.report.seconds,
    )
    return merge.report
