"""Streamed image domains (examples/domains.py, examples/image_data.py): domains files, splits, transforms."""

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "benchmarks")]

import domains  # noqa: E402
import image_data  # noqa: E402
from make_image_domains import write_domains  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three generated imagefolder domains of 4 classes x 25 JPEGs (24 px)."""
    root = tmp_path_factory.mktemp("images")
    return write_domains(str(root), domains=3, classes=4, per_class=25, size=24)


@pytest.fixture(scope="module")
def saved_table(tmp_path_factory):
    """A `datasets` DatasetDict (train + test, 2 ClassLabel classes, column names of CIFAR-10) on disk."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)

    def split(n):
        labels = np.arange(n) % 2
        images = [Image.fromarray((rng.random((20, 20, 3)) * 100 + 100 * y).astype(np.uint8)) for y in labels]
        features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["cat", "dog"])})
        return datasets.Dataset.from_dict({"img": images, "fine": labels.tolist()}, features=features)

    path = tmp_path_factory.mktemp("table") / "saved"
    datasets.DatasetDict(train=split(30), test=split(10)).save_to_disk(str(path))
    return str(path)


def open_domain(entry: dict, seed=0, augment=False, size=16):
    (source,) = domains.parse({"domains": {"d": entry}})
    train_tf, eval_tf = image_data.transforms(image_data.data_config(image_size=size), augment=augment)
    opened = domains.open_source(source)
    return opened, domains.build_domain(opened, seed, train_tf, eval_tf, augment)


# ------------------------------------------------------------------------------------------------ domains files
def test_a_domains_file_with_two_different_sources(tmp_path, folders, saved_table):
    """An imagefolder (4 classes, splits carved) and a save_to_disk table (2 classes, its own test split), from one
    YAML file and from the same file as JSON; relative paths are relative to the file."""
    spec = {"seed": 7, "domains": {
        "shapes": {"imagefolder": os.path.relpath(folders[1], tmp_path), "carve": {"val": 0.2, "test": 0.2}},
        "pets": {"disk": saved_table, "image_column": "img", "label_column": "fine", "splits": {"train": "train",
                                                                                               "test": "test"}}}}
    import yaml

    (tmp_path / "d.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path / "d.json").write_text(json.dumps(spec))
    from_yaml, from_json = domains.load_file(tmp_path / "d.yaml"), domains.load_file(tmp_path / "d.json")
    assert from_yaml == from_json and [s.name for s in from_yaml] == ["shapes", "pets"]
    assert from_yaml[0].location == folders[1] and from_yaml[0].seed == 7

    train_tf, eval_tf = image_data.transforms(image_data.data_config(image_size=16), augment=False)
    shapes, pets = (domains.open_source(s) for s in from_yaml)
    assert shapes.class_names == [f"class_{c:03d}" for c in range(4)] and pets.class_names == ["cat", "dog"]

    train, val, test = domains.build_domain(shapes, 0, train_tf, eval_tf, augment=True)
    assert (len(train), len(val), len(test)) == (60, 20, 20)  # 100 images, 20 % each carved
    rows = [set(v.indices.tolist()) for v in (train, val, test)]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2]) and len(set.union(*rows)) == 100
    assert sorted(np.bincount(test.targets())) == [5, 5, 5, 5]  # stratified
    # each label is the class folder the file is in
    for k in (0, 17, 42):
        path = os.fsdecode(train.read.paths[train.indices[k]])
        assert f"class_{train[k][1]:03d}" == Path(path).parent.name
    # the file's seed (7), not the run's, fixes the carve
    again, _, _ = domains.build_domain(shapes, 3, train_tf, eval_tf, augment=True)
    assert np.array_equal(again.indices, train.indices)

    ptrain, pval, ptest = domains.build_domain(pets, 0, train_tf, eval_tf, augment=False)
    assert (len(ptrain), len(pval), len(ptest)) == (24, 6, 10)  # val carved from train (0.2 of 30), test its own
    x, y = ptest[3]
    assert x.shape == (3, 16, 16) and y == 1  # labels alternate 0, 1 in the generated table


