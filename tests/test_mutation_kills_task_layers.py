"""Task BatchNorm and task heads (ftn_peft/task_layers.py): behaviours that mutation testing (docs/mutation.md)
found no other test in its selection pinned down.

A dense decoder head may take batched inputs beside ``x`` (skip features); in a mixed batch each adapter must get its
own samples' rows of every one of them, and nothing else. Half-precision models with fp32 adapters (PEFT's
``autocast_adapter_dtype``) cast around the adapter's module, also for heads with several inputs and for norms
without affine parameters. References are the adapter's own module run on each sample, or plain torch ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from timm.layers import BatchNormAct2d
from torch import nn

from ftn_peft import FTNConfig
from ftn_peft.task_layers import TaskHead, TaskNorm

B, C, H, W = 3, 4, 2, 5  # the batch (3) differs from every other dimension, so a wrong cut cannot pass


class SkipDecoder(nn.Module):
    """A decoder head with skip features: a list of maps, a per-sample gain (1-d), a per-channel scale (its first
    dimension is the channels, not the batch) and a dict of extras holding a per-sample map and a 0-d tensor."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(C, C, 1)
        self.out = nn.Conv2d(C, 3, 1)

    def forward(self, x, skips, gain=None, scale=None, extras=None):
        y = self.mix(x)
        for s in skips:
            y = y + s
        if gain is not None:
            y = y * gain[:, None, None, None]
        if scale is not None:
            y = y * scale
        if extras is not None:
            y = y + extras["bias"] * extras["temperature"]
        return self.out(y)


def _decoder_head(dtype=torch.float32):
    """A task head over a SkipDecoder with adapters "a" and "b", both trained away from the base and each other."""
    torch.manual_seed(0)
    head = TaskHead(SkipDecoder().to(dtype), "a")
    head.update_layer("b")
    with torch.no_grad():
        for name in ("a", "b"):
            for p in head.ftn_head[name].parameters():
                p.normal_()
    return head


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x, s1, s2, bias = (torch.randn(B, C, H, W, generator=g).to(dtype) for _ in range(4))
    gain = torch.rand(B, generator=g).to(dtype) + 0.5
    scale = torch.rand(C, 1, 1, generator=g).to(dtype) + 0.5
    return x, [s1, s2], gain, scale, {"bias": bias, "temperature": torch.tensor(0.7, dtype=dtype)}


def _sample(i, skips, gain, bias):
    """Sample i's rows of the batched inputs."""
    return [s[i : i + 1] for s in skips], gain[i : i + 1], bias[i : i + 1]


def test_mixed_batch_gives_each_adapter_its_rows_of_every_decoder_input():
    head = _decoder_head()
    x, skips, gain, scale, extras = _inputs()
    names = ["b", "a", "__base__"]
    with torch.no_grad():
        out = head(x, skips, gain, scale=scale, extras=extras, adapter_names=names)
        modules = {"a": head.ftn_head["a"], "b": head.ftn_head["b"], "__base__": head.base_layer}
        for i, name in enumerate(names):
            s, g, b = _sample(i, skips, gain, extras["bias"])
            expected = modules[name](x[i : i + 1], s, g, scale=scale, extras={"bias": b, "temperature": extras["temperature"]})
            torch.testing.assert_close(out[i : i + 1], expected)


def test_a_mixed_decoder_batch_indexes_on_the_input_device():
    # The row numbers of a mixed batch must live on the input's device: on a GPU, CPU row numbers would fail the
    # scatter back. The meta device shows it on a machine without one (torch refuses mixing it with CPU indices).
    head = _decoder_head().to("meta")
    x, skips, gain, scale, extras = _inputs()
    x, gain, scale = (t.to("meta") for t in (x, gain, scale))
    skips, extras = [s.to("meta") for s in skips], {k: v.to("meta") for k, v in extras.items()}
    out = head(x, skips, gain, scale=scale, extras=extras, adapter_names=["a", "b", "a"])  # not contiguous: a scatter
    assert out.device.type == "meta" and out.shape == (B, 3, H, W)


