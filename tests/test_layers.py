"""Every adapted layer kind against an independent dense reference.

The reference rebuilds ΔW from the factors with tensorly's `cp_to_tensor` in the tensor layout of docs/design.md
("Factor layout": k² × Cin/g × Cout, d_model × d × n, in × out) and maps it to the torch weight layout with
explicit permutes; the adapted forward must equal the base op run with W + ΔW, on both compute paths, and merging
must add exactly ΔW.
"""

from __future__ import annotations

import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from torch import nn
from peft import get_peft_model
from transformers.pytorch_utils import Conv1D

import ftn_peft
from ftn_peft import FTNConfig
from ftn_peft.layer import FTNLayer

from conftest import tiny_bert, tiny_clip_classifier, tiny_gpt2

tl.set_backend("pytorch")


class Holder(nn.Module):
    def __init__(self, name: str, layer: nn.Module):
        super().__init__()
        self.name = name
        self.add_module(name, layer)

    def forward(self, x):
        return getattr(self, self.name)(x)


# name, module factory, input shape, attention_heads
CASES = {
    "conv2d_3x3": ("conv", lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 9, 9), None),
    "conv2d_stride_dilation": ("conv", lambda: nn.Conv2d(6, 8, (3, 5), stride=2, padding=(2, 1), dilation=(2, 1)), (2, 6, 11, 10), None),
    "conv2d_groups": ("conv", lambda: nn.Conv2d(6, 9, 3, padding=1, groups=3), (2, 6, 7, 7), None),
    "conv2d_depthwise": ("conv", lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6), (2, 6, 8, 8), None),
    "conv2d_1x1_nobias": ("conv", lambda: nn.Conv2d(6, 8, 1, bias=False), (2, 6, 5, 5), None),
    "conv2d_reflect": ("conv", lambda: nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect"), (2, 4, 6, 6), None),
    "conv1d": ("conv", lambda: nn.Conv1d(6, 8, 5, stride=2, padding=2), (2, 6, 17), None),
    "linear_matrix": ("fc", lambda: nn.Linear(12, 10), (2, 5, 12), None),
    "linear_qkv": ("q_proj", lambda: nn.Linear(12, 16), (2, 5, 12), 4),
    "linear_out": ("out_proj", lambda: nn.Linear(16, 12), (2, 5, 16), 4),
    "hf_conv1d_qkv": ("c_attn", lambda: Conv1D(16, 12), (2, 5, 12), 4),
    "hf_conv1d_out": ("c_proj", lambda: Conv1D(12, 16), (2, 5, 16), 4),
}


def reference_delta(layer: FTNLayer, config: FTNConfig, adapter: str = "default") -> torch.Tensor:
    """ΔW in the base layer's own layout, built independently of ftn_peft.functional (scale alpha / r from `config`)."""
    kind = layer.kind[adapter]
    factors = [f.detach().t() for f in layer.factors(adapter)]  # tensorly wants (dim, r)
    tensor = tl.cp_to_tensor((torch.ones(config.r), factors)) * (config.alpha / config.r)
    base = layer.get_base_layer()
    if kind == "conv":  # (k², Cin/g, Cout) -> (Cout, Cin/g, *kernel)
        delta = tensor.permute(2, 1, 0).reshape(base.weight.shape)
    elif kind == "qkv":  # (d_model, d, n) -> row h·d + j, column i
        d_model, d, n = tensor.shape
        delta = tensor.permute(2, 1, 0).reshape(n * d, d_model)
    elif kind == "out":  # (d_model, d, n) -> row i, column h·d + j
        d_model, d, n = tensor.shape
        delta = tensor.permute(0, 2, 1).reshape(d_model, n * d)
    else:  # (in, out) -> (out, in)
        delta = tensor.t()
    return delta.t() if isinstance(base, Conv1D) else delta