def test_a_hub_entry_loads_its_config_and_splits(monkeypatch, saved_table):
    """`hub` + `config` reach `datasets` as they are (offline: the Hub calls return the saved table)."""
    import datasets

    table = datasets.load_from_disk(saved_table)
    calls = []
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name, config=None: calls.append((name, config))
                        or ["train", "test"])
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: calls.append((name, config, split))
                        or table[split])
    opened, (train, val, test) = open_domain({"hub": "someone/pets", "config": "small", "image_column": "img",
                                              "label_column": "fine"})
    assert calls == [("someone/pets", "small"), ("someone/pets", "small", "train"), ("someone/pets", "small", "test")]
    assert (len(train) + len(val), len(test)) == (30, 10) and opened.class_names == ["cat", "dog"]
    calls.clear()  # split names given in the file: the Hub is not asked for them (offline from the cache)
    open_domain({"hub": "someone/pets", "image_column": "img", "label_column": "fine", "splits": {"train": "test"}})
    assert calls == [("someone/pets", None, "test")]
    with pytest.raises(domains.DomainsFileError, match=r"domain 'd': cannot load hub 'someone/pets'.*'nope'.*'splits'"):
        open_domain({"hub": "someone/pets", "image_column": "img", "label_column": "fine", "splits": {"train": "nope"}})


def test_imagefolder_with_split_folders_and_classes_missing_from_one_split(tmp_path):
    from PIL import Image

    for split, classes in (("train", "abc"), ("test", "ac")):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    opened, (train, val, test) = open_domain({"imagefolder": str(tmp_path), "carve": {"val": 0.25}})
    assert opened.class_names == ["a", "b", "c"]
    assert sorted(set(test.targets().tolist())) == [0, 2]  # "c" keeps index 2 although "b" is absent from test
    assert len(train) + len(val) == 12 and len(val) == 3 and len(test) == 8


def test_defaults_are_shared_and_columns_skip_imagefolders(folders):
    parsed = domains.parse({"defaults": {"label_column": "fine", "seed": 2}, "domains": {
        "a": {"hub": "x"}, "b": {"imagefolder": folders[0], "seed": 5}}})
    assert (parsed[0].label_column, parsed[0].seed) == ("fine", 2)
    assert (parsed[1].label_column, parsed[1].seed) == ("label", 5)


BAD = [
    ({"domain": {}}, ["'domains' key"]),
    ({"domains": []}, ["non-empty mapping"]),
    ({"domains": {"a": "/data"}}, ["domain 'a'", "mapping"]),
    ({"domains": {"a": {}}}, ["domain 'a'", "exactly one source field", "found none"]),
    ({"domains": {"a": {"hub": "x", "imagefolder": "."}}}, ["domain 'a'", "exactly one", "hub", "imagefolder"]),
    ({"domains": {"a": {"imagefolder": "does/not/exist"}}}, ["domain 'a'", "'imagefolder'", "not a directory"]),
    ({"domains": {"a": {"hub": "x", "image_colum": "img"}}}, ["domain 'a'", "unknown field", "image_colum"]),
    ({"domains": {"a": {"hub": "x", "label_column": 3}}}, ["domain 'a'", "'label_column'", "string"]),
    ({"domains": {"a": {"imagefolder": ".", "config": "x"}}}, ["domain 'a'", "'config'", "only goes with 'hub'"]),
    ({"domains": {"a": {"hub": "x", "splits": {"test": "test"}}}}, ["domain 'a'", "'splits'", "no 'train'"]),
    ({"domains": {"a": {"hub": "x", "splits": {"train": "t", "val": "t"}}}}, ["domain 'a'", "'splits'", "twice"]),
    ({"domains": {"a": {"hub": "x", "splits": {"training": "t"}}}}, ["domain 'a'", "'splits'"]),
    ({"domains": {"a": {"hub": "x", "carve": {"val": 1.5}}}}, ["domain 'a'", "'carve.val'", "between 0 and 1"]),
    ({"domains": {"a": {"hub": "x", "carve": {"val": 0.5, "test": 0.5}}}},
     ["domain 'a'", "'carve'", "nothing to train"]),
    ({"domains": {"a": {"hub": "x", "seed": -1}}}, ["domain 'a'", "'seed'", "non-negative"]),
    ({"domains": {"a/b": {"hub": "x"}}}, ["'a/b'", "without '/'"]),
    ({"domains": {"a": {"hub": "x"}}, "sed": 1}, ["unknown top-level", "sed"]),
]


