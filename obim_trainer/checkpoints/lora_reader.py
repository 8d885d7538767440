"""A PEFT LoRA adapter checkpoint, read as the full model it makes with its base.

A PEFT run saves only the adapter (``adapter_model.safetensors`` and ``adapter_config.json`` in each
``checkpoint-N/``). To merge it like any other checkpoint it is presented as full tensors
θ_k = θ_B + Δ, where for every target module Δ = B·A·scaling (transposed for ``fan_in_fan_out``
layers such as GPT-2's Conv1D, and for embeddings), scaling = lora_alpha / r, or lora_alpha / √r with
``use_rslora``, with ``rank_pattern`` / ``alpha_pattern`` overriding r and alpha per module. The task
vector δ_k = θ_k − θ_B the merge sees is then the dense Δ. Each tensor is computed when it is read,
from one base tensor and its two low-rank factors, so memory stays bounded by a tensor.

Tensors the adapter stores whole (``modules_to_save``, trained biases, an embedding saved with
``save_embedding_layers``) replace the base's; every other tensor is the base's own.

Δ is computed in float32 and added to the base in float32, then rounded once to the base's dtype.
That is exactly what ``merge_and_unload()`` gives for float32 adapters (peft's default, even on a
16-bit base); for 16-bit adapters and for LoRA on embeddings peft rounds Δ to 16 bits first, so
results can differ from it there by one rounding of the base dtype.

Variants whose merged weight is not θ_B + B·A·scaling — DoRA and the other LoRA variants, and
initialisations that change the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) — are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from obim_trainer.checkpoints.detect import ADAPTER_CONFIG, adapter_weights
from obim_trainer.checkpoints.reader import CheckpointReader, SafetensorsReader, TensorInfo, TorchBinReader
from obim_trainer.errors import CheckpointError

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
_WRAPPER_INFIXES = (".base_layer", ".modules_to_save")
_MERGE_YOURSELF = "merge it with peft's merge_and_unload(), save_pretrained the result and merge that folder"
_UNSUPPORTED = {
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow",
    "alora_invocation_tokens": "aLoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "mica": "MiCA",
    "kasa_config": "KaSA",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
    "trainable_token_indices": "trainable tokens",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga")
_FACTORS = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}
_LORA_BIAS = ".lora_B.bias"


@dataclass(frozen=True)
class LoraModule:
    """The low-rank update of one base tensor: Δ = transpose?(B·A) · scaling."""

    target: str
    a_key: str
    b_key: str
    scaling: float
    transpose: bool


def pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """``rank_pattern``/``alpha_pattern`` lookup as peft does it: the first key that, as a regex,
    matches the end of the module name at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(path: Path) -> dict:
    file = path / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text())
    except OSError as exc:
        raise CheckpointError(
            f"cannot read {file} ({exc.strerror or exc}); check that it exists and is readable"
        ) from None
    except ValueError as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}); re-save the adapter with save_pretrained") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} is not a JSON object; re-save the adapter with save_pretrained")
    return config