def dense_forward(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return base._conv_forward(x, weight, base.bias)
    if isinstance(base, Conv1D):
        return x @ weight + base.bias
    return F.linear(x, weight, base.bias)


def make(case: str, compute: str = "auto", r: int = 3):
    name, factory, shape, heads = CASES[case]
    torch.manual_seed(0)
    holder = Holder(name, factory())
    cfg = FTNConfig(
        r=r, alpha=2.0 * r, target_modules=[name], init_weights="gaussian", init_std=0.5,
        attention_heads=heads, compute=compute, task_batchnorm=False,
    )
    model = get_peft_model(holder, cfg)
    return model, getattr(model.base_model.model, name), torch.randn(*shape)


@pytest.mark.parametrize("compute", ["factorized", "materialized", "auto"])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_equals_dense_reference(case, compute, grad):
    model, layer, x = make(case, compute)
    delta = reference_delta(layer, model.peft_config["default"])
    expected = dense_forward(layer.get_base_layer(), x, layer.get_base_layer().weight + delta)
    with torch.set_grad_enabled(grad):
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_merged_weight_minus_base_is_the_cp_tensor(case):
    model, layer, x = make(case)
    base_weight = layer.get_base_layer().weight.detach().clone()
    unmerged = model(x).detach()
    model.merge_adapter()
    expected = reference_delta(layer, model.peft_config["default"])
    torch.testing.assert_close(layer.get_base_layer().weight - base_weight, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, base_weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_factor_shapes_follow_spec_table(case):
    _, layer, _ = make(case, r=2)
    base = layer.get_base_layer()
    dims = layer.factor_dims("default")
    w = base.weight.shape
    if layer.kind["default"] == "conv":
        assert dims == (w[2] * (w[3] if len(w) == 4 else 1), w[1], w[0])
    elif layer.kind["default"] == "matrix":
        assert dims == (w[1], w[0])
    else:
        assert dims[2] == 4 and dims[0] * 0 == 0 and dims[1] * dims[2] in w
    assert sum(f.numel() for f in layer.factors("default")) == 2 * sum(dims)


def test_default_init_is_an_exact_noop(images, resnet):
    expected = resnet(images)
    model = get_peft_model(resnet, FTNConfig(r=2, target_modules=r"layer\d\.0\.conv\d", init_weights=True))
    assert torch.equal(model(images), expected)
    for name in ("xavier", "gaussian"):
        model.add_adapter(name, FTNConfig(r=2, target_modules=r"layer\d\.0\.conv\d", init_weights=name))
        model.set_adapter(name)
        assert not torch.allclose(model(images), expected)


def test_init_std_sets_gaussian_spread():
    model, layer, _ = make("linear_matrix", r=64)
    torch.manual_seed(0)
    layer.reset_factors("default", "gaussian", init_std=0.05)
    std = torch.cat([f.detach().flatten() for f in layer.factors("default")]).std()
    assert 0.04 < std < 0.06


def test_auto_heads_bert_query_value_and_output():
    bert = tiny_bert()  # hidden 24, 3 heads of 8
    model = get_peft_model(bert, FTNConfig(r=2, target_modules=["query", "value", "attention.output.dense", "intermediate.dense"]))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FTNLayer)}
    kinds = {n.split("layer.0.")[-1]: (m.kind["default"], m.num_heads["default"]) for n, m in layers.items() if "layer.0." in n}
    assert kinds == {
        "attention.self.query": ("qkv", 3),
        "attention.self.value": ("qkv", 3),
        "attention.output.dense": ("out", 3),
        "intermediate.dense": ("matrix", None),  # not inside an attention module
    }


def test_auto_heads_gpt2_fused_qkv_and_mlp_conv1d():
    gpt2 = tiny_gpt2()  # n_embd 24, 4 heads of 6
    model = get_peft_model(gpt2, FTNConfig(r=2, target_modules=["c_attn", "c_proj"]))
    layers = {n.split("h.0.")[-1]: m for n, m in model.named_modules() if isinstance(m, FTNLayer) and "h.0." in n}
    assert (layers["attn.c_attn"].kind["default"], layers["attn.c_attn"].num_heads["default"]) == ("qkv", 12)
    assert (layers["attn.c_proj"].kind["default"], layers["attn.c_proj"].num_heads["default"]) == ("out", 4)
    assert layers["mlp.c_proj"].kind["default"] == "matrix"
    ids = torch.randint(0, 50, (2, 7))
    model.base_model.model.eval()
    with model.disable_adapter():
        base = model(input_ids=ids).last_hidden_state
    assert torch.equal(model(input_ids=ids).last_hidden_state, base)  # c = 0 at init