@pytest.mark.parametrize("obj,expected", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_domains_entries_name_the_domain_the_field_and_the_fix(obj, expected, tmp_path):
    with pytest.raises(domains.DomainsFileError) as err:
        domains.parse(obj, base_dir=tmp_path)
    for text in expected:
        assert text in str(err.value), (text, str(err.value))


def test_bad_files_and_sources(tmp_path, folders, saved_table):
    (tmp_path / "broken.yaml").write_text("domains:\n  a: [unclosed\n")
    with pytest.raises(domains.DomainsFileError, match="(?s)broken.yaml: cannot be parsed.*line 2.*fix its syntax"):
        domains.load_file(tmp_path / "broken.yaml")
    (tmp_path / "broken.json").write_text('{"domains": {"a": }')
    with pytest.raises(domains.DomainsFileError, match="cannot be parsed"):
        domains.load_file(tmp_path / "broken.json")
    with pytest.raises(domains.DomainsFileError, match=r"domain 'd'.*'image_column' is 'image'.*\['img', 'fine'\]"):
        open_domain({"disk": saved_table})
    with pytest.raises(domains.DomainsFileError, match=r"domain 'd'.*'splits.test' is 'tset'.*\['train', 'test'\]"):
        open_domain({"disk": saved_table, "image_column": "img", "label_column": "fine",
                     "splits": {"train": "train", "test": "tset"}})
    with pytest.raises(domains.DomainsFileError, match="domain 'd'.*no class folders"):
        open_domain({"imagefolder": str(tmp_path)})
    with pytest.raises(domains.DomainsFileError, match="domain 'd'.*mixes split folders"):
        (tmp_path / "mixed" / "train" / "a").mkdir(parents=True)
        (tmp_path / "mixed" / "b").mkdir()
        open_domain({"imagefolder": str(tmp_path / "mixed")})


def test_the_training_script_reads_a_domains_file_or_the_older_flags(tmp_path, folders):
    import multidomain_data

    root = str(Path(folders[0]).parent)
    (tmp_path / "d.json").write_text(json.dumps({"domains": {"x": {"imagefolder": folders[2]}}}))
    args = Namespace(domains=str(tmp_path / "d.json"), dataset="demo", image_size=16, no_augment=False)
    names, make = multidomain_data.streamed_domain_maker(args, None, None)
    assert names == ["x"] and isinstance(make("x", 0).train, image_data.Images)
    args = Namespace(domains="plain,rotated", dataset=root, image_size=16, no_augment=True)
    names, make = multidomain_data.streamed_domain_maker(args, None, None)
    domain = make("rotated", 0)
    assert names == ["plain", "rotated"] and domain.num_classes == 4 and not domain.train.augment
    with pytest.raises(ValueError, match="drop --dataset"):
        multidomain_data.streamed_domain_maker(Namespace(domains=str(tmp_path / "d.json"), dataset=root,
                                                         image_size=16), None, None)


# ------------------------------------------------------------------------------------------------ property test
def _entry_strategy(existing_dir: str):
    from hypothesis import strategies as st

    anything = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(-1, 2, allow_nan=False),
                         st.text(max_size=5), st.lists(st.integers(), max_size=2))
    values = {
        "hub": st.one_of(st.just("org/data"), anything),
        "imagefolder": st.one_of(st.just(existing_dir), st.just("missing_dir"), anything),
        "disk": st.one_of(st.just(existing_dir), anything),
        "config": st.one_of(st.just("cfg"), anything),
        "image_column": st.one_of(st.just("img"), anything),
        "label_column": st.one_of(st.just("label"), anything),
        "splits": st.one_of(st.fixed_dictionaries({"train": st.just("train")}, optional={
            "val": st.sampled_from(["validation", "train"]), "test": st.one_of(st.just("test"), anything)}), anything),
        "carve": st.one_of(st.fixed_dictionaries({}, optional={"val": st.floats(0, 1), "test": st.floats(-0.5, 1)}),
                           anything),
        "seed": st.one_of(st.integers(0, 5), anything),
        "colour": anything,
    }
    return st.dictionaries(st.sampled_from(sorted(values)), st.none(), max_size=5).flatmap(
        lambda keys: st.fixed_dictionaries({k: values[k] for k in keys}))


