"""Dense decoders as per-adapter task heads: save/load, isolation, all tasks in one call; the scenes and NYUD data."""

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model

import ftn_peft
from ftn_peft import dense
from ftn_peft.loading import AdapterWeightsError

TASKS = {"semseg": 5, "depth": 1, "normals": 3, "edges": 1}
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def tiny_dense(seed: int = 0) -> dense.DenseModel:
    torch.manual_seed(seed)
    model = dense.build_model(num_outputs=1, channels=(8, 8, 16, 16), stem_width=8, layers=(1, 1, 1, 1),
                              decoder_channels=8, low_level_channels=4, rates=(1, 2, 3))
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():  # random statistics make BatchNorm mistakes visible
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def multi_task(base, tasks=TASKS, r=2):
    model = None
    for task, channels in tasks.items():
        config = dense.ftn_config(r=r, num_outputs=channels)
        if model is None:
            model = get_peft_model(copy.deepcopy(base), config, adapter_name=task)
        else:
            model.add_adapter(task, config)
    with torch.no_grad():  # non-trivial factors and decoders, so that every adapter computes something different
        for name, p in model.named_parameters():
            if "ftn_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_decoders_of_different_channels_save_load_and_report(tmp_path, images):
    base = tiny_dense()
    model = multi_task(base)
    expected = ftn_peft.forward_all_tasks(model, images, list(TASKS))
    assert {t: tuple(v.shape) for t, v in expected.items()} == {t: (3, c, 32, 32) for t, c in TASKS.items()}
    report = ftn_peft.parameter_report(model)
    decoder = sum(p.numel() for p in base.decoder.parameters())
    classifier_in = base.decoder.classifier.in_channels
    for task, channels in TASKS.items():  # the whole decoder is the task head: only its classifier differs
        assert report[task].head_params == decoder - (classifier_in + 1) + channels * (classifier_in + 1)
    model.save_pretrained(str(tmp_path))
    tasks = list(TASKS)
    restored = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / tasks[0]), adapter_name=tasks[0])
    for task in tasks[1:]:
        restored.load_adapter(str(tmp_path / task), adapter_name=task)
    restored.load_adapter(str(tmp_path / "depth"), adapter_name="depth_again")  # another name: keys carry none
    restored.eval()
    got = ftn_peft.forward_all_tasks(restored, images, tasks + ["depth_again"], strategy="loop")
    for task in tasks:
        torch.testing.assert_close(got[task], expected[task])
    torch.testing.assert_close(got["depth_again"], expected["depth"])


def test_a_decoder_of_the_wrong_size_is_refused_by_name(tmp_path):
    base = tiny_dense()
    model = multi_task(base, {"semseg": 5})
    model.save_pretrained(str(tmp_path))
    config_file = tmp_path / "semseg" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["head_num_outputs"] = 4
    config_file.write_text(json.dumps(config))
    with pytest.raises(AdapterWeightsError, match=r"shape mismatch.*decoder\.ftn_head\.classifier\.bias: checkpoint "
                       r"\(5,\) vs model \(4,\)"):
        PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "semseg"), adapter_name="semseg")


def test_a_head_without_an_output_layer_is_refused():
    base = tiny_dense()
    base.decoder = torch.nn.Identity()
    with pytest.raises(TypeError, match="decoder whose last Linear / Conv layer is its output layer"):
        get_peft_model(base, dense.ftn_config(r=1, num_outputs=3))


def test_training_one_task_leaves_the_others_bit_identical(images):
    base = tiny_dense()
    model = multi_task(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_adapter("normals")
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = model(images).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".normals" in k for k in changed), sorted(k for k in changed if ".normals" not in k)
    assert any("decoder.ftn_head.normals.aspp" in k for k in changed)  # the decoder trained, statistics too
    assert any("encoder.layer1.0.bn1.ftn_norm.normals.running_mean" in k for k in changed)


