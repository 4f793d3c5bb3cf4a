"""Half-precision base models (bf16, fp16) with PEFT's `autocast_adapter_dtype` semantics.

`get_peft_model(..., autocast_adapter_dtype=True)` (PEFT's default) keeps every trainable FTN weight (factors, task
BatchNorm copies with their statistics, task heads) in fp32; `False` keeps them in the base model's dtype. Either
way the model runs, trains, merges, unloads and reloads, and its outputs stay close to an fp32 reference computed
from dense merged weights.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

import ftn_peft
from ftn_peft.task_layers import TaskHead, TaskNorm

from conftest import tiny_clip_classifier, tiny_timm_resnet

HALF = [torch.bfloat16, torch.float16]
# benchmarks/gpu_check.sh runs this file with FTN_TEST_DEVICE=cuda: the same checks on the CUDA kernels.
DEVICE = os.environ.get("FTN_TEST_DEVICE", "cpu")
if DEVICE.startswith("cuda"):
    # The fp32 reference must be fp32: cuDNN's default TF32 convolutions differ from it by ~3e-4 (seen on an H200).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
# Relative error of a half-precision forward against the fp32 one: bf16 keeps 8 mantissa bits, fp16 11.
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _resnet(dtype=torch.float32):
    return tiny_timm_resnet(num_classes=10).to(DEVICE, dtype), ftn_peft.presets.resnet(r=2)


def _clip(dtype=torch.float32):
    model = tiny_clip_classifier(num_labels=10)
    if dtype != torch.float32:
        # transformers' own way of building a half-precision model (as from_pretrained(..., dtype=...) does).
        from transformers import CLIPForImageClassification

        torch.manual_seed(0)
        model = CLIPForImageClassification._from_config(model.config, dtype=dtype).eval()
        model.load_state_dict(tiny_clip_classifier(num_labels=10).state_dict())
    config = ftn_peft.presets.clip_vision(r=2, targets="qv", head_module="classifier")
    return model.to(DEVICE), config


BUILDERS = {"resnet": _resnet, "clip": _clip}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _inputs(dtype):
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)


def _adapter_tensors(model):
    """Every parameter and buffer that belongs to an FTN adapter (factors, task BN copies, task heads)."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return {n: t for n, t in tensors.items() if ftn_peft.PREFIX in n}