def test_any_domains_file_gives_a_clear_error_or_a_correct_result(tmp_path):
    """Random entries, valid and not: either a DomainsFileError naming the domain (and one of its fields), or
    domains whose every field is the entry's value or the documented default."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    existing = str(tmp_path)
    names = st.one_of(st.sampled_from(["sketch", "cifar10", "a b"]), st.text(min_size=0, max_size=4))

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.dictionaries(names, _entry_strategy(existing), min_size=1, max_size=3))
    def check(entries):
        try:
            result = domains.parse({"domains": entries}, base_dir=tmp_path)
        except domains.DomainsFileError as e:
            message = str(e)
            bad = [n for n in entries if f"domain '{n}'" in message or repr(n) in message]
            assert bad, message  # the message names the domain at fault
            return
        assert [d.name for d in result] == list(entries)
        for d in result:
            entry = entries[d.name]
            (kind,) = [k for k in domains.KINDS if k in entry]
            assert d.kind == kind and isinstance(d.location, str)
            if kind != "hub":
                assert os.path.isdir(d.location)
            assert d.config == entry.get("config") and d.image_column == entry.get("image_column", "image")
            assert d.label_column == entry.get("label_column", "label") and d.seed == entry.get("seed")
            carve = {**domains.DEFAULT_CARVE, **entry.get("carve", {})}
            assert d.carve == carve and all(0 < v < 1 for v in carve.values()) and sum(carve.values()) < 1
            assert d.splits == entry.get("splits") and (d.splits is None or "train" in d.splits)

    check()


# ------------------------------------------------------------------------------------------------ splits, loaders
def test_carve_is_disjoint_complete_seeded_and_stratified():
    labels = np.repeat(np.arange(5), [40, 30, 20, 20, 10])
    parts = image_data.carve(labels, {"test": 0.2, "val": 0.1}, seed=3)
    assert (len(parts["test"]), len(parts["val"]), len(parts["train"])) == (24, 12, 84)
    assert np.array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(120))
    assert list(np.bincount(labels[parts["test"]])) == [8, 6, 4, 4, 2]  # the label proportions, exactly
    same = image_data.carve(labels, {"test": 0.2, "val": 0.1}, seed=3)
    other = image_data.carve(labels, {"test": 0.2, "val": 0.1}, seed=4)
    assert all(np.array_equal(parts[k], same[k]) for k in parts)
    assert not np.array_equal(parts["test"], other["test"])
    # a class with one image cannot be stratified: a random carve, still disjoint and complete
    single = image_data.carve(np.array([0] * 9 + [1]), {"test": 0.3}, seed=0)
    assert len(single["test"]) == 3 and len(np.union1d(single["test"], single["train"])) == 10


def test_nothing_is_decoded_until_a_batch_asks_for_it(monkeypatch, folders):
    from PIL import Image

    opened_files = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened_files.append(a) or real_open(*a, **k))
    _, (train, val, test) = open_domain({"imagefolder": folders[0]}, augment=True)
    assert opened_files == []  # listing files and carving splits reads no image
    x, y = next(iter(image_data.make_loader(train, 4, order=[5, 1, 2, 3])))
    assert len(opened_files) == 4 and x.shape == (4, 3, 16, 16)


def test_augmentation_depends_on_seed_epoch_and_image_only(folders):
    """The same (seed, epoch) gives the same batch with 0 or 2 workers and from any start position (a resumed
    run); another epoch or seed crops differently; evaluation is deterministic and has no randomness."""
    _, (train, val, _) = open_domain({"imagefolder": folders[0]}, augment=True)
    order = list(range(12))
    x0, y0 = next(iter(image_data.make_loader(train, 12, order, num_workers=0, seed=1, epoch=2)))
    x2, y2 = next(iter(image_data.make_loader(train, 12, order, num_workers=2, seed=1, epoch=2)))
    assert torch.equal(x0, x2) and torch.equal(y0, y2)
    late, _ = next(iter(image_data.make_loader(train, 4, order[8:], seed=1, epoch=2)))
    assert torch.equal(late, x0[8:])
    for seed, epoch in ((1, 3), (2, 2)):
        other, _ = next(iter(image_data.make_loader(train, 12, order, seed=seed, epoch=epoch)))
        assert not torch.equal(other, x0)
    # the training crops are not the evaluation transform's centre crops: the augmentation is real
    centre = torch.stack([val.transform(train.read(int(i))) for i in train.indices[:12]])
    assert not any(torch.equal(x0[k], centre[k]) for k in range(12))
    a, b = val[0][0], val[0][0]
    assert torch.equal(a, b) and not val.augment


def test_transforms_from_timm_and_from_a_transformers_image_processor():
    """timm: the model's pretrained_cfg (size, crop_pct, mean/std); a processor: its own preprocessing, which
    the evaluation transform reproduces (compared with the processor's output)."""
    import timm
    from PIL import Image
    from transformers import CLIPImageProcessor, ViTImageProcessor

    model = timm.create_model("resnet18", pretrained=False)
    config = image_data.data_config(model)
    assert config["input_size"] == (3, 224, 224) and config["crop_pct"] == model.pretrained_cfg["crop_pct"]
    assert image_data.data_config(model, image_size=64)["input_size"] == (3, 64, 64)
    train_tf, eval_tf = image_data.transforms(config)
    names = [type(t).__name__ for t in train_tf.transforms]
    assert names[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"] and "ColorJitter" not in names
    assert not any("Random" in type(t).__name__ for t in eval_tf.transforms)

    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8))
    for processor in (CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 20, "width": 20}),
                      ViTImageProcessor(size={"height": 18, "width": 22}, image_mean=[0.1, 0.2, 0.3])):
        _, eval_tf = image_data.transforms(image_data.data_config(processor=processor), augment=False)
        expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
        got = eval_tf(image)
        assert got.shape == expected.shape
        assert (got - expected).abs().mean() < 0.02, type(processor).__name__


