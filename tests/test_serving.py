"""Mixed-adapter batches and forward_all_tasks: every row must equal its adapter run alone."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_clip_classifier, tiny_timm_resnet
from peft import get_peft_model

import ftn_peft
from ftn_peft import BASE_ADAPTER
from ftn_peft.serving import forward_all_tasks

RESNET_HEADS = {"a": 10, "b": 7, "c": 10}  # "a" and "c" share a head size, "b" does not
MIXED = ["a", "b", BASE_ADAPTER, "c", "b", "a", BASE_ADAPTER, "c"]


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="module")
def resnet_model():
    """Three adapters whose task BatchNorms were trained on different data, so their running stats differ."""
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=2, num_classes=10), adapter_name="a")
    for name in ("b", "c"):
        model.add_adapter(name, ftn_peft.presets.resnet(r=2, num_classes=RESNET_HEADS[name]))
    gen = torch.Generator().manual_seed(3)
    for shift, name in enumerate(RESNET_HEADS):
        model.set_adapter(name)
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(8, 3, 32, 32, generator=gen) * (1 + shift) + 2 * shift)
    return model.eval()


@pytest.fixture(scope="module")
def clip_model():
    """CLIP vision tower: a query/value adapter (5 classes), output-projection adapters with 3 and 5 classes."""
    cfg = dict(r=2, head_module="classifier")
    model = get_peft_model(
        tiny_clip_classifier(), ftn_peft.presets.clip_vision(targets="qv", num_classes=5, **cfg), adapter_name="qv"
    )
    model.add_adapter("o", ftn_peft.presets.clip_vision(targets="o", num_classes=3, **cfg))
    model.add_adapter("o5", ftn_peft.presets.clip_vision(targets="o", num_classes=5, **cfg))
    return model.eval()


def _single_adapter_outputs(model, call, names):
    """Reference: one whole-batch pass per adapter with set_adapter, and the base with adapters disabled."""
    refs = {}
    with torch.no_grad():
        for name in dict.fromkeys(names):
            if name == BASE_ADAPTER:
                with model.disable_adapter():
                    refs[name] = _logits(call())
            else:
                model.set_adapter(name)
                refs[name] = _logits(call())
    return refs


def test_task_batchnorm_statistics_differ(resnet_model):
    norms = [m for m in resnet_model.modules() if isinstance(m, ftn_peft.TaskNorm)]
    stats = {n: torch.cat([m.ftn_norm[n].running_mean for m in norms]) for n in RESNET_HEADS}
    assert not torch.allclose(stats["a"], stats["b"]) and not torch.allclose(stats["a"], stats["c"])


@pytest.mark.parametrize("order", [MIXED, sorted(MIXED)], ids=["interleaved", "contiguous"])
def test_resnet_mixed_batch_equals_each_adapter_alone(resnet_model, order):
    x = torch.randn(len(order), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    refs = _single_adapter_outputs(resnet_model, lambda: resnet_model(x), order)
    with torch.no_grad():
        out = resnet_model(x, adapter_names=order)
    assert isinstance(out, list) and len(out) == len(order)  # heads of sizes 10 and 7: one tensor per sample
    for i, name in enumerate(order):
        assert out[i].shape == (RESNET_HEADS.get(name, 10),)
        torch.testing.assert_close(out[i], refs[name][i], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(refs["a"], refs["c"], atol=1e-3)  # adapters really differ, so routing is tested


def test_resnet_same_head_sizes_give_one_tensor(resnet_model):
    names = ["c", "a", BASE_ADAPTER, "a"]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    refs = _single_adapter_outputs(resnet_model, lambda: resnet_model(x), names)
    with torch.no_grad():
        out = resnet_model(x, adapter_names=names)
    assert isinstance(out, torch.Tensor) and out.shape == (4, 10)
    expected = torch.stack([refs[n][i] for i, n in enumerate(names)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("as_kwarg", [True, False], ids=["pixel_values", "positional"])
def test_clip_mixed_batch_equals_each_adapter_alone(clip_model, as_kwarg):
    names = ["qv", "o", BASE_ADAPTER, "o5", "o", "qv"]
    x = torch.randn(len(names), 3, 32, 32, generator=torch.Generator().manual_seed(2))

    def call(**kw):
        return clip_model(pixel_values=x, **kw) if as_kwarg else clip_model(x, **kw)

    refs = _single_adapter_outputs(clip_model, call, names)
    with torch.no_grad():
        out = call(adapter_names=names)
    assert isinstance(out.logits, list)
    for i, name in enumerate(names):
        torch.testing.assert_close(out.logits[i], refs[name][i], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(refs["qv"], refs[BASE_ADAPTER][:, :5], atol=1e-3)


@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_forward_all_tasks_equals_set_adapter_loop_resnet(resnet_model, strategy):
    names = ["a", "b", BASE_ADAPTER, "c"]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    refs = _single_adapter_outputs(resnet_model, lambda: resnet_model(x), names)
    resnet_model.set_adapter("b")
    with torch.no_grad():
        out = forward_all_tasks(resnet_model, x, names, strategy=strategy)
    assert list(out) == names and resnet_model.active_adapter == "b"
    for name in names:
        assert out[name].shape == (3, RESNET_HEADS.get(name, 10))
        torch.testing.assert_close(out[name], refs[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_forward_all_tasks_equals_set_adapter_loop_clip(clip_model, strategy):
    names = ["qv", "o", "o5", BASE_ADAPTER]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    refs = _single_adapter_outputs(clip_model, lambda: clip_model(pixel_values=x), names)
    with torch.no_grad():
        out = forward_all_tasks(clip_model, {"pixel_values": x}, names, strategy=strategy)
    for name in names:
        assert type(out[name]).__name__ == "ImageClassifierOutput"
        torch.testing.assert_close(out[name].logits, refs[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_forward_all_tasks_refuses_labels(clip_model, strategy):
    """A loss from labels would be one number over every task's rows (batched) or need per-task labels: refused."""
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match="labels"):
        forward_all_tasks(clip_model, inputs, ["qv", "o5"], strategy=strategy)


