"""The domains file: where each domain's images come from, which columns hold image and label, which splits to use.

```yaml
seed: 0                          # optional: seed for carving splits (default: each run seed carves its own)
domains:
  cifar10:                       # a Hugging Face data set: id, optional config, split names
    hub: uoft-cs/cifar10
    image_column: img            # default "image"
    label_column: label          # default "label"
    splits: {train: train, test: test}      # val is not listed: carved from train
  flowers:
    hub: nelorth/oxford-flowers
  sketch:                        # a local imagefolder: class subfolders, or train/ (val/ test/) of them
    imagefolder: /data/domainnet/sketch
    carve: {val: 0.1, test: 0.2} # fractions of the train split (defaults 0.2 and 0.33)
  saved:                         # a datasets.save_to_disk directory (Dataset or DatasetDict)
    disk: ./saved_domain
```
JSON with the same structure works too. Relative paths are relative to the file. Any split not given by
`splits` (or found under its usual name when `splits` is absent) is carved from the training split, stratified
by label where possible.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

import image_data

KINDS = ("hub", "imagefolder", "disk")
FIELDS = set(KINDS) | {"config", "image_column", "label_column", "splits", "carve", "seed"}
SPLITS = ("train", "val", "test")
USUAL_NAMES = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}
DEFAULT_CARVE = {"val": 0.2, "test": 1 / 3}
EXAMPLE = "domains:\n  my_domain:\n    imagefolder: /path/to/images"


class DomainsFileError(ValueError):
    """A domains file (or one of its entries) that cannot be used; the message names the domain and field."""


@dataclass
class DomainSource:
    name: str
    kind: str  # one of KINDS
    location: str  # Hub id or local directory
    config: Optional[str] = None
    image_column: str = "image"
    label_column: str = "label"
    splits: Optional[dict] = None  # {"train": name, "val": name, "test": name}; None: found by the usual names
    carve: dict = field(default_factory=lambda: dict(DEFAULT_CARVE))
    seed: Optional[int] = None  # None: the run's seed


# ------------------------------------------------------------------------------------------------ parsing
def load_file(path) -> list[DomainSource]:
    """Parse a YAML (.yaml / .yml) or JSON (.json) domains file."""
    path = Path(path)
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            obj = json.loads(text)
        else:
            import yaml

            obj = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError, with their line numbers
        raise DomainsFileError(f"domains file {path}: cannot be parsed ({e}); fix its syntax") from None
    return parse(obj, base_dir=path.parent, origin=str(path))


def parse(obj, base_dir=".", origin: str = "domains file") -> list[DomainSource]:
    """The domains of a parsed file; a DomainsFileError naming the domain, the field and the fix otherwise."""
    if not isinstance(obj, dict) or "domains" not in obj:
        raise DomainsFileError(f"{origin}: expected a mapping with a 'domains' key, got {_show(obj)}; "
                               f"for example:\n{EXAMPLE}")
    unknown = sorted(set(map(str, obj)) - {"domains", "seed", "defaults"})
    if unknown:
        raise DomainsFileError(f"{origin}: unknown top-level key(s) {unknown}; allowed: domains, seed, defaults")
    domains = obj["domains"]
    if not isinstance(domains, dict) or not domains:
        raise DomainsFileError(f"{origin}: 'domains' must be a non-empty mapping of domain name to its source, got "
                               f"{_show(domains)}; for example:\n{EXAMPLE}")
    defaults = obj.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise DomainsFileError(f"{origin}: 'defaults' must be a mapping of fields shared by every domain, got "
                               f"{_show(defaults)}")
    top_seed = _seed(obj.get("seed"), f"{origin}: top-level 'seed'")
    out = []
    for name, entry in domains.items():
        if not isinstance(name, str) or not name.strip() or "/" in name or name.startswith("."):
            raise DomainsFileError(f"{origin}: domain name {name!r} must be a non-empty string without '/' "
                                   "(it names the adapter and its directory)")
        if not isinstance(entry, dict):
            raise DomainsFileError(f"{origin}: domain '{name}' must be a mapping with one of {list(KINDS)}, got "
                                   f"{_show(entry)}; for example:\n  {name}:\n    imagefolder: /path/to/images")
        shared = {k: v for k, v in defaults.items() if not (str(k).endswith("_column") and "imagefolder" in entry)}
        out.append(_parse_domain(name, {**shared, **entry}, Path(base_dir), origin, top_seed))
    return out


def _parse_domain(name: str, entry: dict, base: Path, origin: str, top_seed) -> DomainSource:
    where = f"{origin}: domain '{name}'"
    unknown = sorted(set(map(str, entry)) - FIELDS)
    if unknown:
        raise DomainsFileError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(FIELDS)}")
    kinds = [k for k in KINDS if k in entry]
    if len(kinds) != 1:
        raise DomainsFileError(f"{where}: needs exactly one source field of {list(KINDS)} (a Hub id, a local "
                               f"imagefolder directory, a save_to_disk directory), found {kinds or 'none'}")
    kind = kinds[0]
    location = entry[kind]
    if not isinstance(location, str) or not location.strip():
        raise DomainsFileError(f"{where}: field '{kind}' must be a non-empty string, got {_show(location)}")
    if kind != "hub":
        path = Path(os.path.expanduser(location))
        location = os.path.normpath(path if path.is_absolute() else base / path)
        if not os.path.isdir(location):
            raise DomainsFileError(f"{where}: field '{kind}' is {entry[kind]!r}, but {location} is not a directory; "
                                   "fix the path (relative paths are relative to the domains file)")
    config = entry.get("config")
    if config is not None and (kind != "hub" or not isinstance(config, str)):
        raise DomainsFileError(f"{where}: field 'config' must be a string and only goes with 'hub' (the data set's "
                               f"configuration name), got {_show(config)} with '{kind}'")
    columns = {}
    for col in ("image_column", "label_column"):
        value = entry.get(col, col.split("_")[0])
        if not isinstance(value, str) or not value:
            raise DomainsFileError(f"{where}: field '{col}' must be a column name (a string), got {_show(value)}")
        columns[col] = value
    if kind == "imagefolder" and any(k in entry for k in columns):
        raise DomainsFileError(f"{where}: 'image_column' / 'label_column' are for 'hub' and 'disk' tables; an "
                               "imagefolder's labels are its class folder names: remove the field")
    splits = entry.get("splits")
    if splits is not None:
        if not isinstance(splits, dict) or not splits or set(map(str, splits)) - set(SPLITS):
            raise DomainsFileError(f"{where}: field 'splits' must map some of {list(SPLITS)} to the source's split "
                                   f"names, e.g. {{train: train, test: test}}, got {_show(splits)}")
        if "train" not in splits:
            raise DomainsFileError(f"{where}: field 'splits' has no 'train' entry; add train: <split name>")
        for key, value in splits.items():
            if not isinstance(value, str) or not value:
                raise DomainsFileError(f"{where}: field 'splits.{key}' must be a split name (a string), got "
                                       f"{_show(value)}")
        if len(set(splits.values())) != len(splits):
            raise DomainsFileError(f"{where}: field 'splits' uses one source split twice ({splits}); give each a "
                                   "different split, and leave a split out to carve it from train")
    carve = entry.get("carve", {})
    if not isinstance(carve, dict) or set(map(str, carve)) - {"val", "test"}:
        raise DomainsFileError(f"{where}: field 'carve' must map 'val' and/or 'test' to a fraction of the train "
                               f"split, e.g. {{val: 0.1, test: 0.2}}, got {_show(carve)}")
    carve = {**DEFAULT_CARVE, **carve}
    for key, value in carve.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise DomainsFileError(f"{where}: field 'carve.{key}' must be a fraction strictly between 0 and 1, got "
                                   f"{_show(value)}")
    if carve["val"] + carve["test"] >= 1:
        raise DomainsFileError(f"{where}: field 'carve' leaves nothing to train on (val {carve['val']} + test "
                               f"{carve['test']} >= 1); lower the fractions")
    seed = _seed(entry.get("seed", top_seed), f"{where}: field 'seed'")
    return DomainSource(name, kind, location, config, columns["image_column"], columns["label_column"],
                        dict(splits) if splits else None, {k: float(v) for k, v in carve.items()}, seed)


def _seed(value, where: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DomainsFileError(f"{where} must be a non-negative integer (or absent: each run seed carves its own "
                               f"splits), got {_show(value)}")
    return value


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def from_flags(dataset: str, names: Optional[list]) -> list[DomainSource]:
    """The older flags: `--dataset DIR` (one imagefolder per subdirectory) or a Hub id (one config per domain)."""
    if os.path.isdir(dataset):
        names = names or sorted(p.name for p in Path(dataset).iterdir() if p.is_dir())
        return parse({"domains": {n: {"imagefolder": str(Path(dataset) / n)} for n in names}})
    if not names:
        import datasets

        names = datasets.get_dataset_config_names(dataset)
    return parse({"domains": {n: {"hub": dataset, "config": n} for n in names}})


def is_domains_file(flag: Optional[str]) -> bool:
    return bool(flag) and flag.lower().endswith((".yaml", ".yml", ".json"))


# ------------------------------------------------------------------------------------------------ opening
@dataclass
class OpenSplit:
    read: object  # image_data.ImageFiles or image_data.TableImages
    labels: np.ndarray


@dataclass
class OpenDomain:
    """A domain's source splits (images not read), its class names and the chosen split of each role."""

    source: DomainSource
    splits: dict  # role ("train", "val", "test") -> OpenSplit, or None for a carved role
    class_names: list