def test_a_local_timm_weights_file_is_loaded_offline(tmp_path, monkeypatch):
    """--backbone_weights FILE: timm's pretrained_cfg_overlay(file=...) loads it, no download."""
    import timm
    from safetensors.torch import save_file

    import multidomain_data

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(123)
    saved = timm.create_model("resnet10t", pretrained=False)
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(torch.randn_like(p))  # not timm's initialisation: loading must really copy these
    save_file(saved.state_dict(), str(tmp_path / "w.safetensors"))
    model, processor = multidomain_data.load_backbone(Namespace(backbone="resnet10t",
                                                                backbone_weights=str(tmp_path / "w.safetensors")))
    assert processor is None and not model.training
    for (name, a), b in zip(saved.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="is not a file"):
        multidomain_data.load_backbone(Namespace(backbone="resnet10t", backbone_weights=str(tmp_path / "nope.pth")))


@pytest.mark.slow
def test_full_run_of_the_training_script_on_streamed_imagefolders(tmp_path, folders):
    """examples/train_multidomain.py on three generated JPEG domains, from a domains file, with 2 workers: every
    domain trains, its adapter is saved and loads back onto the backbone."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4, num_channels=3)
    ResNetForImageClassification(config).save_pretrained(tmp_path / "backbone")
    ViTImageProcessor(size={"height": 20, "width": 20}).save_pretrained(tmp_path / "backbone")
    spec = {"domains": {Path(f).name: {"imagefolder": f, "carve": {"val": 0.2, "test": 0.2}} for f in folders}}
    (tmp_path / "domains.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "examples" / "train_multidomain.py"), "--backbone", str(tmp_path / "backbone"),
           "--domains", str(tmp_path / "domains.json"), "--methods", "ftn", "--ranks", "1", "--seeds", "0",
           "--lr_grid", "1", "--epochs", "1", "--batch_size", "16", "--num_workers", "2", "--num_threads", "1",
           "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["domain"] for r in rows) == ["inverted", "plain", "rotated"]
    assert all(r["optimizer_steps"] == 4 for r in rows)  # ceil(60 train images / 16)
    from peft import PeftModel

    import ftn_peft  # noqa: F401

    base = ResNetForImageClassification.from_pretrained(tmp_path / "backbone")
    model = PeftModel.from_pretrained(base, str(out / "ftn_r1" / "seed0" / "plain"), adapter_name="plain")
    for name in ("inverted", "rotated"):
        model.load_adapter(str(out / "ftn_r1" / "seed0" / name), adapter_name=name)
    assert model(torch.zeros(1, 3, 20, 20)).logits.shape == (1, 4)


def test_the_data_benchmark_measures_at_a_tiny_size(folders):
    """benchmarks/bench_data.py's two measurements, in this process, on 100 JPEGs (no timing is asserted)."""
    import bench_data

    args = bench_data.parse_args(["--image_size", "16", "--workers", "0", "--speed_images", "24", "--repeats", "2",
                                  "--batch_size", "8", "--small", "100", "--large", "100"])
    rss = bench_data.rss_child(args, folders[0])
    assert rss["images"] == 47 and rss["main_peak_rss"] > 0  # the train part: 100 - 33 test - 20 val
    speed = bench_data.speed_child(args, folders[0])
    assert speed["images_per_pass"] == 24 and len(speed["ratios"]) == 2
    result = {"settings": vars(args), "rss": {"100": [rss, rss]}, "peak_ratio": 1.0, "speed": speed, "cpus": 2}
    table = bench_data.table(result)
    assert "torchvision ImageFolder + DataLoader" in table and "| 100 |" in table
