"""Recycled read buffers: memory is reused by size, and nothing that was handed on is ever overwritten."""

from __future__ import annotations

from contextlib import ExitStack

import torch

from obim_trainer.checkpoints import open_checkpoint
from obim_trainer.checkpoints.read_buffers import ReadBuffers
from obim_trainer.merging import MergeMethod, TensorTask
from obim_trainer.merging.task import MergeOutput
from obim_trainer.pipeline.engine import MergeEngine, plan_merge
from obim_trainer.pipeline.layout import ModelLayout


def test_a_buffer_given_back_is_lent_again_for_the_same_size_only():
    buffers = ReadBuffers()
    first = buffers.take(1000)
    view = first.view(torch.int16).reshape(20, 25)
    assert buffers.lends(view)
    buffers.give_back([view, None, torch.zeros(3)])  # views count; foreign tensors are ignored
    assert not buffers.lends(first)
    assert buffers.take(999).data_ptr() != first.data_ptr(), "another size gets its own buffer"
    assert buffers.take(1000).data_ptr() == first.data_ptr(), "the returned one is reused"
    again = buffers.take(1000)
    assert again.data_ptr() != first.data_ptr(), "a lent buffer is never lent twice"
    assert buffers.keep(again) and not buffers.lends(again)
    buffers.give_back([again])
    assert buffers.take(1000).data_ptr() != again.data_ptr(), "a kept buffer is not lent again"


def test_the_safetensors_reader_reads_into_the_lent_bytes(llama_family):
    base_dir, _ = llama_family
    with open_checkpoint(base_dir) as reader:
        name = next(iter(reader.tensor_infos()))
        buffers = ReadBuffers()
        tensor = reader.read_into(name, buffers.take)
        assert buffers.lends(tensor)
        assert torch.equal(tensor, reader.read(name))


class FirstCheckpoint(MergeMethod):
    """Returns θ_0 as read, the stored tensor itself: the engine must not hand that buffer on to the writer."""

    name = "first-checkpoint-as-read"

    def merge(self, task: TensorTask) -> MergeOutput:
        return MergeOutput(tensor=task.checkpoint_stored(0))


def test_results_that_alias_a_read_buffer_keep_it_out_of_circulation(llama_family):
    base_dir, ckpt_dirs = llama_family
    with ExitStack() as stack:
        base = stack.enter_context(open_checkpoint(base_dir))
        readers = [stack.enter_context(open_checkpoint(c)) for c in ckpt_dirs]
        layout = ModelLayout.from_pretrained_dir(base_dir)
        plan = plan_merge(base, readers, layout)
        engine = MergeEngine(base, readers, FirstCheckpoint(num_models=len(readers)), layout)
        kept: dict[str, torch.Tensor] = {}  # a writer that keeps every tensor it gets
        engine.run(plan, kept.__setitem__, progress=False)
        for tensor in plan.tensors:
            assert torch.equal(kept[tensor.name], readers[0].read(tensor.name).to(tensor.dtype)), tensor.name
        assert not any(engine.read_buffers.lends(t) for t in kept.values())


def test_integer_buffers_pass_through_in_their_own_memory(tmp_path):
    """An integer buffer is returned as the base stores it; its read buffer must not be lent again."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    folders = []
    for i in range(3):
        tensors = {"a.positions": torch.arange(8192, dtype=torch.int64) * (i + 1)}  # 64 KiB, read first
        tensors |= {f"b{j}.weight": torch.randn(128, 128, generator=gen) for j in range(3)}  # 64 KiB each
        folder = tmp_path / f"model{i}"
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders.append(folder)
    with ExitStack() as stack:
        base, *readers = [stack.enter_context(open_checkpoint(f)) for f in folders]
        plan = plan_merge(base, readers, ModelLayout())
        assert plan.tensors[0].name == "a.positions"
        engine = MergeEngine(base, readers, FirstCheckpoint(num_models=2), ModelLayout())
        kept: dict[str, torch.Tensor] = {}
        engine.run(plan, kept.__setitem__, progress=False)
        assert torch.equal(kept["a.positions"], base.read("a.positions"))
        for j in range(3):
            assert torch.equal(kept[f"b{j}.weight"], readers[0].read(f"b{j}.weight"))