@pytest.mark.parametrize("by", ["position", "keyword"])
def test_mixed_batch_passes_a_decoder_input_given_only_by_position_or_only_by_keyword(by):
    head = _decoder_head()
    x, skips, *_ = _inputs()
    names = ["a", "b", "a"]
    with torch.no_grad():
        out = head(x, skips, adapter_names=names) if by == "position" else head(x, skips=skips, adapter_names=names)
        for i, name in enumerate(names):
            torch.testing.assert_close(out[i : i + 1], head.ftn_head[name](x[i : i + 1], [s[i : i + 1] for s in skips]))


def test_a_decoder_gets_all_its_inputs_with_adapters_on_and_off():
    head = _decoder_head()
    x, skips, gain, scale, extras = _inputs()
    with torch.no_grad():
        on = head(x, skips, gain, scale=scale, extras=extras)
        torch.testing.assert_close(on, head.ftn_head["a"](x, skips, gain, scale=scale, extras=extras))
        head.enable_adapters(False)
        off = head(x, skips, gain, scale=scale, extras=extras)
        torch.testing.assert_close(off, head.base_layer(x, skips, gain, scale=scale, extras=extras))


def test_an_fp32_decoder_head_in_a_bf16_model_gets_all_its_inputs():
    head = _decoder_head(torch.bfloat16)
    head.ftn_head["a"].float()  # what PEFT's autocast_adapter_dtype does to a half-precision model's adapter
    x, skips, gain, scale, extras = _inputs(torch.bfloat16)
    module = head.ftn_head["a"]
    with torch.no_grad():
        # Outside autocast the adapter computes in fp32 (the other inputs mix in by type promotion) and hands back
        # bf16.
        out = head(x, skips, gain, scale=scale, extras=extras)
        assert out.dtype == torch.bfloat16
        expected = module(x.float(), skips, gain, scale=scale, extras=extras)
        torch.testing.assert_close(out, expected.bfloat16())
        # Under autocast the ops choose their dtype: the input goes in as it comes.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(x, skips, gain, scale=scale, extras=extras)
            expected = module(x, skips, gain, scale=scale, extras=extras)
        torch.testing.assert_close(out, expected)


def test_a_task_bn_under_autocast_runs_its_own_copy():
    torch.manual_seed(0)
    norm = TaskNorm(nn.BatchNorm2d(C), "a")
    with torch.no_grad():
        norm.ftn_norm["a"].running_mean.normal_()
    norm.eval()
    x = torch.randn(B, C, H, W).bfloat16()  # a bf16 activation of an fp32 model under autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    torch.testing.assert_close(out, norm.ftn_norm["a"](x))
    assert not torch.allclose(out.float(), norm.base_layer(x).float(), atol=1e-2)


def test_a_head_taking_token_ids_gets_them_uncast():
    torch.manual_seed(0)
    head = TaskHead(nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 4)), "a", num_outputs=5)
    ids = torch.tensor([[1, 2], [3, 9]])
    with torch.no_grad():
        torch.testing.assert_close(head(ids), head.ftn_head["a"](ids))


def test_task_bn_in_eval_uses_its_own_eps():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(C, eps=0.5)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.01, 0.1)  # eps = 0.5 dominates the variance
        bn.weight.normal_()
        bn.bias.normal_()
    norm = TaskNorm(bn, "a").eval()
    x = torch.randn(B, C, H, W)
    expected = (x - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + 0.5).sqrt()
    expected = expected * bn.weight[:, None, None] + bn.bias[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("make", [lambda: nn.LayerNorm(C, elementwise_affine=False),
                                  lambda: nn.BatchNorm1d(C, affine=False, track_running_stats=False)])
def test_a_norm_without_parameters_or_statistics_runs_as_a_task_norm(make):
    norm = TaskNorm(make(), "a").eval()
    x = torch.randn(B, C)
    expected = F.layer_norm(x, (C,)) if isinstance(norm.base_layer, nn.LayerNorm) else F.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, BatchNormAct2d])  # timm's BatchNormAct2d holds child modules