def test_all_tasks_in_one_call_equal_one_call_per_task(images):
    model = multi_task(tiny_dense())
    together = ftn_peft.forward_all_tasks(model, images, list(TASKS))  # one pass of 4·B rows, mixed adapters
    for task in TASKS:
        model.set_adapter(task)
        with torch.no_grad():
            torch.testing.assert_close(together[task], model(images), atol=1e-5, rtol=1e-5)
    # a mixed batch with decoders of different channel counts: one map per sample, each from its own task
    names = ["edges", "semseg", "edges"]
    with torch.no_grad():
        mixed = model(images, adapter_names=names)
    assert [m.shape[0] for m in mixed] == [1, 5, 1]
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], together[name][i], atol=1e-5, rtol=1e-5)


def test_baselines_train_what_they_name():
    base = tiny_dense()
    trainable = {m: {n for n, p in dense.baseline(m, base, 3).named_parameters() if p.requires_grad}
                 for m in dense.BASELINES}
    assert any(n.startswith("encoder.layer1.0.conv1") for n in trainable["finetune"])
    assert trainable["feature_extractor"] == {"model." + n for n, _ in base.named_parameters() if n.startswith("decoder.")}
    assert {n for n in trainable["bn_decoder"] if n.startswith("encoder")} == {
        n for n, m in base.encoder.named_parameters(prefix="encoder") if ".bn" in n or "downsample.1" in n}
    fe = dense.baseline("feature_extractor", base, 3).train()
    assert not any(m.training for m in fe.model.encoder.modules()) and fe.model.decoder.training
    with pytest.raises(ValueError, match="not one of"):
        dense.baseline("lora", base, 3)


# ------------------------------------------------------------------------------------------------ data
def test_scenes_are_deterministic_and_their_labels_consistent():
    from ftn_peft.demo.scenes import CLASSES, render

    a, b, c = render(3, 7, 32), render(3, 7, 32), render(3, 8, 32)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["image"], c["image"])
    assert a["semseg"].min() >= 0 and a["semseg"].max() < len(CLASSES)
    torch.testing.assert_close(a["normals"].norm(dim=0), torch.ones(32, 32))
    assert (a["depth"] > 0).all()
    floor = a["semseg"] == 0  # the floor faces up (camera y points down)
    assert (a["normals"][1][floor] < -0.99).all()
    for index in range(6):  # every change of class between neighbours is an edge
        scene = render(3, index, 32)
        seg = scene["semseg"]
        change = torch.zeros_like(seg, dtype=torch.bool)
        change[:, :-1] |= seg[:, :-1] != seg[:, 1:]
        change[:-1, :] |= seg[:-1, :] != seg[1:, :]
        assert change.any() and (scene["edges"][0][change] == 1).all()


def test_scene_depth_follows_the_geometry():
    # A floor pixel's depth times its ray's downward slope is the camera height: the same for the whole floor of a
    # scene and nearly the same for every scene (what makes depth readable from an image row).
    from ftn_peft.demo.scenes import _rays, render

    slope = _rays(32)[..., 1]
    heights = []
    for index in range(5):
        scene = render(4, index, 32)
        floor = scene["semseg"] == 0
        h = (scene["depth"][0] * slope)[floor]
        torch.testing.assert_close(h, torch.full_like(h, float(h.mean())), atol=1e-4, rtol=1e-4)
        heights.append(float(h.mean()))
    assert all(1.05 <= h <= 1.15 for h in heights) and len(set(heights)) == 5


def _fake_nyud(root: Path, ids=("a", "b")):
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "gt_sets").mkdir(parents=True)
    (root / "gt_sets" / "train.txt").write_text("\n".join(ids) + "\n")
    (root / "gt_sets" / "val.txt").write_text(ids[0] + "\n")
    for d in ("images", "segmentation", "depth", "normals", "edge"):
        (root / d).mkdir()
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        seg = np.zeros((12, 16), dtype=np.uint8)
        seg[:, 8:] = 3
        Image.fromarray(seg).save(root / "segmentation" / f"{i}.png")
        np.save(root / "depth" / f"{i}.npy", np.full((12, 16), 2.5, dtype=np.float32))
        normals = np.zeros((12, 16, 3), dtype=np.float32)
        normals[..., 2] = -1
        np.save(root / "normals" / f"{i}.npy", normals)
        edge = np.zeros((12, 16), dtype=np.uint8)
        edge[:, 8] = 255
        Image.fromarray(edge).save(root / "edge" / f"{i}.png")


