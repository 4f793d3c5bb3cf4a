"""Tests of ftn_peft.analysis: norms, heatmaps, pruning, the group penalty and conversion of a fine-tuned model.

A tiny random timm ResNet (the digits demo architecture) stands in for a real backbone.
"""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

import ftn_peft
from ftn_peft import analysis
from ftn_peft import functional as FF
from ftn_peft.demo.digits import build_source_model


def _base(seed=0):
    torch.manual_seed(seed)
    return build_source_model(num_classes=5, channels=(4, 8, 8, 8)).eval()


def _model(r=3, alpha=None, seed=0):
    model = get_peft_model(_base(seed), ftn_peft.presets.resnet(r=r, alpha=alpha, init_weights="gaussian", init_std=0.3))
    model.eval()
    with torch.no_grad():  # give the adapter's BN and head values of their own, so that copying them is tested
        for m in model.modules():
            if isinstance(m, ftn_peft.TaskNorm):
                m.ftn_norm["default"].running_mean.uniform_(-0.2, 0.2)
                m.ftn_norm["default"].weight.uniform_(0.5, 1.5)
            if isinstance(m, ftn_peft.TaskHead):
                m.ftn_head["default"].weight.normal_()
    return model


def _x():
    return torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def _out(model, adapter):
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(_x())


@pytest.mark.parametrize("alpha", [None, 6.0])
def test_layer_norms_are_norms_of_delta_and_of_each_component(alpha):
    model = _model(r=3, alpha=alpha)
    norms = analysis.layer_norms(model, "default")
    layer = model.base_model.model.layer2[0].conv1
    entry = norms["layer2.0.conv1"]
    torch.testing.assert_close(entry.delta_norm, float(layer.get_delta_weight("default").detach().norm()))
    a, b, c = layer.factors("default")
    for i in range(3):
        comp = FF.delta_weight("conv", [a[i : i + 1], b[i : i + 1], c[i : i + 1]], layer.base_layer.weight.shape)
        torch.testing.assert_close(entry.component_norms[i], float(comp.detach().norm()) * (1.0 if alpha is None else alpha / 3))
    assert entry.params_per_component == sum(f.shape[1] for f in layer.factors("default"))
    assert len(norms) == sum(isinstance(m, ftn_peft.FTNLayer) for m in model.modules())


@pytest.mark.parametrize("alpha", [None, 6.0])
def test_pruning_to_full_rank_changes_nothing(alpha):
    model = _model(r=3, alpha=alpha)
    keep = analysis.prune_adapter(model, "default", "full", threshold=0.0)
    assert all(k == [0, 1, 2] for k in keep.values())
    torch.testing.assert_close(_out(model, "full"), _out(model, "default"), rtol=1e-5, atol=1e-5)


def test_pruning_removes_exactly_the_intended_components():
    model = _model(r=4, alpha=8.0)
    layers = analysis._ftn_layers(model, "default")
    names = list(layers)
    keep = {names[0]: [1, 3], names[1]: [2], names[2]: []}  # the other layers are not listed: dropped
    analysis.prune_adapter(model, "default", "small", keep=keep)
    for name, layer in layers.items():
        kept = keep.get(name, [])
        if not kept:
            assert "small" not in layer.r
            continue
        assert layer.r["small"] == len(kept)
        rows = [f[kept] for f in layer.factors("default")]
        expected = FF.delta_weight("conv", rows, layer.base_layer.weight.shape, 8.0 / 4)  # alpha / r of the source
        torch.testing.assert_close(layer.get_delta_weight("small"), expected)
    reports = ftn_peft.parameter_report(model)
    norms = analysis.layer_norms(model, "default")
    assert reports["small"].factor_params == 2 * norms[names[0]].params_per_component + norms[names[1]].params_per_component
    assert reports["small"].head_params == reports["default"].head_params


def test_threshold_drops_weak_layers_and_budget_keeps_strongest_components():
    model = _model(r=3)
    norms = analysis.layer_norms(model, "default")
    cut = sorted(v.delta_norm for v in norms.values())[len(norms) // 2]
    plan = analysis.plan_pruning(norms, threshold=cut)
    assert {n for n, k in plan.items() if k} == {n for n, v in norms.items() if v.delta_norm >= cut}
    budget = sum(v.params_per_component for v in norms.values())  # room for about a third of all components
    plan = analysis.plan_pruning(norms, budget=budget)
    assert analysis.factor_parameters(plan, norms) <= budget
    components = [(c, n, i) for n, v in norms.items() for i, c in enumerate(v.component_norms)]
    kept = [(c, n) for c, n, i in components if i in plan[n]]
    dropped = [(c, n) for c, n, i in components if i not in plan[n]]
    assert kept and dropped
    # Greedy by norm: a component is dropped only if it did not fit beside the stronger ones kept before it.
    for c, n in dropped:
        stronger = sum(norms[m].params_per_component for ck, m in kept if ck > c)
        assert stronger + norms[n].params_per_component > budget, (c, n)
    # With equal costs, that means every kept component is at least as strong as every dropped one.
    one = {n: analysis.LayerNorms(n, "conv", 1.0, v.component_norms, 10) for n, v in norms.items()}
    plan = analysis.plan_pruning(one, budget=10 * 5)
    kept = [c for n, v in one.items() for i, c in enumerate(v.component_norms) if i in plan[n]]
    dropped = [c for n, v in one.items() for i, c in enumerate(v.component_norms) if i not in plan[n]]
    assert len(kept) == 5 and min(kept) >= max(dropped)
    with pytest.raises(ValueError, match="exactly one"):
        analysis.plan_pruning(norms)
    with pytest.raises(ValueError, match="keeps no layer"):
        analysis.prune_adapter(model, "default", "none", threshold=1e9)


def test_pruned_adapter_saves_loads_and_merges(tmp_path):
    model = _model(r=3, alpha=6.0)
    norms = analysis.layer_norms(model, "default")
    analysis.prune_adapter(model, "default", "pruned", budget=sum(v.params_per_component for v in norms.values()))
    expected = _out(model, "pruned")
    model.save_pretrained(tmp_path, selected_adapters=["pruned"])
    loaded = PeftModel.from_pretrained(_base(), tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), expected)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(_x()), expected, rtol=1e-5, atol=1e-5)