def test_bf16_model_with_non_affine_task_bn_runs_and_unloads_in_bf16(bn):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, C, 3), bn(C, affine=False)).to(torch.bfloat16)
    with torch.no_grad():
        net[1].running_mean.normal_()
    model = get_peft_model(net, FTNConfig(r=1, target_modules=["0"], init_weights="gaussian")).eval()
    task_bn = model.base_model.model[1].ftn_norm["default"]
    assert task_bn.running_mean.dtype == torch.float32  # PEFT's autocast_adapter_dtype: the adapter is fp32
    x = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x)
        assert out.dtype == torch.bfloat16
        merged = model.merge_and_unload()
        assert merged[1].running_mean.dtype == torch.bfloat16  # like a merged LoRA delta: the model's dtype
        torch.testing.assert_close(merged(x), out, rtol=2e-2, atol=2e-2)


def test_mixed_batch_of_task_bn_in_eval_runs_as_one_op_without_the_modules():
    torch.manual_seed(0)
    norm = TaskNorm(nn.BatchNorm2d(C), "a")
    norm.update_layer("b")
    with torch.no_grad():
        for name in ("a", "b"):
            norm.ftn_norm[name].running_mean.normal_()
    norm.eval()
    x, names = torch.randn(B, C, H, W), ["b", "a", "b"]
    with torch.no_grad():
        expected = torch.cat([norm.ftn_norm[n](x[i : i + 1]) for i, n in enumerate(names)])
        for name in ("a", "b"):
            norm.ftn_norm[name].forward = None  # the grouped op must not call the modules
        torch.testing.assert_close(norm(x, adapter_names=names), expected)


def test_a_layer_serving_no_adapter_is_its_base_layer_errors_included():
    head = TaskHead(nn.Linear(6, 3).to(torch.bfloat16), "a")
    head.ftn_head["a"].float()
    head.set_adapter("other")  # an adapter without a head here: the base head serves
    x = torch.randn(2, 6)  # fp32 into a bf16 model: no cast hides the mismatch
    with pytest.raises(RuntimeError) as base_error:
        head.base_layer(x)
    with pytest.raises(RuntimeError) as error:
        head(x)
    assert str(error.value) == str(base_error.value)


def test_a_layer_merge_checks_values_only_when_asked_like_lora():
    head = TaskHead(nn.Linear(6, 3), "a")
    with torch.no_grad():
        head.ftn_head["a"].weight[0, 0] = float("nan")
    head.merge()  # LoRA's layers default to safe_merge=False too
    assert head.merged_adapters == ["a"]
    head.unmerge()
    with pytest.raises(ValueError, match="adapter a seems to be broken"):
        head.merge(safe_merge=True)


def test_task_norms_report_their_width_like_peft_layers():
    for base, n in [(nn.LayerNorm((C, 6)), C * 6), (nn.GroupNorm(2, C), C), (nn.BatchNorm1d(C), C)]:
        norm = TaskNorm(base, "a")
        assert (norm.in_features, norm.out_features) == (n, n)


def test_task_layers_built_directly_train_their_active_adapter():
    head = TaskHead(nn.Linear(6, 3), "a", num_outputs=4)
    head.update_layer("b", num_outputs=5)
    assert all(p.requires_grad for p in head.ftn_head["a"].parameters())  # "a" is the active adapter
    assert not any(p.requires_grad for p in head.ftn_head["b"].parameters())  # inactive, as in PEFT's layers
    assert head.num_outputs == {"a": 4, "b": 5}
    norm = TaskNorm(nn.BatchNorm2d(C).requires_grad_(False), "a")  # a frozen base model's BatchNorm
    assert all(p.requires_grad for p in norm.ftn_norm["a"].parameters())