def open_source(src: DomainSource) -> OpenDomain:
    """Lists files or opens tables (memory-mapped); reads labels, never images."""
    if src.kind == "imagefolder":
        available, classes = _imagefolder_splits(src)
    else:
        available, classes = _table_splits(src)
    roles = _choose(src, list(available))
    opened = {role: None if name is None else available[name]() for role, name in roles.items()}
    if classes is None:
        first = opened["train"]
        classes = [str(c) for c in range(1 + max(int(s.labels.max()) for s in opened.values() if s is not None
                                                 and len(s.labels)))] if len(first.labels) else []
    for role, split in opened.items():
        if split is None:
            continue
        if len(split.labels) == 0:
            raise DomainsFileError(f"domain '{src.name}': split '{roles[role]}' ({role}) has no images; fix the "
                                   "source or leave the split out to carve it")
        bad = (split.labels < 0) | (split.labels >= len(classes))
        if bad.any():
            raise DomainsFileError(f"domain '{src.name}': split '{roles[role]}' has labels outside "
                                   f"0..{len(classes) - 1} "
                                   f"(e.g. {int(split.labels[bad][0])}, an unlabeled split?); use a labeled split in "
                                   "'splits' or carve it")
    return OpenDomain(src, opened, list(classes))


def _choose(src: DomainSource, available: list) -> dict:
    if src.splits is not None:
        for role, name in src.splits.items():
            if name not in available:
                raise DomainsFileError(f"domain '{src.name}': field 'splits.{role}' is {name!r}, but the source has "
                                       f"the splits {available}; use one of them")
        return {role: src.splits.get(role) for role in SPLITS}
    roles = {role: next((n for n in USUAL_NAMES[role] if n in available), None) for role in SPLITS}
    if roles["train"] is None:
        if len(available) != 1:
            raise DomainsFileError(f"domain '{src.name}': the source has the splits {available} and none is called "
                                   "'train'; add a 'splits' field, e.g. splits: {train: <name>}")
        roles["train"] = available[0]
    return roles