def test_nyud_folder_loader_reads_the_documented_layout(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    import dense_data

    _fake_nyud(tmp_path)
    test = dense_data.NYUDFolder(tmp_path, "val", size=(12, 16), train=False)
    assert len(test) == 1
    image, maps = test[0]
    assert image.shape == (3, 12, 16)
    assert set(maps[ "semseg"].unique().tolist()) == {255, 2}  # 0 is void, 3 becomes class 2
    assert torch.equal(maps["depth"], torch.full((1, 12, 16), 2.5))
    assert torch.equal(maps["normals"][2], torch.full((12, 16), -1.0))
    assert maps["edges"][0, :, 8].eq(1).all() and maps["edges"].sum() == 12
    train = dense_data.NYUDFolder(tmp_path, "train", size=(10, 10), train=True)
    image, maps = train[1]
    assert image.shape == (3, 10, 10) and maps["semseg"].shape == (10, 10) and maps["normals"].shape == (3, 10, 10)
    with pytest.raises(FileNotFoundError, match="test.txt"):
        dense_data.NYUDFolder(tmp_path, "test")


def test_mean_predictor_is_the_per_pixel_statistic_of_the_training_labels():
    sys.path.insert(0, str(EXAMPLES))
    import train_dense

    seg = torch.tensor([[[0, 1]], [[0, 2]], [[1, 2]]])  # three 1×2 label maps; pixel 0: class 0 twice
    depth = torch.tensor([[[[2.0, 0.0]]], [[[4.0, 3.0]]], [[[6.0, 0.0]]]])  # 0 = missing: pixel 1's mean is 3
    normals = torch.zeros(3, 3, 1, 2)
    normals[:, 2] = -1.0
    normals[0, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])
    edges = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]], [[[1.0, 1.0]]]])
    train = [(torch.zeros(3, 1, 2), {"semseg": seg[i], "depth": depth[i], "normals": normals[i], "edges": edges[i]})
             for i in range(3)]
    args = train_dense.parse_args(["--batch_size", "2"])
    predict = train_dense.fit_mean_predictor(args, train, list(TASKS), num_classes=3)
    out = predict(torch.zeros(2, 3, 1, 2))
    maps = {t: train_dense.as_map(t, v) for t, v in out.items()}
    assert maps["semseg"].tolist() == [[[0, 2]]] * 2
    torch.testing.assert_close(maps["depth"], torch.tensor([[[[4.0, 3.0]]]] * 2))
    torch.testing.assert_close(maps["normals"][0, :, 0, 0], torch.tensor([0.0, 0.0, -1.0]))
    torch.testing.assert_close(maps["normals"][0, :, 0, 1], torch.nn.functional.normalize(
        torch.tensor([1.0, 0.0, -2.0]), dim=0))
    torch.testing.assert_close(maps["edges"], torch.tensor([[[[2 / 3, 1 / 3]]]] * 2))


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, monkeypatch):
    sys.path.insert(0, str(EXAMPLES))
    import train_dense

    train_dense.main(["--seeds", "0", "--ranks", "1", "--epochs", "1", "--train_size", "8", "--test_size", "4",
                      "--batch_size", "4", "--image_size", "32", "--source_scenes", "8", "--source_epochs", "1",
                      "--show", "2", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"),
                      "--num_threads", "1"])
    table = (tmp_path / "out" / "results.md").read_text()
    for label in ("Mean / majority per pixel", "Fine-tuning", "Feature extractor", "BatchNorm + decoder", "FTN, R=1"):
        assert label in table
    assert "4.000×" in table and "SemSeg mIoU" in table and "Edge odsF" in table
    assert (tmp_path / "out" / "predictions.png").stat().st_size > 1000
    saved = tmp_path / "out" / "ftn_r1" / "seed0"
    assert sorted(p.name for p in saved.iterdir() if p.is_dir()) == sorted(TASKS)
