"""Mixture-of-experts modules as linear maps: routers, and each expert of a fused experts module.

A router is a linear map of the token's hidden state. An expert is a pair of linear maps applied
only to the tokens the router sends to it, so its OBM Hessian H = 2XXᵀ (the paper's eq. 6) and its
RegMean Gram XᵀX sum over those tokens only. transformers (5.x) loads the experts of Mixtral,
Qwen2-MoE, Qwen3-MoE and their relatives as one module holding 3-D parameters, ``gate_up_proj``
``[E, 2I, H]`` (``up_proj`` without a gate) and ``down_proj`` ``[E, H, I]``, called as
``experts(hidden_states [N, H], top_k_index [N, k], top_k_weights [N, k])``, while checkpoints
store each expert's 2-D matrices (``block_sparse_moe.experts.3.w1.weight``,
``mlp.experts.3.gate_proj.weight``). A forward pre-hook on the module sees the routing: it selects
each expert's tokens and recomputes that expert's first projection to get the input of
``down_proj`` (act(gate)·up), whatever kernel (eager loop, batched, grouped GEMM) runs the forward.

Statistics of expert e of parameter ``P`` are keyed ``P.e`` (``model.layers.0.mlp.experts.down_proj.3``);
:class:`~obim_trainer.pipeline.layout.ModelLayout` maps each stored 2-D tensor to that key.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def router_in_features(module: nn.Module) -> int | None:
    """Input size of an MoE router (transformers' ``*TopKRouter``: a bare ``[experts, hidden]`` weight applied
    as ``F.linear`` to the hidden states), ``None`` for any other module.

    A router is a linear map of the token's hidden state, so OBIM scores it per input column as a Linear
    weight (eq. 5). The sizes come from ``hidden_dim`` and ``ds_shape``, not the weight, which ZeRO-3
    partitions to nothing.
    """
    weight = getattr(module, "weight", None)
    hidden = getattr(module, "hidden_dim", None)
    if not type(module).__name__.endswith("Router") or not isinstance(weight, nn.Parameter):
        return None
    return hidden if isinstance(hidden, int) and len(_full_shape(weight)) == 2 else None


def expert_key(param: str, expert: int) -> str:
    """The statistics key of expert ``expert``'s slice of the fused parameter ``param``."""
    return f"{param}.{expert}"


def expert_of(key: str) -> tuple[str, int] | None:
    """``(fused parameter, expert)`` of an expert's statistics key, ``None`` for any other name.

    Parameter names end in a word (``.weight``), so a final number marks an expert slice.
    """
    param, _, last = key.rpartition(".")
    return (param, int(last)) if param and last.isdigit() else None