def _imagefolder_splits(src: DomainSource):
    """Split subfolders (train/, validation/, test/ ... each of class folders) or class folders directly."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    root = Path(src.location)
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    split_names = {n for names in USUAL_NAMES.values() for n in names}
    if src.splits is not None:
        split_names |= set(src.splits.values())
    split_dirs = [d for d in subdirs if d in split_names]
    if not split_dirs:
        split_dirs = ["."]
    elif len(split_dirs) != len(subdirs):
        raise DomainsFileError(f"domain '{src.name}': {root} mixes split folders {split_dirs} with other folders "
                               f"{sorted(set(subdirs) - set(split_dirs))}; put the class folders inside the split "
                               "folders, or name the splits in 'splits'")
    classes = sorted({c.name for d in split_dirs for c in (root / d).iterdir() if c.is_dir()})
    if not classes:
        raise DomainsFileError(f"domain '{src.name}': field 'imagefolder': {root} has no class folders; expected "
                               "<dir>/<class>/<image> or <dir>/<split>/<class>/<image>")
    class_to_idx = {c: i for i, c in enumerate(classes)}

    def lister(d):
        def open_split() -> OpenSplit:
            folder = root / d
            present = {c: i for c, i in class_to_idx.items() if (folder / c).is_dir()}
            samples = make_dataset(str(folder), present, extensions=IMG_EXTENSIONS, allow_empty=True)
            rel = [os.path.relpath(p, root) for p, _ in samples]
            return OpenSplit(image_data.ImageFiles(str(root), rel), np.array([y for _, y in samples], np.int64))

        return open_split

    return {("train" if d == "." else d): lister(d) for d in split_dirs}, classes


def _table_splits(src: DomainSource):
    import datasets

    if src.kind == "disk":
        loaded = datasets.load_from_disk(src.location)
        tables = {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
        names = list(tables)
    elif src.splits is not None:  # named in the file: no need to ask the Hub (works offline from the cache)
        names, tables = list(src.splits.values()), {}
    else:
        try:
            names = datasets.get_dataset_split_names(src.location, src.config)
        except Exception as e:  # no network, a wrong id or config: say which field to fix
            raise DomainsFileError(f"domain '{src.name}': cannot find the splits of hub {src.location!r} config "
                                   f"{src.config!r} ({type(e).__name__}: {str(e)[:200]}); fix 'hub' / 'config', or "
                                   "download it first (HF_HUB_OFFLINE=1 then reads the local cache)") from None
        tables = {}
    classes = None

    def opener(name):
        def open_split() -> OpenSplit:
            nonlocal classes
            if name in tables:
                table = tables[name]
            else:
                try:
                    table = datasets.load_dataset(src.location, src.config, split=name)
                except Exception as e:  # a wrong id, config or split name, or no network and no cache
                    raise DomainsFileError(f"domain '{src.name}': cannot load hub {src.location!r} config "
                                           f"{src.config!r} split {name!r} ({type(e).__name__}: {str(e)[:200]}); fix "
                                           "'hub' / 'config' / 'splits'") from None
            for role, col in (("image_column", src.image_column), ("label_column", src.label_column)):
                if col not in table.column_names:
                    raise DomainsFileError(f"domain '{src.name}': field '{role}' is {col!r}, but split '{name}' has "
                                           f"the columns {table.column_names}; set '{role}' to one of them")
            feature = table.features[src.label_column]
            labels = np.asarray(table.select_columns([src.label_column]).with_format("numpy")[:][src.label_column])
            if isinstance(feature, datasets.ClassLabel):
                classes = list(feature.names)
            elif labels.dtype.kind not in "iu":
                raise DomainsFileError(f"domain '{src.name}': label column {src.label_column!r} holds "
                                       f"{labels.dtype} values, not class indices; cast it to a ClassLabel "
                                       "(dataset.class_encode_column) or set 'label_column'")
            return OpenSplit(image_data.TableImages(table, src.image_column), labels.astype(np.int64))

        return open_split

    openers = {n: opener(n) for n in names}
    # A ClassLabel's names are known once a split is open: open train now (tables stay on disk).
    train_name = _choose(src, names)["train"]
    first = openers[train_name]()
    openers[train_name] = lambda: first
    return openers, classes


def build_domain(opened: OpenDomain, seed: int, train_transform, eval_transform, augment: bool):
    """(train, val, test) `image_data.Images` views: the source's own splits, the rest carved from train."""
    src = opened.source
    split_seed = src.seed if src.seed is not None else seed
    train = opened.splits["train"]
    missing = {role: src.carve[role] for role in ("test", "val") if opened.splits[role] is None}
    parts = image_data.carve(train.labels, missing, split_seed)
    if len(parts["train"]) == 0:
        raise DomainsFileError(f"domain '{src.name}': carving {missing} leaves no training image; lower 'carve'")
    views = {}
    for role in SPLITS:
        split = train if role in parts else opened.splits[role]
        rows = parts[role] if role in parts else np.arange(len(split.labels))
        tf = train_transform if role == "train" else eval_transform
        if len(rows) == 0:
            raise DomainsFileError(f"domain '{src.name}': its {role} split is empty ({len(train.labels)} training "
                                   "images); add images or raise 'carve'")
        views[role] = image_data.Images(split.read, split.labels, rows, tf, augment=augment and role == "train")
    return views["train"], views["val"], views["test"]
