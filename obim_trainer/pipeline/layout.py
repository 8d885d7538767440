"""What each stored tensor is in the network, read from the base's config without loading weights.

OBIM scores ``nn.Linear``/``Conv1D`` weights by activations and everything else at
random, and rotates the merge order by decoder block. Both need to know, per tensor
name, the kind of module it belongs to and its block index. Building the model on the
``meta`` device from ``config.json`` gives that at no memory cost, but it imports most of
transformers (seconds), so the layout is cached per user by the config's content and the
transformers version (:mod:`~obim_trainer._user_cache`): a merge whose statistics are cached
then never imports transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from obim_trainer._user_cache import cache_dir, installed_version
from obim_trainer.calibration.moe import FusedExperts, fused_experts, router_in_features, stored_expert_slices
from obim_trainer.checkpoints.atomic import write_atomically
from obim_trainer.errors import CheckpointError
from obim_trainer.merging.task import ParamKind

logger = logging.getLogger(__name__)

BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def block_index(name: str) -> int | None:
    """Index of the decoder block a tensor belongs to (``model.layers.7.…`` → 7), ``None`` outside blocks."""
    match = BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


_CACHE_FORMAT = 5


def _cache_entry(folder: Path) -> Path | None:
    """The cache file for ``folder``'s layout: named by its config.json and the transformers version."""
    try:
        config = (folder / "config.json").read_bytes()
    except OSError:
        return None
    digest = hashlib.sha256(config + b"\0" + installed_version("transformers").encode()).hexdigest()[:24]
    return cache_dir("layouts") / f"{digest}.json"


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def _stored_names(model: nn.Module, loaded: dict[str, ParamKind]) -> dict[str, str]:
    """Stored name → loaded name for the one-to-one renames transformers applies on load.

    Uses transformers' own conversion mapping reversed (as ``save_pretrained`` does), so no
    architecture is special-cased here. Converters that reshape tensors (fused experts) are not renames
    and are left out.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:  # older transformers: names are stored as loaded
        return {}
    if not hasattr(model, "config"):
        return {}
    transforms = get_model_conversion_mapping(model, add_legacy=False)[::-1]
    renamings = [t.reverse_transform() for t in transforms if type(t) is WeightRenaming]
    stored = {name: apply_renamings(name, renamings) for name in loaded}
    return {s: name for name, s in stored.items() if s != name}


@dataclass
class ModelLayout:
    """Kinds of the model's parameters and which pair of names is tied.

    Attributes:
        kinds: Parameter name → :class:`ParamKind`.
        input_embedding: Name of the input embedding weight, if found.
        output_embedding: Name of the output projection (``lm_head``) weight, if found.
        tied: Whether the config ties the two (then only the input embedding is stored).
        prefix: The model's ``base_model_prefix`` (``model``, ``transformer``), used to match
            files saved without it.
        transposed: Linear weights stored ``[in, out]`` (transformers' ``Conv1D``, GPT-2): input axis 0.
        stored_names: Stored name → loaded name where transformers renames on load (GPT-NeoX's
            ``embed_out`` is the loaded ``lm_head``), taken from transformers' own conversion mapping;
            for an MoE expert's stored 2-D tensor, the statistics key of its slice of the fused parameter
            (``…block_sparse_moe.experts.3.w1.weight`` → ``…mlp.experts.gate_up_proj.3``, see
            :mod:`~obim_trainer.calibration.moe`), which :attr:`kinds` lists as a Linear weight.
    """

    kinds: dict[str, ParamKind] = field(default_factory=dict)
    input_embedding: str | None = None
    output_embedding: str | None = None
    tied: bool = False
    prefix: str = ""
    transposed: frozenset[str] = frozenset()
    stored_names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelLayout:
        kinds: dict[str, ParamKind] = {}
        transposed: set[str] = set()
        module_names: dict[int, str] = {}
        experts: list[FusedExperts] = []
        for mod_name, module in model.named_modules(remove_duplicate=False):
            module_names.setdefault(id(module), mod_name)
            if (found := fused_experts(mod_name, module)) is not None:
                experts.append(found)
            if isinstance(module, nn.Linear) or _is_conv1d(module) or router_in_features(module) is not None:
                kind = ParamKind.LINEAR
            elif isinstance(module, nn.Embedding):
                kind = ParamKind.EMBEDDING
            else:
                kind = ParamKind.OTHER
            for p_name, _ in module.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                kinds[full] = kind if p_name == "weight" else ParamKind.OTHER
                if p_name == "weight" and _is_conv1d(module):
                    transposed.add(full)

        def weight_name(getter: str) -> str | None:
            module = getattr(model, getter, lambda: None)()
            return f"{module_names[id(module)]}.weight" if module is not None and id(module) in module_names else None

        stored_names = _stored_names(model, kinds)
        for stored, found in stored_expert_slices(model, experts).items():
            stored_names[stored], kinds[found.key] = found.key, ParamKind.LINEAR  # scored as a Linear weight
            if found.in_axis == 0:
                transposed.add(found.key)
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
        return cls(
            kinds=kinds,
            input_embedding=weight_name("get_input_embeddings"),
            output_embedding=weight_name("get_output_embeddings"),
            tied=bool(getattr(text_config, "tie_word_embeddings", False)),
            prefix=getattr(model, "base_model_prefix", "") or "",
            transposed=frozenset(transposed),
            stored_names=stored_names,
        )

    @classmethod
    def from_pretrained_dir(cls, folder: Path) -> ModelLayout:
        """Layout of the model described by ``folder/config.json``, built on the meta device (or cached)."""
        entry = _cache_entry(folder)
        if entry is not None and entry.is_file():
            try:
                return cls.from_json(json.loads(entry.read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                logger.info("ignoring an unreadable cached layout %s", entry)
        layout = cls._built(folder)
        if entry is not None and layout.kinds:
            write_atomically(entry, json.dumps(layout.to_json()).encode())
        return layout

    @classmethod
    def _built(cls, folder: Path) -> ModelLayout:
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read the model config in {folder} ({exc}); "
                "the base folder must hold a transformers config.json"
            ) from None
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError) as exc:
            logger.warning(
                "%s is not a causal LM transformers can build (%s); every tensor gets random saliency", folder, exc
            )
            return cls()
        return cls.from_model(model)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _CACHE_FORMAT,
            "kinds": {name: kind.value for name, kind in self.kinds.items()},
            "input_embedding": self.input_embedding,
            "output_embedding": self.output_embedding,
            "tied": self.tied,
            "prefix": self.prefix,
            "transposed": sorted(self.transposed),
            "stored_names": self.stored_names,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelLayout:
        if data.get("format") != _CACHE_FORMAT:
            raise ValueError(f"layout format {data.get('format')!r}")
        return cls(
            kinds={name: ParamKind(kind) for name, kind in data["kinds"].items()},
            input_embedding=data["input_embedding"],
            output_embedding=data["output_embedding"],
            tied=bool(data["tied"]),
            prefix=data["prefix"],
            transposed=frozenset(data["transposed"]),
            stored_names=dict(data["stored_names"]),
        )

    def model_name(self, name: str) -> str:
        """The model's name of a stored tensor: files saved without the ``prefix.`` are matched too,
        and names transformers renames on load are mapped to the loaded name."""
        name = self.stored_names.get(name, name)
        if name not in self.kinds and self.prefix and f"{self.prefix}.{name}" in self.kinds:
            return f"{self.prefix}.{name}"
        return name

    def kind(self, name: str) -> ParamKind:
        """Kind of a stored tensor; files saved without the ``prefix.`` are matched too."""
        return self.kinds.get(self.model_name(name), ParamKind.OTHER)

    def in_axis(self, name: str) -> int:
        """The input axis of a linear weight: 0 for ``Conv1D`` (``[in, out]``), 1 for ``nn.Linear`` (``[out, in]``)."""
        return 0 if self.model_name(name) in self.transposed else 1

    @property
    def num_blocks(self) -> int | None:
        """The number of decoder blocks L (from the block indices of the parameter names), ``None`` without any."""
        blocks = {block_index(name) for name in self.kinds} - {None}
        return len(blocks) if blocks else None

    def is_vocabulary_tensor(self, name: str) -> bool:
        """Whether rows of this tensor index the vocabulary (embedding or lm_head)."""
        return self.model_name(name) in {self.input_embedding, self.output_embedding} - {None}

    def redundant_tied_name(self, names: set[str]) -> str | None:
        """The stored output-embedding name to drop because it is tied to the input embedding."""
        if not (self.tied and self.input_embedding and self.output_embedding):
            return None
        out, inp = self.output_embedding, self.input_embedding
        return out if out in names and inp in names else None