def test_forward_all_tasks_batched_names_the_loop_for_unsplittable_outputs(resnet_model):
    class ScalarOut(torch.nn.Module):  # a model whose output has no batch dimension
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, adapter_names=None):
            return self.inner(x, adapter_names=adapter_names).sum()

    with torch.no_grad(), pytest.raises(ValueError, match="strategy='loop'"):
        forward_all_tasks(ScalarOut(resnet_model), torch.randn(2, 3, 32, 32), ["a", "c"])


@pytest.mark.parametrize(
    "names, error, match",
    [
        (["a", "zzz", "b", "a"], ValueError, "unknown adapters"),
        (["a", "b"], ValueError, "2 entries but the batch has 4"),
        ("abcd", TypeError, "list of adapter names"),
    ],
    ids=["unknown-name", "wrong-length", "string"],
)
def test_mixed_batch_rejects_bad_adapter_names(resnet_model, names, error, match):
    with pytest.raises(error, match=match), torch.no_grad():
        resnet_model(torch.randn(4, 3, 32, 32), adapter_names=names)


def test_mixed_batch_rejects_merged_model(resnet_model):
    resnet_model.set_adapter("a")
    resnet_model.merge_adapter()
    try:
        with pytest.raises(ValueError, match="merged model"), torch.no_grad():
            resnet_model(torch.randn(2, 3, 32, 32), adapter_names=["a", "b"])
    finally:
        resnet_model.unmerge_adapter()


def test_mixed_batch_rejects_train_mode(resnet_model):
    resnet_model.train()
    try:
        with pytest.raises(ValueError, match="model.eval"):
            resnet_model(torch.randn(2, 3, 32, 32), adapter_names=["a", "b"])
    finally:
        resnet_model.eval()


@pytest.mark.parametrize(
    "names, strategy, match",
    [(["a", "a"], "loop", "twice"), ([], "loop", "empty"), (["a"], "fast", "strategy")],
)
def test_forward_all_tasks_rejects_bad_arguments(resnet_model, names, strategy, match):
    with pytest.raises(ValueError, match=match):
        forward_all_tasks(resnet_model, torch.randn(2, 3, 32, 32), names, strategy=strategy)
