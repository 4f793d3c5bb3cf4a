"""The digits demo data and source model: splits, domains, caching, architecture."""

import numpy as np
import pytest
import torch

from ftn_peft.demo import digits


def test_pools_are_disjoint_and_cover_everything():
    src, tgt = digits.pool_indices()
    assert len(np.intersect1d(src, tgt)) == 0
    assert len(src) + len(tgt) == 1797
    src2, tgt2 = digits.pool_indices()
    assert np.array_equal(src, src2) and np.array_equal(tgt, tgt2)


def test_source_dataset_is_the_source_pool():
    source, heldout = digits.source_dataset()
    src, tgt = digits.pool_indices()
    x_all, y_all = digits.load_images()
    assert torch.equal(source.tensors[0], digits._standardize(x_all[src]))
    assert torch.equal(heldout.tensors[1], y_all[tgt])


def _images(dom):
    return torch.cat([dom.train.tensors[0], dom.val.tensors[0], dom.test.tensors[0]])


def test_splits_are_deterministic_and_disjoint():
    a, b = digits.make_domain("rotated", seed=0), digits.make_domain("rotated", seed=0)
    for part in ("train", "val", "test"):
        for ta, tb in zip(getattr(a, part).tensors, getattr(b, part).tensors):
            assert torch.equal(ta, tb)
        assert len(a.indices[part]) == len(getattr(a, part))
    src, tgt = digits.pool_indices()
    tr, va, te = a.indices["train"], a.indices["val"], a.indices["test"]
    assert not set(tr) & set(va) and not set(tr) & set(te) and not set(va) & set(te)
    assert np.array_equal(np.sort(np.concatenate([tr, va, te])), tgt)
    assert not set(np.concatenate([tr, va, te])) & set(src)  # the source model never saw them
    assert (len(tr), len(va), len(te)) == (336, 113, 450)  # the documented defaults
    c = digits.make_domain("rotated", seed=1)
    assert not np.array_equal(a.indices["test"], c.indices["test"])


def test_splits_are_the_same_across_domains():
    a, b = digits.make_domain("inverted", seed=2), digits.make_domain("parity", seed=2)
    for part in ("train", "val", "test"):
        assert np.array_equal(a.indices[part], b.indices[part])
    _, y_all = digits.load_images()
    assert torch.equal(b.test.tensors[1], y_all[b.indices["test"]] % 2)


@pytest.mark.parametrize("name", sorted(digits.DOMAIN_SPECS))
def test_domain_classes_and_label_range(name):
    dom = digits.make_domain(name)
    assert dom.name == name and dom.num_classes == digits.DOMAIN_SPECS[name].num_classes
    for part in (dom.train, dom.val, dom.test):
        x, y = part.tensors
        assert x.shape[1:] == (1, digits.IMAGE_SIZE, digits.IMAGE_SIZE) and x.dtype == torch.float32
        assert y.dtype == torch.long and int(y.min()) == 0 and int(y.max()) == dom.num_classes - 1
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", [n for n, s in digits.DOMAIN_SPECS.items()
                                  if s.transform is not digits._identity])
def test_transformations_change_the_images(name):
    dom, ref = digits.make_domain(name), digits.make_domain("parity")
    x, x0 = _images(dom), _images(ref)
    assert x.shape == x0.shape
    assert (x - x0).abs().mean() > 0.3  # in standardized units: a visible change, not rounding


def test_default_domains_are_registered():
    assert set(digits.DOMAINS) <= set(digits.DOMAIN_SPECS)


def test_user_errors_name_the_argument():
    with pytest.raises(ValueError, match="name"):
        digits.make_domain("nope")
    with pytest.raises(ValueError, match="test_fraction"):
        digits.make_domain("rotated", test_fraction=1.5)
    with pytest.raises(ValueError, match="seed"):
        digits.make_domain("rotated", seed=-1)
    with pytest.raises(ValueError, match="epochs"):
        digits.load_source_model(epochs=0)


def test_model_is_a_timm_resnet():
    from timm.models.resnet import ResNet

    model = digits.build_source_model(num_classes=7)
    assert isinstance(model, ResNet)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 7
    names = dict(model.named_modules())
    for n in ("conv1", "bn1", "layer1.0.conv1", "layer1.0.bn2", "layer4.0.downsample.0", "fc"):
        assert n in names
    out = model.eval()(torch.zeros(2, 1, digits.IMAGE_SIZE, digits.IMAGE_SIZE))
    assert out.shape == (2, 7)


def test_load_source_model_caches(tmp_path, monkeypatch):
    state = torch.random.get_rng_state()
    m1 = digits.load_source_model(cache_dir=tmp_path, epochs=1, batch_size=256)
    assert torch.equal(state, torch.random.get_rng_state())  # no global RNG side effect
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    assert not m1.training

    def boom(*a, **k):
        raise AssertionError("retrained although a cache file exists")

    monkeypatch.setattr(digits, "_train_source", boom)
    m2 = digits.load_source_model(cache_dir=tmp_path, epochs=1, batch_size=256)
    assert not m2.training
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    # Different settings get a different file, not the cached weights.
    with pytest.raises(AssertionError, match="retrained"):
        digits.load_source_model(cache_dir=tmp_path, epochs=2, batch_size=256)


def test_hf_dataset_columns():
    pytest.importorskip("datasets")
    dom = digits.make_domain("parity")
    ds = digits.to_hf_dataset(dom.val)
    assert set(ds.column_names) == {"pixel_values", "labels"} and len(ds) == len(dom.val)
    row = ds[0]
    assert row["pixel_values"].shape == (1, digits.IMAGE_SIZE, digits.IMAGE_SIZE)
    assert torch.equal(row["pixel_values"], dom.val.tensors[0][0])


@pytest.mark.slow
def test_default_source_model_is_accurate(tmp_path):
    model = digits.load_source_model(cache_dir=tmp_path)
    assert digits.evaluate(model, digits.source_dataset()[1]) > 0.93
