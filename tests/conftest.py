"""Shared fixtures: a local tokenizer, tiny Llama and GPT-2 models built from configs, checkpoints
that differ from the base in structured ways, and calibration text. Nothing comes from a hub.

Session-scoped folders are shared by many tests and must not be modified; a test that writes
next to a checkpoint (statistics, selection) copies it first with :func:`copy_tree`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# the project's per-user cache (kernels, layouts, tokenized calibration) in a folder of this session;
# set before collection, which already builds the kernels, and inherited by subprocesses
os.environ["OBIM_CACHE_DIR"] = tempfile.mkdtemp(prefix="obim-test-cache-")

WORDS = (
    "the model learns a new language while it forgets old knowledge and merging recovers "
    "most of what was lost without losing the new skill checkpoints saliency activation "
    "weights layer token base merge order rotation calibration data small tiny large"
).split()

VOCAB_SIZE = 320
ZERO_RUN_TIMEOUT_S = 240


def make_texts(n: int, seed: int = 0, min_words: int = 4, max_words: int = 40) -> list[str]:
    """Deterministic pseudo-sentences of varying length (so batches need padding)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(min_words, max_words))) for _ in range(n)]


def build_tokenizer(folder: Path) -> Path:
    """Train a small BPE tokenizer on local text and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(make_texts(200, seed=1), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return folder


def make_tiny_llama(seed: int = 0, tie: bool = False, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 128,
        "tie_word_embeddings": tie,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)


def make_tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB_SIZE,
        n_positions=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg).to(dtype)


def perturbed_copy(model, seed: int, scale: float):
    """A checkpoint that differs from ``model`` in a structured way.

    Every tensor gets Gaussian noise of std ``scale`` times its own std, plus a block of the first
    rows shifted by ``4 × scale`` so that saliency is concentrated and different per checkpoint.
    """
    import copy

    ckpt = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in ckpt.named_parameters():
            ref = p.float().std().clamp_min(1e-3) if p.numel() > 1 else torch.tensor(1e-2)
            noise = torch.randn(p.shape, generator=gen) * scale * ref
            rows = max(1, p.shape[0] // 4)
            start = (seed * rows) % p.shape[0]
            noise[start : start + rows] += 4 * scale * ref
            p.add_(noise.to(p.dtype))
    return ckpt


def save_model_folder(model, folder: Path, tokenizer_dir: Path | None, **save_kwargs) -> Path:
    model.save_pretrained(folder, **save_kwargs)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy2(f, folder / f.name)
    return folder


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


LAUNCHING_FIXTURES = {"zero_checkpoint"}
"""Fixtures that start multi-process runs: a test using one is ``slow`` (``-m "not slow"`` skips it)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that depends on a launched run as ``slow``, however indirectly it asks for it."""
    for item in items:
        if LAUNCHING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def calibration_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("calib") / "calib.jsonl", make_texts(40, seed=7))


@pytest.fixture(scope="session")
def language_files(tmp_path_factory) -> dict[str, Path]:
    """Calibration text of an old (en) and a new (zh) language, as ``tests/test_merge_bytes.py`` recorded with."""
    folder = tmp_path_factory.mktemp("bytes_languages")
    return {
        "en": write_jsonl(folder / "en.jsonl", make_texts(12, seed=41, min_words=8)),
        "zh": write_jsonl(folder / "zh.jsonl", make_texts(12, seed=42, min_words=8)),
    }


def _model_family(tmp_path_factory, tokenizer_dir: Path, name: str, factory: Callable, k: int = 3):
    root = tmp_path_factory.mktemp(name)
    base = factory()
    base_dir = save_model_folder(base, root / "base", tokenizer_dir)
    ckpts = [
        save_model_folder(
            perturbed_copy(base, seed=10 + i, scale=0.05 * (i + 1)), root / f"checkpoint-{(i + 1) * 10}", tokenizer_dir
        )
        for i in range(k)
    ]
    return base_dir, ckpts


@pytest.fixture(scope="session")
def zero_checkpoint(tmp_path_factory) -> Callable[[int], Path]:
    """``zero_checkpoint(stage)``: the ``checkpoint-2`` folder (with model.safetensors) of a real two-process
    DeepSpeed ZeRO run on CPU (see tests/checkpoints/zero_run.py), run at most once per stage and session.

    Its base is ``make_tiny_llama(seed=0, tie=True)``. Shared: copy it before writing next to it.
    """
    pytest.importorskip("deepspeed")
    from tests.checkpoints.zero_run import launch

    root = tmp_path_factory.mktemp("zero")
    runs: dict[int, Path] = {}

    def run(stage: int) -> Path:
        if stage not in runs:
            runs[stage] = launch(root / f"zero{stage}", stage, timeout_s=ZERO_RUN_TIMEOUT_S)
        return runs[stage]

    return run


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory, tokenizer_dir) -> tuple[Path, list[Path]]:
    """(base folder, [3 checkpoint folders]) of a tiny untied Llama in float32."""
    return _model_family(tmp_path_factory, tokenizer_dir, "llama", make_tiny_llama)


@pytest.fixture(scope="session")
def llama_tied_bf16_family(tmp_path_factory, tokenizer_dir) -> tuple[Path, list[Path]]:
    """A tiny Llama with tied embeddings stored in bfloat16."""
    return _model_family(
        tmp_path_factory, tokenizer_dir, "llama_tied", lambda: make_tiny_llama(tie=True, dtype=torch.bfloat16)
    )


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory, tokenizer_dir) -> tuple[Path, list[Path]]:
    """(base folder, [3 checkpoint folders]) of a tiny GPT-2 (Conv1D layers, tied embeddings)."""
    return _model_family(tmp_path_factory, tokenizer_dir, "gpt2", make_tiny_gpt2)
