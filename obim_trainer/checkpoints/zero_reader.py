"""The fp32 master weights of a DeepSpeed ZeRO checkpoint (stage 1, 2 or 3), one tensor at a time.

Under ZeRO the optimizer keeps fp32 master copies of the trainable weights, split across the
data-parallel ranks: each ``*_optim_states.pt`` holds one rank's flat partition of every parameter
group, and the ``*_model_states.pt`` files hold names and shapes, frozen parameters and buffers.
The masters are what training continues from; a ``model.safetensors`` written beside them is their
16-bit rounding (and under ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save`` it is not
written at all). Which of the two a folder is read as is decided in :mod:`.detect`.

From ``deepspeed.utils.zero_to_fp32`` (0.19.8) this module uses the file discovery in rank order
(``get_model_state_files``, ``get_optim_files``), the ZeRO-3 partition arithmetic
(``zero3_partitioned_param_info``) and ``GatheredTensor``, the lazy pseudo-tensor of
``get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True)`` that gathers one ZeRO-3 parameter from
every rank's partition. What had to be added, because that lazy mode is lazy only for ZeRO-3's
trainable parameters:

* ZeRO-1/2: DeepSpeed concatenates every rank's whole flat group (the model's size in fp32) and
  narrows each parameter out of it, lazy mode or not. Here each parameter's position in that virtual
  concatenation is computed once at open, and a read copies only its slices of the ranks it spans.
* The model-state files are loaded whole by DeepSpeed (for ZeRO-1/2 they hold the entire 16-bit
  model); here they are memory-mapped like the optimizer files, and ZeRO-3's frozen parameters are
  gathered one at a time instead of all at open.
* Safe loading: DeepSpeed unpickles with ``weights_only=False``, which runs whatever code a pickle
  names. Here files load with ``weights_only=True``, allowing DeepSpeed's own classes (loss scaler,
  stage enum, fragment addresses) and refusing a file that names anything else.
* Every failure is a :class:`CheckpointError` that names the file and the fix.

The result equals ``get_fp32_state_dict_from_zero_checkpoint`` tensor for tensor: trainable
parameters in fp32, frozen ones in their stored dtype, floating buffers in fp32, tied parameters
under both names. Memory: a read costs the tensor it returns (ZeRO-3: padded to a multiple of the
world size). Mapped pages that were read stay in the page cache and count in RSS while the reader
is open, but they are clean file pages the kernel reclaims under pressure, as for
:class:`~obim_trainer.checkpoints.reader.TorchBinReader`.
"""

from __future__ import annotations

import importlib
import logging
import math
import pickle
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from obim_trainer.checkpoints.detect import ZERO_LATEST, latest_tag
from obim_trainer.checkpoints.reader import CheckpointReader, TensorInfo
from obim_trainer.errors import CheckpointError

logger = logging.getLogger(__name__)

_TRUSTED_PICKLE_MODULES = ("deepspeed.",)
_CONVERT_HINT = (
    "if the checkpoint is intact, convert it with the zero_to_fp32.py script DeepSpeed saved beside it "
    "and merge the converted folder"
)

Loader = Callable[[], Tensor]


MIN_DEEPSPEED = "0.16"
"""The first DeepSpeed whose ``zero_to_fp32`` has everything below (``GatheredTensor`` came with its lazy mode)."""
NEEDED = ("get_model_state_files", "get_optim_files", "zero3_partitioned_param_info", "GatheredTensor")


def _deepspeed() -> Any:
    """``deepspeed.utils.zero_to_fp32``, checked for what this reader uses (see :func:`check_zero_to_fp32`)."""
    try:
        from deepspeed.utils import zero_to_fp32
    except ImportError as exc:
        raise CheckpointError(
            f"reading DeepSpeed ZeRO checkpoints needs deepspeed ({exc}); pip install 'obim-trainer[deepspeed]'"
        ) from None
    return check_zero_to_fp32(zero_to_fp32)


def check_zero_to_fp32(module: Any) -> Any:
    """``module`` if it has every function this reader uses, else one error naming the version needed
    (an older DeepSpeed would otherwise fail with an AttributeError in the middle of a read)."""
    missing = [name for name in NEEDED if not hasattr(module, name)]
    if missing:
        import deepspeed

        raise CheckpointError(
            f"reading DeepSpeed ZeRO checkpoints needs deepspeed>={MIN_DEEPSPEED}; the installed "
            f"{getattr(deepspeed, '__version__', '(unknown version)')} lacks zero_to_fp32.{', '.join(missing)}. "
            f"Upgrade it: pip install 'deepspeed>={MIN_DEEPSPEED}'"
        )
    return module


