"""FTN on nn.ConvTranspose1d / nn.ConvTranspose2d (generators, decoders).

torch stores a transposed-conv weight as (Cin, Cout/g, *kernel); FTN's tensor is k² × Cin × Cout/g. The reference
here builds ΔW one rank-1 component at a time straight into that torch layout (not with `functional.delta_weight`)
and runs `F.conv_transpose*d` with W + ΔW.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from peft import PeftModel, get_peft_model

from ftn_peft import FTNConfig
from ftn_peft.layer import ConvTranspose
from ftn_peft.task_layers import TaskNorm

# name: (module factory, input shape)
CASES = {
    "2d_k3_s1": (lambda: nn.ConvTranspose2d(6, 8, 3, padding=1), (2, 6, 5, 5)),
    "2d_k4_s2_p1": (lambda: nn.ConvTranspose2d(6, 8, 4, stride=2, padding=1), (2, 6, 5, 5)),  # DCGAN's block
    "2d_outpad_rect": (lambda: nn.ConvTranspose2d(6, 8, (3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2)), (2, 6, 4, 5)),
    "2d_groups_dilation": (lambda: nn.ConvTranspose2d(6, 9, 3, stride=2, padding=2, output_padding=1, groups=3, dilation=2), (2, 6, 4, 4)),
    "2d_depthwise_nobias": (lambda: nn.ConvTranspose2d(4, 4, 3, stride=2, groups=4, bias=False), (2, 4, 4, 4)),
    "2d_k1_s2": (lambda: nn.ConvTranspose2d(6, 8, 1, stride=2, output_padding=1), (2, 6, 4, 4)),
    "1d_s3_outpad": (lambda: nn.ConvTranspose1d(4, 6, 4, stride=3, padding=2, output_padding=1, groups=2), (2, 4, 7)),
    "1d_k5": (lambda: nn.ConvTranspose1d(4, 6, 5, padding=2), (2, 4, 9)),
}


class Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.up = layer

    def forward(self, x):
        return self.up(x)


def reference_delta(layer: ConvTranspose, adapter: str = "default") -> torch.Tensor:
    """ΔW[i, o, *kernel] = scale · Σ_q b_q[i] c_q[o] a_q[kernel], in the torch weight layout (Cin, Cout/g, *k)."""
    a, b, c = (f.detach() for f in layer.factors(adapter))
    weight = layer.get_base_layer().weight
    delta = sum(b[q][:, None, None] * c[q][None, :, None] * a[q][None, None, :] for q in range(a.shape[0]))
    return layer.scaling[adapter] * delta.reshape(weight.shape)


def dense(base: nn.Module, x: torch.Tensor, weight: torch.Tensor, output_padding=None) -> torch.Tensor:
    op = F.conv_transpose2d if isinstance(base, nn.ConvTranspose2d) else F.conv_transpose1d
    pad = base.output_padding if output_padding is None else output_padding
    return op(x, weight, base.bias, base.stride, base.padding, pad, base.groups, base.dilation)


def make(case: str, compute: str = "auto", r: int = 3, **cfg):
    factory, shape = CASES[case]
    torch.manual_seed(0)
    cfg = dict(r=r, alpha=2.0 * r, target_modules=["up"], init_weights="gaussian", init_std=0.5, compute=compute) | cfg
    model = get_peft_model(Holder(factory()), FTNConfig(**cfg))
    return model, model.base_model.model.up, torch.randn(shape)


@pytest.mark.parametrize("compute", ["factorized", "materialized", "auto"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_equals_dense_reference(case, compute):
    model, layer, x = make(case, compute)
    assert isinstance(layer, ConvTranspose)
    base = layer.get_base_layer()
    expected = dense(base, x, base.weight + reference_delta(layer))
    assert (expected - base(x)).abs().max() > 1e-2  # ΔW is far from zero: the comparison can fail
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["2d_groups_dilation", "1d_s3_outpad", "2d_k1_s2"])
def test_both_paths_give_the_same_factor_gradients(case):
    _, layer, x = make(case)
    grads = {}
    for mode in ("factorized", "materialized"):
        layer.compute["default"] = mode
        for f in layer.factors("default"):
            f.grad = None
        layer(x).square().sum().backward()
        grads[mode] = [f.grad.clone() for f in layer.factors("default")]
    for g_fact, g_mat in zip(grads["factorized"], grads["materialized"]):
        torch.testing.assert_close(g_fact, g_mat, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("compute", ["factorized", "materialized"])
def test_output_size_argument_sets_the_output_padding(compute):
    model, layer, x = make("2d_k4_s2_p1", compute)  # 5x5 -> 10x10 by default; 11x11 is also reachable
    base = layer.get_base_layer()
    out = layer(x, output_size=[11, 11])
    assert out.shape[-2:] == (11, 11)
    torch.testing.assert_close(out, dense(base, x, base.weight + reference_delta(layer), (1, 1)), rtol=1e-4, atol=1e-4)
    assert layer(x).shape[-2:] == (10, 10)  # the per-call output padding does not stick


@pytest.mark.parametrize("case", list(CASES))
def test_factor_shapes_and_parameter_count(case):
    _, layer, _ = make(case, r=2)
    base = layer.get_base_layer()
    k = base.weight[0, 0].numel()
    cin, cout_g = base.in_channels, base.out_channels // base.groups
    assert base.weight.shape[:2] == (cin, cout_g)  # torch's transposed layout: the output channels are split
    assert layer.factor_dims("default") == (k, cin, cout_g)
    assert sum(f.numel() for f in layer.factors("default")) == 2 * (k + cin + cout_g)


@pytest.mark.parametrize("case", ["2d_groups_dilation", "1d_s3_outpad"])
def test_merge_unmerge_and_unload(case):
    model, layer, x = make(case)
    base_weight = layer.get_base_layer().weight.detach().clone()
    unmerged = model(x).detach()
    model.merge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight - base_weight, reference_delta(layer), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, base_weight, rtol=0, atol=1e-6)
    plain = model.merge_and_unload()
    assert type(plain.up) is type(layer.get_base_layer())
    torch.testing.assert_close(plain(x), unmerged, rtol=1e-4, atol=1e-5)


def test_default_init_is_an_exact_noop():
    model, layer, x = make("2d_k4_s2_p1", init_weights=True)
    with model.disable_adapter():
        expected = model(x)
    for compute in ("factorized", "materialized"):
        layer.compute["default"] = compute
        assert torch.equal(model(x), expected)


def test_save_load_round_trip(tmp_path):
    model, layer, x = make("2d_groups_dilation")
    expected = model(x).detach()
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = Holder(CASES["2d_groups_dilation"][0]())  # the same base weights (same seed), no adapter
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    for mine, theirs in zip(layer.factors("default"), loaded.base_model.model.up.factors("default")):
        assert torch.equal(mine, theirs)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_two_adapters_are_isolated_and_mix_in_one_batch():
    model, layer, x = make("2d_k4_s2_p1")
    model.add_adapter("other", FTNConfig(r=2, target_modules=["up"], init_weights="gaussian", init_std=0.5))
    other_before = [f.detach().clone() for f in layer.factors("other")]
    default_before = [f.detach().clone() for f in layer.factors("default")]
    model.set_adapter("default")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert all(torch.equal(f, g) for f, g in zip(layer.factors("other"), other_before))
    assert not any(torch.equal(f, g) for f, g in zip(layer.factors("default"), default_before))  # it did train
    base = layer.get_base_layer()
    names = ["other", "default", "__base__"]  # "__base__": the frozen layer
    x = x.repeat(2, 1, 1, 1)[:3]
    with torch.no_grad():
        per_adapter = {a: dense(base, x, base.weight + reference_delta(layer, a)) for a in ("default", "other")}
        per_adapter["__base__"] = base(x)
    model.eval()
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], per_adapter[name][i], rtol=1e-4, atol=1e-4)


def test_auto_path_follows_the_shapes():
    base = nn.ConvTranspose2d(16, 8, 2, stride=2)  # kernel = stride: output pixels are exactly 4x the input's
    layer = ConvTranspose(base, "default", r=1, alpha=None, compute="auto")
    big = torch.randn(16, 16, 32, 32)
    assert layer._positions(big) == base(big[:1]).numel() // 8 * 16
    with torch.no_grad():  # no gradients, many positions: build W + ΔW once
        assert not layer._use_factorized("default", big)
        assert layer._use_factorized("default", torch.randn(1, 16, 1, 1))
    assert layer._use_factorized("default", big)  # with gradients the dense weight gradient costs more


def test_task_batchnorm_in_a_generator_block():
    torch.manual_seed(0)
    block = nn.Sequential(nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU())
    base_bn = {k: v.clone() for k, v in block[1].state_dict().items()}
    cfg = dict(r=2, target_modules=["0"], init_weights="gaussian", init_std=0.5, task_batchnorm=True)
    model = get_peft_model(block, FTNConfig(**cfg))
    model.add_adapter("other", FTNConfig(**cfg))
    norm = model.base_model.model[1]
    assert isinstance(norm, TaskNorm)
    z = torch.randn(4, 8, 3, 3)
    model.set_adapter("default")
    model.train()
    model(z)  # a training step updates this adapter's running statistics only
    stats = {a: norm.ftn_norm[a].running_mean.clone() for a in ("default", "other")}
    assert not torch.equal(stats["default"], base_bn["running_mean"])
    assert torch.equal(stats["other"], base_bn["running_mean"])
    assert all(torch.equal(v, base_bn[k]) for k, v in norm.base_layer.state_dict().items())
    model.eval()
    up = model.base_model.model[0]
    bn = norm.ftn_norm["default"]
    pre = dense(up.get_base_layer(), z, up.get_base_layer().weight + reference_delta(up))
    expected = F.relu(F.batch_norm(pre, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps))
    torch.testing.assert_close(model(z), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compute", ["factorized", "materialized"])
def test_bfloat16_base_model(compute):
    model, layer, x = make("2d_groups_dilation", compute)
    base = layer.get_base_layer()
    expected = dense(base, x, base.weight + reference_delta(layer))
    model.to(torch.bfloat16)
    out = model(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=5e-2 * expected.abs().max().item())