class NestedDecoder(nn.Module):
    """A decoder whose output conv sits two levels down (``stage.block.out``), with non-default geometry."""

    def __init__(self, out_conv):
        super().__init__()
        self.stem = nn.Conv2d(C, C, 1)
        self.stage = nn.Module()
        self.stage.block = nn.Module()
        self.stage.block.out = out_conv

    def forward(self, x):
        return self.stage.block.out(self.stem(x))


def _geometry(conv):
    return (conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.padding_mode,
            conv.groups, conv.bias is None, conv.weight.dtype)


@pytest.mark.parametrize("bias", [True, False])
def test_a_resized_conv_output_layer_keeps_its_geometry_in_place(bias):
    torch.manual_seed(0)
    out = nn.Conv2d(C, 3, 3, stride=2, padding=2, dilation=2, padding_mode="reflect", bias=bias)
    base = NestedDecoder(out).to(torch.bfloat16)
    head = TaskHead(base, "a", num_outputs=5)
    new = head.ftn_head["a"]
    fresh = new.stage.block.out
    assert fresh is not base.stage.block.out and fresh.out_channels == 5
    assert _geometry(fresh) == _geometry(base.stage.block.out)
    assert (head.in_features, head.out_features, head.num_outputs["a"]) == (C, 3, 5)
    x = torch.randn(2, C, 7, 9, dtype=torch.bfloat16)
    with torch.no_grad():
        y = head(x)
        base_y = base(x)
    assert y.shape == (2, 5, *base_y.shape[2:])  # same spatial geometry, 5 channels
    # Only the output layer is fresh: the rest of the decoder starts from the base weights.
    torch.testing.assert_close(new.stem.weight, base.stem.weight)


@pytest.mark.parametrize("bias", [True, False])
def test_a_resized_linear_head_keeps_its_bias_dtype_and_device(bias):
    base = nn.Linear(6, 3, bias=bias).to(torch.bfloat16)
    fresh = TaskHead(base, "a", num_outputs=5).ftn_head["a"]
    assert (fresh.out_features, fresh.bias is None, fresh.weight.dtype) == (5, not bias, torch.bfloat16)
    meta = TaskHead(nn.Linear(6, 3, device="meta"), "a", num_outputs=5).ftn_head["a"]  # a model built empty
    assert meta.weight.device.type == "meta"
    meta = TaskHead(NestedDecoder(nn.Conv2d(C, 3, 1)).to("meta"), "a", num_outputs=5).ftn_head["a"]
    assert meta.stage.block.out.weight.device.type == "meta"


def test_a_grouped_output_conv_cannot_be_resized_and_the_error_names_it():
    grouped = lambda: nn.Conv2d(C, 2, 1, groups=2)  # noqa: E731
    with pytest.raises(ValueError, match=r"^the output layer 'stage.block.out' of the head is a grouped conv \(groups=2\); "
                       r"a head of another size needs an ungrouped output conv$"):
        TaskHead(NestedDecoder(grouped()), "a", num_outputs=5)
    with pytest.raises(ValueError, match=r"^the output layer 'Conv2d' of the head is a grouped conv \(groups=2\)"):
        TaskHead(grouped(), "a", num_outputs=5)
    TaskHead(NestedDecoder(grouped()), "a", num_outputs=2)  # the same size keeps the grouped conv


@pytest.mark.parametrize("make", [lambda: TaskNorm(nn.BatchNorm2d(3), "a"), lambda: TaskHead(nn.Linear(4, 2), "a")])
def test_a_task_layers_disable_adapters_is_a_bool_as_in_lora(make):
    """`disable_adapters` is public PEFT state (LoRA's layers start at ``False``): code compares it with ``is``."""
    layer = make()
    assert layer.disable_adapters is False
    layer.enable_adapters(False)
    assert layer.disable_adapters is True