def _constants() -> Any:
    from deepspeed.checkpoint import constants

    return constants


def _trusted_global(qualified: str, file: Path) -> Any:
    module, _, name = qualified.rpartition(".")
    if not qualified.startswith(_TRUSTED_PICKLE_MODULES):
        raise CheckpointError(
            f"{file} names {qualified} in its pickle, which is not loaded for safety (only DeepSpeed's own "
            f"classes are); {_CONVERT_HINT}"
        )
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise CheckpointError(
            f"{file} was written by a DeepSpeed that has {qualified}, which the installed deepspeed lacks; "
            "install the DeepSpeed version that wrote the checkpoint"
        ) from None


def load_zero_file(file: Path) -> dict[str, Any]:
    """One DeepSpeed ``.pt`` file, memory-mapped, unpickled with ``weights_only=True``."""
    try:
        allowed = [_trusted_global(g, file) for g in torch.serialization.get_unsafe_globals_in_checkpoint(file)]
        with torch.serialization.safe_globals(allowed):
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot read {file} ({exc.strerror or exc}); check that it exists and is readable"
        ) from None
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{file} is corrupt or truncated ({detail}); {_CONVERT_HINT}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a DeepSpeed checkpoint; {_CONVERT_HINT}")
    return state


def resolve_tag_dir(path: Path, tag: str | None = None) -> Path:
    """The ``global_step*`` folder of a checkpoint: ``path/tag``, the one ``latest`` names, the only
    one there is, or ``path`` itself when it is that folder."""
    named_by = f"the tag {tag!r} asked for"
    if tag is None:
        tag = latest_tag(path)
        named_by = f"{path / ZERO_LATEST} names {tag!r}"
    if tag is None:
        if any(path.glob("*_model_states.pt")):
            return path
        steps = sorted(p.name for p in path.glob("global_step*") if p.is_dir())
        if len(steps) != 1:
            example = steps[-1] if steps else "global_step100"
            raise CheckpointError(
                f"{path} has no '{ZERO_LATEST}' file saying which DeepSpeed checkpoint is current (global_step* "
                f"folders: {', '.join(steps) or 'none'}); pass the tag (e.g. {example})"
            )
        tag = steps[0]
    tag_dir = path / tag
    if not tag_dir.is_dir():
        raise CheckpointError(
            f"{named_by}, but {tag_dir} does not exist; the checkpoint was moved or partly deleted — copy the "
            "folder back, or read the weights saved beside it (zero_weights='saved')"
        )
    return tag_dir


def _files(zero_to_fp32: Any, tag_dir: Path, kind: str) -> list[Path]:
    find = zero_to_fp32.get_optim_files if kind == "optim" else zero_to_fp32.get_model_state_files
    try:
        return [Path(f) for f in find(str(tag_dir))]
    except FileNotFoundError:
        raise CheckpointError(
            f"{tag_dir} holds no *_{kind}_states.pt files; the DeepSpeed checkpoint is incomplete (the Trainer "
            "writes them unless save_only_model=True) — merge a complete checkpoint"
        ) from None


