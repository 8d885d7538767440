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


def test_a_16_bit_checkpoint_in_float32_is_converted_from_the_shared_view_a_float32_one_is_taken_over():
    """Methods compute in float32: a 16-bit θ_k converts into a new tensor without taking the shared one
    over (no copy in a sweep); a float32 θ_k is taken over, since the method may write into it."""
    for dtype, takes_over in ((torch.bfloat16, False), (torch.float32, True)):
        shared = [torch.randn(3, 4).to(dtype)]
        taken: list[int] = []

        def load(k: int, shared: list[torch.Tensor] = shared, taken: list[int] = taken) -> torch.Tensor:
            taken.append(k)
            return shared[k].clone()

        task = TensorTask(name="w", base_stored=shared[0].clone(), _load=load, _view=shared.__getitem__, num_models=1)
        delta = task.delta(0)
        assert delta.dtype == torch.float32 and not bool(delta.any())
        assert task.checkpoint_view(0) is shared[0]
        assert (taken == [0]) is takes_over, dtype
