"""What a method sees of one tensor: stored and float32 views of the inputs, and reused scratch buffers."""

from __future__ import annotations

import torch

from obim_trainer.merging.task import TensorTask, Workspace


def test_workspace_reuses_one_buffer_per_role_and_grows_it():
    workspace = Workspace()
    cpu = torch.device("cpu")
    first = workspace.get("scores", (4, 5), torch.float32, cpu)
    smaller = workspace.get("scores", (3, 2), torch.float32, cpu)
    assert smaller.data_ptr() == first.data_ptr(), "a smaller tensor reuses the buffer"
    other = workspace.get("free", (4, 5), torch.bool, cpu)
    assert other.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
    larger = workspace.get("scores", (10, 10), torch.float32, cpu)
    assert larger.shape == (10, 10) and workspace.holds(larger)
    assert not workspace.holds(first.clone())


def test_checkpoints_come_stored_or_in_float32_and_random_scores_use_the_workspace():
    base = torch.randn(6, 4).bfloat16()
    ckpts = [base + 1, base - 1]
    workspace = Workspace()
    task = TensorTask.from_tensors("model.norm.weight", base, ckpts, workspace=workspace)
    assert task.base.dtype == torch.float32 and task.base_stored is not None
    assert task.base_stored.dtype == torch.bfloat16
    assert task.checkpoint_stored(1).dtype == torch.bfloat16
    assert torch.equal(task.checkpoint(1), ckpts[1].float())
    noise = task.rand_like_base("saliency", 0)
    assert workspace.holds(noise)
    plain = TensorTask.from_tensors("model.norm.weight", base, ckpts).rand_like_base("saliency", 0)
    assert torch.equal(noise, plain), "the same draw with or without a workspace"
