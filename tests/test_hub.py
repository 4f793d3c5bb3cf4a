"""push_to_hub tested at the huggingface_hub boundary: what would be uploaded must load back with PEFT."""

import shutil

import pytest
import torch
from huggingface_hub import HfApi
from peft import PeftModel, get_peft_model
from timm.models.resnet import BasicBlock, ResNet

import ftn_peft
from ftn_peft import hub


def tiny_resnet():
    torch.manual_seed(0)
    return ResNet(block=BasicBlock, layers=[1, 1, 1, 1], channels=(4, 8, 8, 8), in_chans=1, num_classes=5).eval()


def two_domain_model():
    model = get_peft_model(tiny_resnet(), ftn_peft.presets.resnet(r=1, num_classes=3), adapter_name="a")
    model.add_adapter("b", ftn_peft.presets.resnet(r=2, num_classes=7))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # non-trivial adapters, so a wrong load would show
    for name in ("a", "b"):
        model.set_adapter(name)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05)
    return model


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """Replace the network calls; copy what upload_folder receives."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = repo_id

    def upload_folder(self, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, tmp_path / "uploaded")
        return "https://hub/commit/x"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls, tmp_path / "uploaded"


def test_push_directory_of_domains_loads_back(captured, tmp_path):
    calls, uploaded = captured
    model = two_domain_model()
    model.save_pretrained(str(tmp_path / "saved"))
    url = hub.push_to_hub(str(tmp_path / "saved"), "me/ftn-domains", token="x")
    assert url == "https://hub/commit/x" and calls["repo"] == "me/ftn-domains"
    x = torch.randn(4, 1, 16, 16)
    loaded = PeftModel.from_pretrained(tiny_resnet(), str(uploaded / "b"), adapter_name="b")
    loaded.load_adapter(str(uploaded / "a"), adapter_name="a")
    for name in ("a", "b"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    card = (uploaded / "README.md").read_text()
    reports = ftn_peft.parameter_report(model)
    for name in ("a", "b"):
        assert f"| {name} | {model.peft_config[name].r} |" in card
        assert f"{reports[name].factor_params:,}" in card and f"{reports[name].head_params:,}" in card
    assert "Factorized Tensor Network" in card and "ftn" in card


def test_push_peft_model_directly(captured):
    _, uploaded = captured
    model = two_domain_model()
    hub.push_to_hub(model, "me/one", token="x")
    assert set(hub.adapter_dirs(uploaded)) == {"a", "b"}


def test_push_rejects_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="source="):
        hub.push_to_hub(str(tmp_path / "missing"), "me/x", api=object())
    with pytest.raises(TypeError, match="source must be"):
        hub.push_to_hub(42, "me/x", api=object())
    with pytest.raises(ValueError, match="adapter_config.json"):
        hub.push_to_hub(str(tmp_path), "me/x", api=object())


def test_leftovers_of_interrupted_saves_are_not_adapters_and_not_uploaded(captured, tmp_path):
    _, uploaded = captured
    saved = tmp_path / "saved"
    two_domain_model().save_pretrained(str(saved))  # saved/a, saved/b
    # what a killed save of saved/a leaves beside it (this version's name, a displaced old tree, an older version's)
    for leftover in (".a.tmp-" + "0" * 32, ".a.tmp-" + "1" * 32 + "-old", ".a.tmp-ab_cd123"):
        shutil.copytree(saved / "a", saved / leftover)
    assert set(hub.adapter_dirs(saved)) == {"a", "b"}
    hub.push_to_hub(str(saved), "me/x", token="x")
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "a", "b"]
    # a user's folder that only looks similar is still an adapter
    shutil.copytree(saved / "a", saved / ".a.tmp-mine")
    assert set(hub.adapter_dirs(saved)) == {"a", "b", ".a.tmp-mine"}
