"""Multi-domain generation (ftn_peft/demo/generator.py, examples/train_generator.py) and what it needs from the
package: auto_config on transposed convs, LoRA on them for the comparison, PSNR, isolation of domain adapters."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

import ftn_peft
from ftn_peft.auto import find_layers
from ftn_peft.demo import generator as gen

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import train_generator as script  # noqa: E402

CONVS = ["to_rgb", "up1", "up2", "up3"]


def small_generator(seed=0):
    torch.manual_seed(seed)
    g = gen.Generator(widths=(8, 6, 4)).eval()
    with torch.no_grad():  # source statistics of their own, so that a copied BatchNorm is not the identity
        for m in g.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return g.requires_grad_(False)


def test_auto_config_finds_every_transposed_conv_of_a_generator():
    g = small_generator()
    found = find_layers(g)
    assert found.by_kind["conv_transpose"] == ["up1", "up2", "up3", "to_rgb"] and found.stem == []
    assert found.batchnorms == ["bn1", "bn2", "bn3"] and found.head is None
    for targets in ("conv_transpose", "convs", "all"):
        assert sorted(ftn_peft.auto_config(g, r=2, targets=targets).target_modules) == CONVS
    model = get_peft_model(small_generator(), ftn_peft.auto_config(g, r=2, targets="conv_transpose"))
    report = ftn_peft.parameter_report(model)["default"]
    # r·(k² + Cin + Cout/g) per layer, from the torch weights (Cin, Cout/g, kh, kw)
    expected = sum(2 * (m.weight[0, 0].numel() + m.weight.shape[0] + m.weight.shape[1])
                   for m in g.modules() if isinstance(m, nn.ConvTranspose2d))
    assert report.factor_params == expected
    assert report.norm_params == 2 * (8 + 6 + 4)


def test_convs_target_keeps_leaving_out_the_stem_and_adds_transposed_convs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.ConvTranspose2d(4, 2, 2, stride=2))
    assert sorted(ftn_peft.auto_config(model, targets="convs").target_modules) == ["1", "2"]
    assert sorted(ftn_peft.auto_config(model, targets="conv_transpose").target_modules) == ["2"]
    with pytest.raises(ValueError, match="conv_transpose"):
        ftn_peft.auto_config(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)), targets="conv_transpose")


def test_psnr_and_ssim_match_hand_computed_values():
    target = torch.full((2, 3, 16, 16), 0.5)
    pred = target.clone()
    pred[0] += 0.1  # MSE 0.01 -> 10·log10(1 / 0.01) = 20 dB
    pred[1] -= 0.01  # MSE 1e-4 -> 40 dB
    scores = gen.image_metrics(pred, target)
    assert scores["psnr"] == pytest.approx(30.0, abs=1e-3)  # the mean over images, not the PSNR of the mean MSE
    assert gen.image_metrics(target, target)["ssim"] == pytest.approx(1.0, abs=1e-5)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert gen.image_metrics(x, target)["ssim"] < 0.5
    with pytest.raises(ValueError, match="one shape"):
        gen.image_metrics(pred[:1], target)


def test_lora_on_transposed_convs_equals_the_dense_op_and_merges():
    torch.manual_seed(0)
    base = nn.Sequential(nn.ConvTranspose2d(5, 4, 3, stride=2, padding=1, output_padding=1))
    x = torch.randn(2, 5, 4, 4)
    expected_base = base(x)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights=False)
    config._register_custom_module({nn.ConvTranspose2d: gen.lora_conv_transpose_class()})
    model = get_peft_model(base, config)
    layer = model.base_model.model[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (Cin, r, 3, 3), (r, Cout, 1, 1)
    delta = sum(a[:, j, None] * b[j, None, :, :, :] for j in range(3)) * 2.0  # (Cin, Cout, 3, 3), scale 6/3
    weight = layer.get_base_layer().weight
    dense = F.conv_transpose2d(x, weight + delta, layer.get_base_layer().bias, 2, 1, 1)
    assert (dense - expected_base).abs().max() > 1e-2
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense, rtol=1e-4, atol=1e-5)
        assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == 3 * (5 * 9 + 4)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x), dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["ftn", "lora"])
def test_training_one_domain_leaves_the_other_bit_identical(method):
    args = script.parse_args(["--steps", "4"])
    g = small_generator()
    model = script.build(g, method, 2, ["dom_a", "dom_b"])
    images = gen.domain_images("colour", 4, seed=0)
    def owned(name, adapter):
        return re.search(rf"\.{adapter}(\.|$)", name) is not None

    other = {n: p.detach().clone() for n, p in model.named_parameters() if owned(n, "dom_b")}
    other.update({n: t.clone() for n, t in model.named_buffers() if owned(n, "dom_b")})
    assert len(other) > 8
    z = torch.randn(4, gen.LATENT_DIM)
    model.set_adapter("dom_b")
    before = model(z)
    before_a = {n: p.detach().clone() for n, p in model.named_parameters() if owned(n, "dom_a")}
    _, params = script.adapt(model, method, "dom_a", images, args, seed=0)
    assert params == sum(p.numel() for p in before_a.values())
    changed = [n for n, p in model.named_parameters() if n in before_a and not torch.equal(p, before_a[n])]
    assert changed, "training domain a changed nothing"
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    assert all(torch.equal(state[n], t) for n, t in other.items())
    model.set_adapter("dom_b")
    assert torch.equal(model(z), before)
    assert all(not p.requires_grad for p in g.parameters())  # the source generator is never trained


def test_generator_is_cached_and_reloaded(tmp_path):
    first = gen.load_generator(tmp_path, steps=2, batch_size=4)
    files = list(tmp_path.glob("digits_generator_*.safetensors"))
    assert len(files) == 1
    second = gen.load_generator(tmp_path, steps=2, batch_size=4)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.up1.weight, gen.Generator().up1.weight)  # it was trained (or loaded), not fresh
    with pytest.raises(ValueError, match="domain"):
        gen.domain_images("sepia", 4, 0)
    a, b = gen.domain_images("rotated", 5, 3), gen.domain_images("rotated", 5, 3, offset=5)
    assert a.shape == (5, 3, 16, 16) and not any(torch.equal(x, y) for x in a for y in b)


@pytest.mark.slow
def test_short_run_writes_the_table_and_the_grid(tmp_path):
    rows = script.main(["--domains", "colour,rotated", "--ranks", "1,2", "--lora_ranks", "1", "--seeds", "0,1",
                        "--images", "3", "--steps", "3", "--source_steps", "3", "--cache_dir", str(tmp_path / "c"),
                        "--grid_images", "2", "--output_dir", str(tmp_path / "out")])
    labels = ["latent", "ftn_r1", "ftn_r2", "lora_r1", "finetune"]
    assert len(rows) == len(labels) * 2 * 2
    text = (tmp_path / "out" / "results.md").read_text()
    for label in labels:
        for domain in ("colour", "rotated", "**mean**"):
            assert f"| {domain} | {label} |" in text
    params = {r["label"]: r["params"] for r in rows}
    bn = 2 * (32 + 16 + 8)  # weight and bias of bn1..bn3
    ftn = (16 + 32 + 32) + (16 + 32 + 16) + (16 + 16 + 8) + (9 + 8 + 3)  # k² + Cin + Cout of up1, up2, up3, to_rgb
    lora = (32 * 16 + 32) + (32 * 16 + 16) + (16 * 16 + 8) + (8 * 9 + 3)  # Cin·k² + Cout
    assert params["latent"] == 0 and params["ftn_r1"] == ftn + bn and params["ftn_r2"] == 2 * ftn + bn
    assert params["lora_r1"] == lora + bn
    assert params["finetune"] == sum(p.numel() for p in gen.Generator().parameters())
    assert " ± " in text  # two seeds: mean ± std
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "out" / "reconstructions.png")
    assert image.shape[0] > 100 and image.shape[1] > 50


class ConditionalBatchNorm(nn.Module):
    """BigGAN-style: BatchNorm without affine parameters, gain and bias predicted from a class embedding."""

    def __init__(self, channels, embed):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain, self.bias = nn.Linear(embed, channels), nn.Linear(embed, channels)

    def forward(self, x, y):
        return self.bn(x) * (1 + self.gain(y))[:, :, None, None] + self.bias(y)[:, :, None, None]


class ConditionalGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.cbn = nn.ConvTranspose2d(4, 6, 4), ConditionalBatchNorm(6, 3)

    def forward(self, z, y):
        return self.cbn(self.up(z), y)


def test_conditional_batchnorm_gets_task_statistics_and_adapted_conditioning():
    torch.manual_seed(0)
    config = dict(r=2, target_modules=["up", "cbn.gain", "cbn.bias"], init_weights="gaussian")
    model = get_peft_model(ConditionalGenerator(), ftn_peft.FTNConfig(**config), adapter_name="dom_a")
    model.add_adapter("dom_b", ftn_peft.FTNConfig(**config))
    kinds = {n: m.kind["dom_a"] for n, m in model.named_modules() if isinstance(m, ftn_peft.layer.FTNLayer)}
    assert sorted(kinds.values()) == ["conv_transpose", "matrix", "matrix"]
    norm = model.base_model.model.cbn.bn
    assert isinstance(norm, ftn_peft.TaskNorm) and ftn_peft.parameter_report(model)["dom_a"].norm_params == 0
    z, y = torch.randn(5, 4, 1, 1), torch.randn(5, 3)
    model.train()
    model.set_adapter("dom_a")
    model(z, y)  # training mode: the statistics of dom_a's copy move, the source's and dom_b's do not
    stats = {k: v.running_mean for k, v in norm.ftn_norm.items()}
    assert not torch.equal(stats["dom_a"], norm.base_layer.running_mean)
    assert torch.equal(stats["dom_b"], norm.base_layer.running_mean)
    model.eval()
    out_a = model(z, y)
    model.set_adapter("dom_b")
    assert not torch.allclose(out_a, model(z, y))