@dataclass(frozen=True)
class FusedExperts:
    """A module holding the experts of one MoE layer as 3-D parameters, as transformers'
    ``use_experts_implementation`` describes it (``has_gate``, ``has_bias``, ``is_transposed``).

    Attributes:
        name: The module's name in the model (wrappers stripped by the caller).
        module: The module.
        num_experts: E, the size of every parameter's first axis.
        first: The first projection's parameter (``gate_up_proj``, or ``up_proj`` without a gate).
        in_axis: Input axis of one expert's 2-D slice: 1 for ``[out, in]``, 0 when ``is_transposed``.
    """

    name: str
    module: nn.Module
    num_experts: int
    first: str
    in_axis: int

    def params(self) -> tuple[str, str]:
        """The fused parameters' names in the model: first projection, then ``down_proj``."""
        return f"{self.name}.{self.first}", f"{self.name}.down_proj"

    def maps(self) -> Iterator[tuple[str, int]]:
        """``(statistics key, in_features)`` of every expert's two maps."""
        first, down = (_full_shape(getattr(self.module, p)) for p in (self.first, "down_proj"))
        first_in, down_in = (shape[1 if self.in_axis == 0 else 2] for shape in (first, down))
        for e in range(self.num_experts):
            yield expert_key(f"{self.name}.{self.first}", e), first_in
            yield expert_key(f"{self.name}.down_proj", e), down_in

    def routed_inputs(
        self, hidden: Tensor, top_k_index: Tensor, keep: Tensor | None
    ) -> Iterator[tuple[int, Tensor, Tensor]]:
        """``(expert, x, a)`` for every expert some kept token is routed to: ``x`` the hidden states of those
        tokens (the first projection's input), ``a`` the activation ``down_proj`` reads (act(gate)·up).

        ``keep`` (``[N]`` bool) drops padding tokens; ``top_k_index`` entries ≥ E (expert-parallel
        sentinels) are never routed here.
        """
        hidden = hidden.reshape(-1, hidden.shape[-1])
        routed = top_k_index.reshape(hidden.shape[0], -1)
        tokens = torch.arange(hidden.shape[0], device=routed.device).unsqueeze(1).expand_as(routed)
        valid = (routed >= 0) & (routed < self.num_experts)  # expert-parallel sentinels are never routed here
        if keep is not None:
            valid &= keep.to(routed.device).unsqueeze(1)
        experts, tokens = routed[valid], tokens[valid]
        counts = torch.bincount(experts, minlength=self.num_experts).tolist()  # one sync per layer, not one per expert
        by_expert = tokens[torch.argsort(experts, stable=True)].split(counts)  # a token reaches an expert once
        for e, index in enumerate(by_expert):
            if index.numel():
                x = hidden.index_select(0, index.to(hidden.device))
                yield e, x, self._activation(x, e)

    def _activation(self, x: Tensor, expert: int) -> Tensor:
        module = self.module
        bias = getattr(module, f"{self.first}_bias")[expert] if getattr(module, "has_bias", False) else None
        return self.activation(x, getattr(module, self.first)[expert], bias)

    def activation(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """What ``down_proj`` reads for inputs ``x`` given one expert's first-projection slice ``weight`` (and
        bias): act(gate)·up. The weight is an argument so that the sequential merge can evaluate an original
        model's expert, or a just-merged one, without loading the whole fused parameter."""
        out = x @ weight if self.in_axis == 0 else F.linear(x, weight)
        if bias is not None:
            out = out + bias
        return self.module._apply_gate(out) if self.module.has_gate else self.module.act_fn(out)


def _full_shape(param: Tensor) -> tuple[int, ...]:
    """A parameter's shape, also under ZeRO-3, which partitions the data to nothing and keeps it in ``ds_shape``."""
    return tuple(getattr(param, "ds_shape", param.shape))


def fused_experts(name: str, module: nn.Module) -> FusedExperts | None:
    """The module as :class:`FusedExperts`, ``None`` if it is not a fused experts module this code understands."""
    if not all(hasattr(module, a) for a in ("has_gate", "is_transposed", "num_experts", "act_fn")):
        return None
    first = "gate_up_proj" if module.has_gate else "up_proj"
    params = [getattr(module, p, None) for p in (first, "down_proj")]
    experts = module.num_experts
    shapes = [_full_shape(p) for p in params if isinstance(p, nn.Parameter)]
    if len(shapes) != 2 or not all(len(s) == 3 and s[0] == experts for s in shapes):
        return None
    return FusedExperts(name, module, experts, first, 0 if module.is_transposed else 1)


def routing_arguments(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor] | None:
    """``(hidden_states, top_k_index)`` of a call ``experts(hidden_states, top_k_index, top_k_weights)``."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
    if torch.is_tensor(hidden) and torch.is_tensor(index) and not index.is_floating_point():
        return hidden, index
    return None


def routed_inputs_hook(
    experts: FusedExperts,
    keep: Callable[[int, torch.device], Tensor | None],
    add: Callable[[str, Tensor], None],
) -> Callable[..., None]:
    """A forward pre-hook (``with_kwargs=True``) on a fused experts module that gives a recorder each expert's two
    inputs over the real tokens routed to it: ``add(key, rows)`` with the hidden states (first projection) and the
    activation (``down_proj``) under :func:`expert_key`. ``keep(tokens, device)`` is the recorder's token mask for
    a call of that many tokens (``None``: keep all)."""
    first, down = experts.params()

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        routing = routing_arguments(args, kwargs)
        if routing is None:
            return
        hidden, index = routing
        for e, x, activation in experts.routed_inputs(hidden.detach(), index, keep(index.shape[0], hidden.device)):
            add(expert_key(first, e), x)
            add(expert_key(down, e), activation)

    return hook


@dataclass(frozen=True)
class StoredSlice:
    """Where one stored 2-D expert tensor lies in a fused parameter ``[E, d1, d2]``.

    Attributes:
        param: The fused parameter's name in the model.
        expert: e, the expert it belongs to.
        rows: Its rows of the fused parameter viewed as ``[E·d1, d2]``, in stored order.
        transposed: Stored as ``[d2, rows]`` rather than ``[rows, d2]``.
        in_axis: The stored tensor's input axis (d2 is the input unless the module ``is_transposed``).
    """

    param: str
    expert: int
    rows: Tensor
    transposed: bool
    in_axis: int

    @property
    def key(self) -> str:
        """The statistics key of this tensor's expert slice."""
        return expert_key(self.param, self.expert)


def stored_expert_slices(model: nn.Module, experts: list[FusedExperts]) -> dict[str, StoredSlice]:
    """Stored name → :class:`StoredSlice` of every expert's stored 2-D tensor.

    transformers saves fused experts one tensor per expert, through its own conversion mapping reversed.
    Running that reversal on small numbered stand-ins (``[E, d1, 1]``, every row of both fused
    parameters of one experts module its own number) tells, for every stored tensor, which rows of
    which fused parameter it holds, with no architecture special-cased here. One module at a time, so the
    stand-ins stay small (E·d1 numbers: 23 MB for a 256-expert layer of hidden size 7168).
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers load per-expert Linear layers, which need no mapping
        return {}
    if not hasattr(model, "config"):
        return {}
    slices: dict[str, StoredSlice] = {}
    for group in experts:
        starts: list[tuple[int, str, int]] = []  # (first number, fused parameter, d1)
        stand_ins: dict[str, Tensor] = {}
        start = 0
        for param in group.params():
            rows = _full_shape(getattr(group.module, param.rsplit(".", 1)[1]))[1]
            size = group.num_experts * rows
            stand_ins[param] = torch.arange(start, start + size, dtype=torch.float64).view(group.num_experts, rows, 1)
            starts.append((start, param, rows))
            start += size
        for stored, numbers in revert_weight_conversion(model, stand_ins).items():
            if (found := _stored_slice(numbers, starts, group)) is not None:
                slices[stored] = found
    return slices


def _stored_slice(numbers: Tensor, starts: list[tuple[int, str, int]], group: FusedExperts) -> StoredSlice | None:
    """The :class:`StoredSlice` of a reverted stand-in, ``None`` unless it is one expert's 2-D slice (a
    checkpoint may store experts fused, 3-D, or several together). The stand-in's last axis is the fused
    parameter's last: the input axis unless ``is_transposed``."""
    if numbers.ndim != 2:
        return None
    low, high = int(numbers.min()), int(numbers.max())
    begin, param, rows = starts[bisect.bisect_right([s[0] for s in starts], low) - 1]
    expert = (low - begin) // rows
    if (high - begin) // rows != expert or expert >= group.num_experts:
        return None
    transposed = numbers.shape[0] == 1 and numbers.shape[1] != 1  # where the fused last axis went
    last_axis = 0 if transposed else 1
    flat = (numbers.reshape(-1) - begin).long()
    return StoredSlice(param, expert, flat, transposed, last_axis if group.in_axis == 1 else 1 - last_axis)