def _randomize(model, seed=1):
    """Non-zero factors and heads, random task BN statistics: every adapter part changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in _adapter_tensors(model).items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if "running_var" in name:
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif "ftn_norm" in name and name.endswith("weight"):
                t.copy_(1 + 0.2 * noise)
            else:
                t.copy_(0.2 * noise)


def _fp32_reference(kind):
    """An fp32 FTN model with random adapter weights, and its output computed from dense merged weights."""
    base, config = BUILDERS[kind]()
    model = get_peft_model(base, config).eval()
    _randomize(model)
    state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    x = _inputs(torch.float32)
    with torch.no_grad():
        adapted = _logits(model(x))
        base_out = _base_output(kind, x)
        dense = _logits(copy.deepcopy(model).merge_and_unload()(x))
    return state, adapted, dense, base_out


def _base_output(kind, x):
    base, _ = BUILDERS[kind]()
    with torch.no_grad():
        return _logits(base.eval()(x))


def _half_model(kind, dtype, autocast, state):
    base, config = BUILDERS[kind](dtype)
    model = get_peft_model(base, config, autocast_adapter_dtype=autocast).eval()
    set_peft_model_state_dict(model, state)
    return model


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("dtype", HALF)
def test_parameter_dtypes(kind, dtype, tmp_path):
    """autocast_adapter_dtype=True: all adapter weights fp32; False: the base dtype. Base weights keep theirs;
    add_adapter, PeftModel.from_pretrained and load_adapter follow the same rule."""
    for autocast in (True, False):
        _check_parameter_dtypes(kind, dtype, autocast, tmp_path / str(autocast))


def _check_parameter_dtypes(kind, dtype, autocast, tmp_path):
    expected = torch.float32 if autocast else dtype
    base, config = BUILDERS[kind](dtype)
    model = get_peft_model(base, config, autocast_adapter_dtype=autocast)
    model.add_adapter("other", copy.deepcopy(config), autocast_adapter_dtype=autocast)

    def check(m, names):
        adapter = _adapter_tensors(m)
        assert any("ftn_norm" in n or "ftn_head" in n for n in adapter) and any("ftn_a" in n for n in adapter)
        for name in names:
            assert any(f".{name}." in n or n.endswith(f".{name}") for n in adapter), name
        wrong = {n: t.dtype for n, t in adapter.items() if t.is_floating_point() and t.dtype != expected}
        assert not wrong, f"expected {expected}: {list(wrong.items())[:4]}"
        base_wrong = [n for n, p in m.named_parameters() if ftn_peft.PREFIX not in n and p.dtype != dtype]
        assert not base_wrong, base_wrong[:4]

    check(model, ["default", "other"])
    model.save_pretrained(tmp_path)
    fresh, _ = BUILDERS[kind](dtype)
    loaded = PeftModel.from_pretrained(fresh, tmp_path, autocast_adapter_dtype=autocast)
    loaded.load_adapter(tmp_path / "other", adapter_name="other", autocast_adapter_dtype=autocast)
    check(loaded, ["default", "other"])


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("dtype", HALF)
def test_forward_merge_unload_close_to_fp32_reference(kind, dtype):
    """Forward, merged forward, unmerge and merge_and_unload of a half-precision model, with adapter weights in
    fp32 or in the base dtype, all stay close to the fp32 output of the same adapter computed from dense merged
    weights; the adapter itself moves the output far more than the tolerance."""
    state, adapted32, dense32, base32 = _fp32_reference(kind)
    assert _rel(adapted32, dense32) < 1e-4  # the reference: two fp32 computations agree
    assert _rel(base32, dense32) > 10 * TOL[dtype]  # the adapter's effect is far above the tolerance
    for autocast in (True, False):
        _check_half_forward(kind, dtype, autocast, state, dense32, base32)


def _check_half_forward(kind, dtype, autocast, state, dense32, base32):
    model = _half_model(kind, dtype, autocast, state)
    x = _inputs(dtype)
    base_weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    with torch.no_grad():
        out = _logits(model(x))
        assert out.dtype == dtype
        assert _rel(out, dense32) < TOL[dtype]
        model.merge_adapter(safe_merge=True)
        assert _rel(_logits(model(x)), dense32) < TOL[dtype]
        model.unmerge_adapter()
        for n, p in model.named_parameters():
            if n in base_weights:  # W + ΔW − ΔW in half precision: back within a few roundings of W
                assert _rel(p, base_weights[n]) < 2 * TOL[dtype], n
        assert _rel(_logits(model(x)), dense32) < TOL[dtype]
        with model.disable_adapter():
            assert _rel(_logits(model(x)), base32) < TOL[dtype]
        unloaded = model.merge_and_unload()
        assert all(t.dtype == dtype for t in (*unloaded.parameters(), *unloaded.buffers()) if t.is_floating_point())
        assert not any(isinstance(m, (TaskNorm, TaskHead)) for m in unloaded.modules())
        assert _rel(_logits(unloaded(x)), dense32) < TOL[dtype]


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("autocast", [True, False])
def test_train_step(kind, dtype, autocast):
    """One optimizer step in train mode: finite gradients in the adapter's own dtype, every adapter part moves,
    the half-precision base weights do not."""
    base, config = BUILDERS[kind](dtype)
    model = get_peft_model(base, config, autocast_adapter_dtype=autocast).train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(ftn_peft.PREFIX in n for n in trainable)
    before = {n: t.detach().clone() for n, t in (*model.named_parameters(), *model.named_buffers())}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.5)
    logits = _logits(model(_inputs(dtype)))
    loss = nn.functional.cross_entropy(logits.float(), torch.arange(4, device=DEVICE) % 10)
    loss.backward()
    expected = torch.float32 if autocast else dtype
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.dtype == expected and torch.isfinite(p.grad).all(), n
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == set(trainable) - {n for n, p in trainable.items() if not p.grad.any()}
    assert any("ftn_a" in n for n in moved) and any("ftn_head" in n for n in moved)
    if kind == "resnet":  # train mode updated the task BN statistics, in their own dtype
        stats = {n: b for n, b in model.named_buffers() if "ftn_norm" in n and "running_mean" in n}
        assert stats and all(b.dtype == expected for b in stats.values())
        assert all(not torch.equal(b, before[n]) for n, b in stats.items())


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("dtype", HALF)
def test_save_reload_same_outputs(kind, dtype, tmp_path):
    """A half-precision model's adapter (saved in fp32) reloads onto a fresh half-precision base with the same
    outputs."""
    state, *_ = _fp32_reference(kind)
    model = _half_model(kind, dtype, True, state)
    x = _inputs(dtype)
    with torch.no_grad():
        expected = _logits(model(x))
    model.save_pretrained(tmp_path)
    fresh, _ = BUILDERS[kind](dtype)
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_logits(loaded(x)), expected, rtol=0, atol=0)
