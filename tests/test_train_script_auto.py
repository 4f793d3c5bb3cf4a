"""examples/train_multidomain.py on a backbone with no preset: targets from ftn_peft.auto_config, or the flags."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_train_script import run  # noqa: E402


@pytest.fixture
def local_vit_and_domains(tmp_path):
    """A tiny transformers ViT saved locally and one imagefolder domain of a handful of 16 px images."""
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, num_labels=4)
    ViTForImageClassification(config).save_pretrained(tmp_path / "backbone")
    rng = torch.Generator().manual_seed(0)
    for c in range(2):
        folder = tmp_path / "data" / "dark" / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(6):
            Image.fromarray((torch.rand(16, 16, 3, generator=rng) * 60 + 60 * c).byte().numpy()).save(folder / f"{i}.png")
    return tmp_path


def _projection_names(root):
    """(q, v) projection suffixes of the saved ViT: transformers 5 says attention.q_proj, 4.x attention.query."""
    from transformers import ViTForImageClassification

    names = [n for n, _ in ViTForImageClassification.from_pretrained(root / "backbone").named_modules()]
    if any(n.endswith("attention.q_proj") for n in names):
        return "attention.q_proj", "attention.v_proj"
    return "attention.query", "attention.value"


def _train(root, *extra, backbone=None):
    out = root / "out"
    run(["--backbone", backbone or str(root / "backbone"), "--dataset", str(root / "data"), "--image_size", "16",
         "--methods", "ftn", "--ranks", "1", "--seeds", "0", "--lr_grid", "1", "--epochs", "1", "--batch_size", "4",
         "--num_threads", "1", "--output_dir", str(out), *extra], root / "cache")
    adapter_dir = out / "ftn_r1" / "seed0" / "dark"
    return json.loads((adapter_dir / "adapter_config.json").read_text()), adapter_dir


@pytest.mark.slow
def test_vit_without_preset_trains_with_auto_config_targets(local_vit_and_domains):
    config, adapter_dir = _train(local_vit_and_domains)
    targets = set(config["target_modules"])
    # auto_config's "attention": query, key, value and output projections of both layers, nothing else
    # (transformers 5: q_proj, k_proj, v_proj, o_proj; 4.x: query, key, value, output.dense)
    kinds = {t.split(".")[-1] for t in targets}
    assert len(targets) == 8 and kinds in ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"query", "key", "value", "dense"})
    assert config["head_module"] == "classifier" and config["head_num_outputs"] == 2

    from peft import PeftModel
    from transformers import ViTForImageClassification

    import ftn_peft  # noqa: F401

    base = ViTForImageClassification.from_pretrained(local_vit_and_domains / "backbone")
    model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name="dark")
    assert model(torch.zeros(1, 3, 16, 16)).logits.shape == (1, 2)


def test_target_modules_and_head_flags_override_auto_config(local_vit_and_domains):
    q, v = _projection_names(local_vit_and_domains)
    config, _ = _train(local_vit_and_domains, "--target_modules", f"{q},{v}", "--head_module", "classifier")
    assert sorted(config["target_modules"]) == sorted([q, v])
    assert config["head_module"] == "classifier"


@pytest.mark.slow
def test_local_timm_vit_trains_with_auto_config_targets(local_vit_and_domains):
    """A non-ResNet timm architecture from a local folder (timm's save_for_hf, loaded as local-dir:<path>)."""
    import timm
    from timm.models import save_for_hf

    root = local_vit_and_domains
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=16, patch_size=8,
                              depth=2)
    save_for_hf(model, root / "timm_vit")
    config, adapter_dir = _train(root, backbone=f"local-dir:{root / 'timm_vit'}")
    # fused qkv and the output projection of both blocks; the classifier is timm's `head`
    assert sorted(config["target_modules"]) == ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.1.attn.proj",
                                                 "blocks.1.attn.qkv"]
    assert config["head_module"] == "head" and config["head_num_outputs"] == 2

    from peft import PeftModel

    import ftn_peft  # noqa: F401

    base = timm.create_model(f"local-dir:{root / 'timm_vit'}", pretrained=True)
    trained = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name="dark")
    assert trained(torch.zeros(1, 3, 16, 16)).shape == (1, 2)