class ZeroCheckpointReader(CheckpointReader):
    """The fp32 master weights of the DeepSpeed checkpoint in ``path`` (a Trainer ``checkpoint-N``
    folder holding ``latest`` and ``global_step*/``, or the ``global_step*`` folder itself)."""

    format = "deepspeed-zero"

    def __init__(self, path: Path, tag: str | None = None) -> None:
        super().__init__(Path(path))
        zero_to_fp32 = _deepspeed()
        self.tag_dir = resolve_tag_dir(self.path, tag)
        self._model_files = _files(zero_to_fp32, self.tag_dir, "model")
        self._optim_files = _files(zero_to_fp32, self.tag_dir, "optim")
        self._infos: dict[str, TensorInfo] = {}
        self._loaders: dict[str, Loader] = {}
        model_states = [load_zero_file(f) for f in self._model_files]
        self._check_model_states(model_states)
        stage, groups, paddings = self._optim_partitions()
        self._add_buffers(model_states[0])
        if stage <= 2:
            self._add_zero2_frozen(model_states[0])
            self._add_zero2_trainable(model_states[0], groups, paddings)
        else:
            self._add_zero3_frozen(model_states)
            self._add_zero3_trainable(zero_to_fp32, model_states[0], groups)
        self._add_shared(model_states[0])
        self.stage = stage
        logger.info(
            "%s: DeepSpeed ZeRO-%d checkpoint %s of %d rank(s), %d tensors (fp32 master weights)",
            self.path,
            stage,
            self.tag_dir.name,
            len(groups),
            len(self._infos),
        )

    def _check_model_states(self, states: list[dict[str, Any]]) -> None:
        c = _constants()
        for file, state in zip(self._model_files, states, strict=True):
            if c.BUFFER_NAMES not in state or c.PARAM_SHAPES not in state:
                raise CheckpointError(
                    f"{file} is not a DeepSpeed model-state file (no {c.PARAM_SHAPES}); {_CONVERT_HINT}"
                )
            for key in (c.AUTOEP_LAYERS_KEY, c.AUTOEP_LAYERS_KEY_LEGACY):
                layers = state.get(key)
                if isinstance(layers, list) and any(
                    isinstance(e, dict)
                    and e.get(c.AUTOEP_ZERO3_EXPERT_STATE_FORMAT_KEY) == c.AUTOEP_ZERO3_PARTITIONED_EXPERT_STATE_FORMAT
                    for e in layers
                ):
                    raise CheckpointError(
                        f"{file} is an expert-parallel (AutoEP) ZeRO-3 checkpoint, whose experts are split over "
                        "expert groups and cannot be gathered here; convert it with DeepSpeed's ds_to_universal.py"
                    )

    def _optim_partitions(self) -> tuple[int, list[list[Tensor]], list[list[int]] | None]:
        """Stage, each rank's flat fp32 partition per group, and per-parameter alignment paddings."""
        c = _constants()
        states = [load_zero_file(f).get(c.OPTIMIZER_STATE_DICT) for f in self._optim_files]
        first = states[0]
        if not isinstance(first, dict) or c.ZERO_STAGE not in first:
            raise CheckpointError(f"{self._optim_files[0]} is not a ZeRO optimizer checkpoint; {_CONVERT_HINT}")
        stage = int(first[c.ZERO_STAGE])
        world = first[c.PARTITION_COUNT]
        world = max(world) if isinstance(world, list) else int(world)
        if world != len(states):
            raise CheckpointError(
                f"{self.tag_dir} holds {len(states)} *_optim_states.pt file(s) but the run had {world} data-parallel "
                "ranks; a rank's file is missing or left from another run (tensor- or pipeline-parallel "
                "checkpoints are not supported) — re-save or copy the complete checkpoint"
            )
        key = c.SINGLE_PARTITION_OF_FP32_GROUPS if stage <= 2 else c.FP32_FLAT_GROUPS
        groups = [state[key] for state in states]
        if len({len(g) for g in groups}) != 1:
            raise CheckpointError(
                f"the ranks of {self.tag_dir} disagree on the number of parameter groups; {_CONVERT_HINT}"
            )
        return stage, groups, first.get(c.PARAM_ALIGNMENT_PADDINGS)

    def _add(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, file: Path, loader: Loader) -> None:
        self._infos[name] = TensorInfo(name, tuple(int(d) for d in shape), dtype, file)
        self._loaders[name] = loader

    def _add_buffers(self, state: dict[str, Any]) -> None:
        c = _constants()
        names = set(state[c.BUFFER_NAMES])
        for name, buffer in state["module"].items():
            if name in names:  # floating buffers become fp32, as in DeepSpeed's consolidation
                dtype = torch.float32 if buffer.is_floating_point() else buffer.dtype
                self._add(name, buffer.shape, dtype, self._model_files[0], partial(_as_dtype, buffer, dtype))

    def _add_zero2_frozen(self, state: dict[str, Any]) -> None:
        c = _constants()
        fragments = state.get(c.FROZEN_PARAM_FRAGMENTS) or {}
        for name, shape in (state.get(c.FROZEN_PARAM_SHAPES) or {}).items():
            fragment = fragments[name]
            self._add(name, shape, fragment.dtype, self._model_files[0], partial(_as_dtype, fragment, fragment.dtype))

    def _add_zero3_frozen(self, states: list[dict[str, Any]]) -> None:
        c = _constants()
        for name, shape in (states[0].get(c.FROZEN_PARAM_SHAPES) or {}).items():
            fragments = [s[c.FROZEN_PARAM_FRAGMENTS][name] for s in states]
            loader = partial(_gather_frozen, fragments, tuple(shape))
            self._add(name, shape, fragments[0].dtype, self._model_files[0], loader)

    def _add_zero2_trainable(
        self, state: dict[str, Any], groups: list[list[Tensor]], paddings: list[list[int]] | None
    ) -> None:
        """Place each parameter in the concatenation of the ranks' partitions of its group, as
        ``_zero2_merge_trainable_params`` does, and keep only where its slices are."""
        c = _constants()
        param_shapes = state[c.PARAM_SHAPES]
        if len(param_shapes) != len(groups[0]):
            raise CheckpointError(
                f"{self._model_files[0]} describes {len(param_shapes)} parameter group(s) but the optimizer files of "
                f"{self.tag_dir} hold {len(groups[0])}; the model-state and optimizer files do not belong together"
            )
        align = 2 * len(groups)  # ZeRO-2 pads each group to a multiple of 2 × world size
        for g, shapes in enumerate(param_shapes):
            partitions = [rank_groups[g] for rank_groups in groups]
            group_paddings = paddings[g] if paddings is not None else [0] * len(shapes)
            if len(group_paddings) != len(shapes):
                raise CheckpointError(
                    f"{self._optim_files[0]} lists {len(group_paddings)} alignment paddings for the "
                    f"{len(shapes)} parameters of group {g}; {_CONVERT_HINT}"
                )
            offset = 0
            for (name, shape), padding in zip(shapes.items(), group_paddings, strict=True):
                numel = math.prod(shape)
                loader = partial(_gather_zero2, partitions, offset, numel, tuple(shape))
                self._add(name, shape, partitions[0].dtype, self._optim_files[0], loader)
                offset += numel + padding
            available = sum(p.numel() for p in partitions)
            if align * math.ceil(offset / align) != align * math.ceil(available / align):
                raise CheckpointError(
                    f"the parameters of group {g} in {self.tag_dir} need {offset} values but the ranks' fp32 "
                    f"partitions hold {available}; the model-state and optimizer files do not belong together"
                )

    def _add_zero3_trainable(self, zero_to_fp32: Any, state: dict[str, Any], groups: list[list[Tensor]]) -> None:
        """One ``GatheredTensor`` per parameter, placed as ``_zero3_merge_trainable_params`` does."""
        c = _constants()
        world = len(groups)
        group_ends = [0, *torch.tensor([t.numel() for t in groups[0]]).cumsum(0).tolist()]
        offset = 0
        for shapes in state[c.PARAM_SHAPES]:
            for name, shape in shapes.items():
                partitioned, _ = zero_to_fp32.zero3_partitioned_param_info(math.prod(shape), world)
                gathered = zero_to_fp32.GatheredTensor(groups, group_ends, offset, partitioned, torch.Size(shape))
                self._add(name, shape, gathered.dtype, self._optim_files[0], gathered.contiguous)
                offset += partitioned
        if offset != group_ends[-1]:
            raise CheckpointError(
                f"the parameters in {self.tag_dir} need {offset * world} values but the ranks' fp32 partitions hold "
                f"{group_ends[-1] * world}; the model-state and optimizer files do not belong together"
            )

    def _add_shared(self, state: dict[str, Any]) -> None:
        for name, target in state.get("shared_params", {}).items():
            if target in self._infos:
                info = self._infos[target]
                self._add(name, info.shape, info.dtype, info.file, self._loaders[target])

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> Tensor:
        self._info(name)
        if name not in self._loaders:
            raise CheckpointError(f"{self} was closed; open the checkpoint again to read {name}")
        # DeepSpeed saves the fp32 partitions as tensors that require grad; a reader returns plain data
        return self._loaders[name]().detach()

    def weight_files(self) -> list[Path]:
        return [*self._model_files, *self._optim_files]

    def close(self) -> None:
        self._loaders.clear()


def _as_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def _gather_frozen(fragments: list[Tensor], shape: tuple[int, ...]) -> Tensor:
    return torch.cat(fragments)[: math.prod(shape)].view(shape)


def _gather_zero2(partitions: list[Tensor], offset: int, numel: int, shape: tuple[int, ...]) -> Tensor:
    """Elements ``[offset, offset + numel)`` of the ranks' partitions laid end to end."""
    pieces, start = [], 0
    for partition in partitions:
        end = start + partition.numel()
        lo, hi = max(offset, start), min(offset + numel, end)
        if lo < hi:
            pieces.append(partition[lo - start : hi - start])
        start = end
    return torch.cat(pieces).view(shape)