def check_supported(config: dict, file: Path) -> None:
    """Refuse adapters whose merged weight is not θ_B + B·A·scaling."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(
            f"{file} describes a {peft_type} adapter; only LoRA adapters can be read — {_MERGE_YOURSELF}"
        )
    if config.get("use_dora"):
        raise CheckpointError(
            f"{file} is a DoRA adapter (use_dora): its merged weight rescales every column of θ_B + B·A by a learned "
            f"magnitude, so its task vector is not the low-rank B·A·scaling this reader computes; {_MERGE_YOURSELF}"
        )
    for key, variant in _UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{file} uses {variant} ({key}), which this reader cannot merge; {_MERGE_YOURSELF}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise CheckpointError(
            f"{file} was initialised with {init!r}, which changes the base weights themselves, so θ_B + B·A is not "
            "the trained model; save the adapter with path_initial_model_for_weight_conversion (peft) to make it an "
            f"ordinary LoRA of the original base, or {_MERGE_YOURSELF}"
        )


def _base_name(key: str) -> str:
    name = key.removeprefix(PEFT_PREFIX)
    for infix in _WRAPPER_INFIXES:
        name = name.replace(infix + ".", ".")
    return name


class LoraCheckpointReader(CheckpointReader):
    """``path`` (``adapter_config.json`` + ``adapter_model.safetensors``) applied to ``base``.

    The base reader is borrowed, not owned: :meth:`close` leaves it open.
    """

    format = "peft-lora"

    def __init__(self, path: Path, base: CheckpointReader) -> None:
        super().__init__(Path(path))
        self.base = base
        self.config = read_adapter_config(self.path)
        config_file = self.path / ADAPTER_CONFIG
        check_supported(self.config, config_file)
        weights = adapter_weights(self.path)
        if weights is None:
            raise CheckpointError(f"{self.path} has {ADAPTER_CONFIG} but no adapter_model.safetensors; copy it there")
        self._adapter = (
            SafetensorsReader(self.path, [weights])
            if weights.suffix == ".safetensors"
            else TorchBinReader(self.path, [weights])
        )
        self._full: dict[str, str] = {}  # base name -> adapter key of a tensor stored whole
        self._modules: dict[str, LoraModule] = {}
        self._bias_updates: dict[str, tuple[str, float]] = {}  # base bias name -> (lora_B.bias key, scaling)
        try:
            self._classify(weights)
            self._infos = self._describe()
            self._check_base()
        except BaseException:
            self._adapter.close()
            raise
        logger.info(
            "%s: LoRA adapter on %s, %d low-rank module(s), %d tensor(s) stored whole",
            self.path,
            base.path,
            len(self._modules),
            len(self._full),
        )

    def _classify(self, weights: Path) -> None:
        keys = self._adapter.tensor_infos()
        factors: dict[str, dict[str, str]] = {}
        embedding: set[str] = set()
        for key in keys:
            suffix = next((s for s in _FACTORS if key.endswith(s)), None)
            if suffix is not None:
                which, is_embedding = _FACTORS[suffix]
                module = key.removesuffix(suffix)
                factors.setdefault(module, {})[which] = key
                if is_embedding:
                    embedding.add(module)
            elif not key.endswith(_LORA_BIAS):
                self._full[self._known(_base_name(key), key, weights)] = key
        for module, pair in factors.items():
            if set(pair) != {"A", "B"}:
                missing = "lora_B" if "A" in pair else "lora_A"
                raise CheckpointError(
                    f"{weights} has {next(iter(pair.values()))} but no {missing} for the same module; the adapter "
                    "file is incomplete — re-save it with save_pretrained"
                )
            self._add_module(module, pair["A"], pair["B"], module in embedding, weights)
        for key in (k for k in keys if k.endswith(_LORA_BIAS)):
            module = _base_name(key.removesuffix(_LORA_BIAS))
            self._bias_updates[self._known(module + ".bias", key, weights)] = (key, self._scaling(module, weights))

    def _known(self, name: str, key: str, weights: Path) -> str:
        if name not in self.base.tensor_infos():
            raise CheckpointError(
                f"tensor {key} of {weights} updates {name}, which the base {self.base.path} does not have; pass the "
                "base model this adapter was trained on (or, if the adapter uses a PEFT feature beyond plain LoRA, "
                f"{_MERGE_YOURSELF})"
            )
        return name

    def _scaling(self, module: str, weights: Path, rank: int | None = None) -> float:
        expected = int(pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8)))
        if rank is not None and rank != expected:
            raise CheckpointError(
                f"{ADAPTER_CONFIG} of {self.path} gives module {module} rank {expected} but {weights} holds rank "
                f"{rank}; the config does not belong to these weights — re-save the adapter"
            )
        alpha = pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8))
        return alpha / math.sqrt(expected) if self.config.get("use_rslora") else alpha / expected

    def _add_module(self, module_key: str, a_key: str, b_key: str, is_embedding: bool, weights: Path) -> None:
        module = _base_name(module_key)
        target = self._known(module + ".weight", a_key, weights)
        a_shape = self._adapter.tensor_infos()[a_key].shape
        b_shape = self._adapter.tensor_infos()[b_key].shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise CheckpointError(
                f"{weights}: lora_A {tuple(a_shape)} and lora_B {tuple(b_shape)} of {module} are not a low-rank pair "
                "(LoRA on convolutions is not supported); " + _MERGE_YOURSELF
            )
        stored = (
            self._adapter.tensor_infos()[self._full[target]]
            if target in self._full
            else self.base.tensor_infos()[target]
        )
        product = (b_shape[0], a_shape[1])

        def shape(transpose: bool) -> tuple[int, ...]:
            return product[::-1] if transpose else product

        transpose = is_embedding or bool(self.config.get("fan_in_fan_out"))
        if not is_embedding and shape(transpose) != stored.shape and shape(not transpose) == stored.shape:
            transpose = not transpose  # peft sets fan_in_fan_out per layer type but saves only the last value
        if shape(transpose) != stored.shape:
            raise CheckpointError(
                f"{weights}: the update B·A of {module} has shape {product} but {target} in {stored.file} has shape "
                f"{tuple(stored.shape)}; pass the base model this adapter was trained on"
            )
        self._modules[target] = LoraModule(target, a_key, b_key, self._scaling(module, weights, a_shape[0]), transpose)

    def _describe(self) -> dict[str, TensorInfo]:
        infos = {}
        for name, info in self.base.tensor_infos().items():
            if name in self._full:
                stored = self._adapter.tensor_infos()[self._full[name]]
                info = TensorInfo(name, stored.shape, stored.dtype, stored.file)
            elif name in self._modules or name in self._bias_updates:
                info = TensorInfo(name, info.shape, info.dtype, self._adapter.weight_files()[0])
            infos[name] = info
        return infos

    def _check_base(self) -> None:
        """The base given must be the one the adapter records, when that is a local folder."""
        recorded = self.config.get("base_model_name_or_path")
        folder = Path(recorded).expanduser() if recorded else None
        if folder is None or not folder.is_dir():
            logger.warning(
                "%s records its base as %r, which is not a local folder; cannot check that %s is that base",
                self.path / ADAPTER_CONFIG,
                recorded,
                self.base.path,
            )
            return
        if folder.resolve() == self.base.path.resolve():
            return
        from obim_trainer.checkpoints.dispatch import open_checkpoint

        with open_checkpoint(folder) as other:
            same = self._same_tensors(other)
        if same is not None:
            raise CheckpointError(
                f"{self.path / ADAPTER_CONFIG} says the adapter was trained on {folder}, but the base given, "
                f"{self.base.path}, differs from it in {same}. Pass {folder} as the base, or correct "
                "base_model_name_or_path in adapter_config.json if the adapter belongs to the base given"
            )
        logger.warning(
            "%s records its base as %s; %s holds the same weights, using it", self.path, folder, self.base.path
        )

    def _same_tensors(self, other: CheckpointReader) -> str | None:
        """The first difference between the given base and ``other`` — in names and shapes, then in
        the values of the first tensor the adapter updates — or None."""
        ours, theirs = self.base.tensor_infos(), other.tensor_infos()
        for name in ours.keys() | theirs.keys():
            if name not in ours or name not in theirs or ours[name].shape != theirs[name].shape:
                return f"tensor {name}"
        probe = next((n for n in ours if n in self._modules), None)
        if probe is not None and not torch.equal(self.base.read(probe), other.read(probe)):
            return f"the values of {probe}"
        return None

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> Tensor:
        info = self._info(name)
        base = self._adapter.read(self._full[name]) if name in self._full else self.base.read(name)
        update = self._delta(name)
        if update is None:
            return base
        return (base.float() + update).to(info.dtype)

    def _delta(self, name: str) -> Tensor | None:
        """Δ for ``name`` in float32: B·A·scaling for a weight, lora_B.bias·scaling for a bias."""
        module = self._modules.get(name)
        if module is not None:
            a = self._adapter.read(module.a_key).float()
            b = self._adapter.read(module.b_key).float()
            product = b @ a
            return (product.T if module.transpose else product) * module.scaling
        if name in self._bias_updates:
            key, scaling = self._bias_updates[name]
            return self._adapter.read(key).float() * scaling
        return None

    def weight_files(self) -> list[Path]:
        return self._adapter.weight_files()

    def fingerprint(self) -> str:
        """Changes with the adapter's weights, its config (scaling) and the base's weights."""
        digest = hashlib.sha256()
        digest.update(super().fingerprint().encode())
        digest.update((self.path / ADAPTER_CONFIG).read_bytes())
        digest.update(self.base.fingerprint().encode())
        return digest.hexdigest()

    def close(self) -> None:
        self._adapter.close()
