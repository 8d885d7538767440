"""The streaming engine: its pipeline and device handling change nothing, and plans split evenly for workers."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from obim_trainer.checkpoints import open_checkpoint
from obim_trainer.errors import ConfigError
from obim_trainer.merging import ParamKind, TensorTask, build_method
from obim_trainer.pipeline.engine import MergeEngine, TensorPlan, plan_merge, run_together, split_plan
from obim_trainer.pipeline.layout import ModelLayout


def opened(stack: ExitStack, family):
    base_dir, ckpt_dirs = family
    base = stack.enter_context(open_checkpoint(base_dir))
    readers = [stack.enter_context(open_checkpoint(c)) for c in ckpt_dirs]
    layout = ModelLayout.from_pretrained_dir(base_dir)
    return base, readers, layout, plan_merge(base, readers, layout)


@pytest.mark.parametrize(("method", "params"), [("ties_im", {}), ("ties", {"density": 0.4}), ("dare_ties", {})])
@pytest.mark.parametrize("family_name", ["llama_family", "llama_tied_bf16_family"])
def test_the_streamed_merge_equals_the_plain_per_tensor_merge(family_name, method, params, request):
    """Prefetching, the workspace and merging in the stored dtype are invisible in the result."""
    with ExitStack() as stack:
        base, readers, layout, plan = opened(stack, request.getfixturevalue(family_name))
        built = build_method(method, params, num_models=len(readers))
        engine = MergeEngine(base, readers, built, layout, seed=3, device=torch.device("cpu"), prefetch=2)
        streamed: dict[str, torch.Tensor] = {}
        engine.run(plan, streamed.__setitem__, progress=False)
        assert list(streamed) == [t.name for t in plan.tensors], "written in plan order"
        for t in plan.tensors:
            task = TensorTask.from_tensors(
                t.name,
                base.read(t.name),
                [r.read(t.name) for r in readers],
                kind=t.kind,
                block_index=t.block_index,
                seed=3,
            )
            expected = built.merge(task).tensor.to(t.dtype)
            assert streamed[t.name].dtype == t.dtype
            assert torch.equal(streamed[t.name], expected), t.name


def test_the_method_gets_every_input_on_the_engines_device(llama_family):
    """``meta`` stands in for an accelerator: the task's base, checkpoints and statistics are moved there."""
    with ExitStack() as stack:
        base, readers, layout, plan = opened(stack, llama_family)
        linear = next(t for t in plan.tensors if t.kind is ParamKind.LINEAR)
        stats = [_fake_stats(linear, layout)] * len(readers)
        built = build_method("obim", {}, num_models=len(readers))
        engine = MergeEngine(base, readers, built, layout, stats, device="meta")
        task = engine.task(linear)
        assert task.device == torch.device("meta")
        assert task.base_stored is not None and task.base_stored.device == torch.device("meta")
        assert all(x is not None and x.device == torch.device("meta") for x in task.input_sq_mean or [None])
        assert task.checkpoint(1).device == torch.device("meta")
        assert task.scratch("scores").device == torch.device("meta")
        assert all(t is not None and t.device.type == "cpu" for t in engine.read_inputs(linear)), "read on the CPU"


def test_engines_run_together_merge_as_each_alone(llama_tied_bf16_family):
    """ties_im takes θ_0's buffer over as its result; the engines after it still get θ_0 as read."""
    methods = [("ties_im", {}), ("ties", {"density": 0.4}), ("ties_im", {})]
    with ExitStack() as stack:
        base, readers, layout, plan = opened(stack, llama_tied_bf16_family)

        def engine(method: str, params: dict) -> MergeEngine:
            return MergeEngine(base, readers, build_method(method, params, num_models=len(readers)), layout, seed=3)

        together: list[dict[str, torch.Tensor]] = [{} for _ in methods]
        engines = [engine(*m) for m in methods]
        run_together(engines, plan, [out.__setitem__ for out in together], progress=False)
        for (method, params), out in zip(methods, together, strict=True):
            alone: dict[str, torch.Tensor] = {}
            engine(method, params).run(plan, alone.__setitem__, progress=False)
            assert list(out) == list(alone) and all(torch.equal(out[n], alone[n]) for n in alone), method
        other = stack.enter_context(open_checkpoint(readers[0].path))
        apart = MergeEngine(base, [other, *readers[1:]], build_method("ties", {}, num_models=len(readers)), layout)
        with pytest.raises(ValueError, match="share the opened base and checkpoint readers"):
            run_together([engines[0], apart], plan, [print, print], progress=False)


def _fake_stats(plan: TensorPlan, layout: ModelLayout):
    from obim_trainer.calibration import ActivationStats

    name = plan.name
    return ActivationStats(sq_sum={name: torch.ones(plan.shape[1])}, count={name: 1}, in_axis={name: 1})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_merge_is_byte_identical_to_the_cpu_merge(llama_tied_bf16_family):
    with ExitStack() as stack:
        base, readers, layout, plan = opened(stack, llama_tied_bf16_family)
        outputs = []
        for device in ("cpu", "cuda"):
            built = build_method("ties_im", {}, num_models=len(readers))
            out: dict[str, torch.Tensor] = {}
            MergeEngine(base, readers, built, layout, device=device).run(plan, out.__setitem__, progress=False)
            outputs.append(out)
        assert all(torch.equal(outputs[0][n], outputs[1][n]) for n in outputs[0])
        assert all(t.device.type == "cpu" for t in outputs[1].values()), "results come back to be written"


def plans(sizes: list[int]) -> list[TensorPlan]:
    return [TensorPlan(f"t{i}", (n,), torch.float32, ParamKind.OTHER, None) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_split_plan_gives_contiguous_balanced_runs(parts):
    sizes = [7, 100, 3, 3, 50, 50, 1, 80, 20, 20, 9, 60]
    tensors = plans(sizes)
    runs = split_plan(tensors, parts)
    assert len(runs) == parts
    assert [t for run in runs for t in run] == tensors, "every tensor once, in plan order"
    share = sum(sizes) / parts
    for run in runs:
        assert abs(sum(t.shape[0] for t in run) - share) <= max(sizes), "off by at most one tensor"


def test_split_plan_with_more_workers_than_tensors_and_no_workers():
    runs = split_plan(plans([5, 5]), 4)
    assert [len(r) for r in runs] == [0, 1, 0, 1], "each tensor goes to the run its midpoint falls in"
    with pytest.raises(ConfigError, match="at least one worker"):
        split_plan(plans([5]), 0)