def test_auto_heads_clip_and_explicit_override():
    clip = tiny_clip_classifier()  # hidden 32, 4 heads of 8
    model = get_peft_model(clip, ftn_peft.presets.clip_vision(r=2, targets="qv"))
    q = model.base_model.model.vision_model.encoder.layers[0].self_attn.q_proj
    assert (q.kind["default"], q.factor_dims("default")) == ("qkv", (32, 8, 4))
    model.add_adapter("two_heads", ftn_peft.presets.clip_vision(r=2, targets="o", attention_heads=2))
    o = model.base_model.model.vision_model.encoder.layers[0].self_attn.out_proj
    assert (o.kind["two_heads"], o.factor_dims("two_heads")) == ("out", (32, 16, 2))
    model.add_adapter("plain", ftn_peft.presets.clip_vision(r=2, targets="o", attention_heads=None))
    assert o.kind["plain"] == "matrix"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_autocast_and_low_precision(dtype):
    model, layer, x = make("conv2d_3x3", "factorized")
    delta = reference_delta(layer, model.peft_config["default"])
    expected = dense_forward(layer.get_base_layer(), x, layer.get_base_layer().weight + delta)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(x)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


# --- arguments besides the input ------------------------------------------------------------------------------------
def _adapted_linear(base: nn.Module) -> nn.Module:
    model = get_peft_model(Holder("proj", base), FTNConfig(target_modules=["proj"], r=2, init_std=0.1))
    return model.base_model.model.proj


@pytest.mark.parametrize("adapter_names", [None, ["default", "default", "__base__"]])
@pytest.mark.parametrize(
    "extra, words",
    [(((1.0,), {}), "positional"), (((), {"foo": 1}), "'foo'"), (((), {"input": None}), "'input'")],
)
def test_an_argument_the_base_layer_refuses_is_refused_on_the_adapted_path(extra, words, adapter_names):
    """With adapters active the call is not the base layer's own, but it must not swallow what that layer refuses."""
    layer = _adapted_linear(nn.Linear(6, 5)).eval()
    x = torch.randn(3, 6)
    args, kwargs = extra
    kwargs = {k: x if v is None else v for k, v in kwargs.items()}
    with pytest.raises(TypeError, match=words):
        layer.get_base_layer()(x, *args, **kwargs)
    # The plain layer's complaint, in the words python uses for a signature check.
    with pytest.raises(TypeError, match=rf"^Linear\.forward\(\) .*{words}"):
        layer(x, *args, adapter_names=adapter_names, **kwargs)


class ScaledLinear(nn.Linear):
    def forward(self, input, scale: float = 1.0):
        return super().forward(input) * scale


def test_an_argument_the_base_layer_takes_but_ftn_cannot_pass_on_is_refused_by_name():
    layer = _adapted_linear(ScaledLinear(6, 5))
    x = torch.randn(3, 6)
    message = (
        r"^Linear \(FTN\) cannot pass \['scale'\] on to its base ScaledLinear while adapters are active; call the "
        r"layer with the input only, or disable the adapters for this call$"
    )
    with pytest.raises(TypeError, match=message):
        layer(x, scale=2.0)
    layer.enable_adapters(False)  # the base layer's own call then honours it
    torch.testing.assert_close(layer(x, scale=2.0), 2.0 * layer.get_base_layer()(x))


def test_transposed_conv_still_takes_output_size_with_adapters_active():
    model = get_peft_model(Holder("up", nn.ConvTranspose2d(4, 6, 3, stride=2)), FTNConfig(target_modules=["up"], r=2))
    layer = model.base_model.model.up
    x = torch.randn(1, 4, 5, 5)
    assert layer(x, output_size=[12, 12]).shape[-2:] == (12, 12)
    assert layer(x, [12, 12]).shape[-2:] == (12, 12)


def test_a_model_on_the_meta_device_runs_a_shape_only_forward():
    """Shape inference on an empty (meta) model runs the factorized path, which asks about autocast."""
    model = get_peft_model(
        Holder("proj", nn.Linear(6, 5, device="meta")), FTNConfig(target_modules=["proj"], r=2, compute="factorized")
    )
    out = model(torch.empty(3, 6, device="meta"))
    assert out.shape == (3, 5) and out.device.type == "meta"