def test_group_sparsity_penalty_matches_definition_and_shrinks_components():
    model = _model(r=3, alpha=6.0)
    manual = sum(sum(v.component_norms) for v in analysis.layer_norms(model, "default").values())
    torch.testing.assert_close(float(analysis.group_sparsity_penalty(model, "default", 0.5)), 0.5 * manual)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        analysis.group_sparsity_penalty(model, "default", 1.0).backward()
        opt.step()
    after = sum(sum(v.component_norms) for v in analysis.layer_norms(model, "default").values())
    assert after < 0.8 * manual
    # The exact no-op init has c = 0: the penalty's gradient must still be finite there.
    zero = get_peft_model(_base(), ftn_peft.presets.resnet(r=2, init_weights=True))
    analysis.group_sparsity_penalty(zero, "default", 1.0).backward()
    assert all(torch.isfinite(p.grad).all() for p in zero.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "kind,shape,heads",
    [("conv", (8, 4, 3, 3), None), ("conv_transpose", (6, 4, 3, 2), None), ("conv_transpose", (5, 3, 4), None),
     ("qkv", (12, 10), 3), ("out", (10, 12), 4), ("matrix", (6, 5), None)],
)
def test_cp_tensor_layout_inverts_delta_weight(kind, shape, heads):
    dims = FF.factor_dims(kind, shape, heads)
    factors = [torch.randn(2, d, dtype=torch.float64) for d in dims]
    delta = FF.delta_weight(kind, factors, shape)
    tensor = analysis.cp_tensor_from_delta(kind, delta, heads)
    expected = factors[0].t() @ factors[1] if kind == "matrix" else torch.einsum("ri,rj,rk->ijk", *factors)
    torch.testing.assert_close(tensor, expected)


def test_converting_an_exact_rank_r_finetune_recovers_it():
    model = _model(r=1)
    finetuned = copy.deepcopy(_base())
    torch.manual_seed(3)
    with torch.no_grad():
        for name, m in finetuned.named_modules():
            if isinstance(m, torch.nn.Conv2d) and name.startswith("layer"):
                factors = [torch.randn(2, d) * 0.3 for d in FF.factor_dims("conv", m.weight.shape)]
                m.weight += FF.delta_weight("conv", factors, m.weight.shape)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
        finetuned.fc.weight.normal_()
    config = ftn_peft.presets.resnet(r=2, alpha=5.0)
    errors = analysis.convert_finetuned(model, finetuned, "converted", config)
    assert max(errors.values()) < 1e-4, errors
    with torch.no_grad():
        torch.testing.assert_close(_out(model, "converted"), finetuned(_x()), rtol=1e-4, atol=1e-4)


def test_converting_a_finetuned_generator_recovers_its_transposed_conv_updates():
    """A DCGAN-style decoder: ConvTranspose2d ΔW laid out as k² × Cin × Cout/g, groups included."""
    def generator():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.ConvTranspose2d(4, 6, 4), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
            torch.nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1, groups=2), torch.nn.BatchNorm2d(4),
        ).eval()

    finetuned = generator()
    torch.manual_seed(3)
    with torch.no_grad():
        for m in finetuned.modules():
            if isinstance(m, torch.nn.ConvTranspose2d):  # an exact rank-2 update in the transposed layout
                factors = [torch.randn(2, d) * 0.3 for d in FF.factor_dims("conv_transpose", m.weight.shape)]
                m.weight += FF.delta_weight("conv_transpose", factors, m.weight.shape)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    config = ftn_peft.FTNConfig(r=2, alpha=3.0, target_modules=["0", "3"])
    model = get_peft_model(generator(), config, adapter_name="other")
    errors = analysis.convert_finetuned(model, finetuned, "converted", config)
    assert sorted(errors) == ["0", "3"] and max(errors.values()) < 1e-4, errors
    z = torch.randn(3, 4, 1, 1, generator=torch.Generator().manual_seed(1))
    model.set_adapter("converted")
    with torch.no_grad():
        torch.testing.assert_close(model(z), finetuned(z), rtol=1e-4, atol=1e-4)


def test_heatmap_is_written_as_a_png(tmp_path):
    columns = {"a": {"l1": 1.0, "l2": 3.0, "l3": 2.0}, "b": {"l1": 5.0, "l3": 5.5}}
    rows, mat = analysis.normalize_columns(columns)
    assert rows == ["l1", "l2", "l3"]
    torch.testing.assert_close(mat[:, 0], torch.tensor([0.0, 1.0, 0.5]))
    assert mat[1, 1].isnan() and mat[2, 1] == 1.0
    path = tmp_path / "heat.png"
    analysis.plot_norm_heatmap(columns, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(path).ndim == 3
