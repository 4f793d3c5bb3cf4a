"""Publish FTN adapters on the Hugging Face Hub: one adapter, or a directory holding one adapter per domain.

The model card says what FTN is, which base model the adapters need, and each adapter's rank, targets and parameter
counts (factors, task BatchNorm, head), read from the saved files themselves, so the card cannot disagree with them.

    ftn_peft.hub.push_to_hub("out/ftn_r1/seed0", "me/resnet50-ftn-domains")   # every domain in one repo
    ftn_peft.hub.push_to_hub(peft_model, "me/resnet50-ftn-sketch")             # a PeftModel: saved first
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import HfApi, ModelCard

from .compat import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from .saving import FTN_TAGS, is_leftover

__all__ = ["adapter_dirs", "model_card", "push_to_hub"]

_CARD_INTRO = """\
**Factorized Tensor Network (FTN) adapters** for `{base}`.

FTN ("Factorized Tensor Networks for Multi-Task and Multi-Domain Learning") keeps one pretrained backbone frozen and
adds, per task or domain, a low-rank CP tensor ΔW = Σᵢ aᵢ ⊗ bᵢ ⊗ cᵢ (rank r) to the chosen weights, plus the domain's
own BatchNorm layers and classifier head. Adding a domain never changes another domain's outputs.

Load with [`ftn_peft`](https://github.com/) (it registers FTN in PEFT):

```python
import ftn_peft
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "{repo_id}"{subfolder_arg})
```
"""


def adapter_dirs(directory: Union[str, Path]) -> dict[str, Path]:
    """{adapter name: folder} for a saved adapter (name "default") or a folder of per-domain adapter folders.

    Temporary folders of interrupted saves (`.<name>.tmp-*`) are never adapters.
    """
    root = Path(directory)
    found = {}
    if (root / CONFIG_NAME).is_file():
        found["default"] = root
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not is_leftover(p.name)) if root.is_dir() else []:
        if (sub / CONFIG_NAME).is_file():
            found[sub.name] = sub
    if not found:
        raise ValueError(f"directory={str(directory)!r} holds no {CONFIG_NAME}, neither at its root nor one level down")
    return found


def _ignore_leftovers(folder, names) -> set:
    return {n for n in names if is_leftover(n)}


def _counts(folder: Path) -> dict[str, int]:
    from safetensors import safe_open

    counts = {"factors": 0, "norm": 0, "head": 0, "other": 0}
    weights = folder / SAFETENSORS_WEIGHTS_NAME
    if not weights.is_file():
        return counts
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            if "running_" in key or "num_batches_tracked" in key:
                continue  # BatchNorm statistics are buffers, not parameters (as in the paper's counts)
            kind = ("factors" if ".ftn_a" in key or ".ftn_b" in key or ".ftn_c" in key
                    else "norm" if ".ftn_norm." in key else "head" if ".ftn_head." in key else "other")
            counts[kind] += _numel(f.get_slice(key).get_shape())
    return counts


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def model_card(directory: Union[str, Path], repo_id: str = "<repo_id>") -> ModelCard:
    """A model card for the adapter(s) saved in `directory`."""
    adapters = adapter_dirs(directory)
    configs = {name: json.loads((folder / CONFIG_NAME).read_text()) for name, folder in adapters.items()}
    bases = sorted({str(c.get("base_model_name_or_path")) for c in configs.values()})
    first = next(iter(adapters))
    subfolder = "" if first == "default" else f', subfolder="{first}", adapter_name="{first}"'
    lines = [_CARD_INTRO.format(base=", ".join(bases), repo_id=repo_id, subfolder_arg=subfolder)]
    if len(adapters) > 1:
        lines.append("Further domains: `model.load_adapter(repo_id, adapter_name=name, subfolder=name)`.\n")
    lines += ["| adapter | rank | targets | factor params | task norm params | head params | head outputs |",
              "|---|---:|---|---:|---:|---:|---:|"]
    for name, folder in adapters.items():
        c, n = configs[name], _counts(folder)
        targets = c.get("target_modules")
        targets = targets if isinstance(targets, str) else ", ".join(sorted(targets or []))
        lines.append(f"| {name} | {c.get('r')} | `{targets}` | {n['factors']:,} | {n['norm']:,} | {n['head']:,} | "
                     f"{c.get('head_num_outputs') or ''} |")
    card = ModelCard("---\n---\n" + "\n".join(lines) + "\n")
    card.data.library_name = "peft"
    card.data.base_model = bases[0] if len(bases) == 1 and bases[0] != "None" else None
    card.data.tags = sorted(FTN_TAGS)
    return card


def push_to_hub(
    source,
    repo_id: str,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload FTN adapters",
    api: Optional[HfApi] = None,
) -> str:
    """Upload a saved adapter folder, a folder of domain adapters, or a PeftModel (all its adapters) to `repo_id`.

    Returns the commit URL. A model card (README.md) is written next to the adapters before upload.
    """
    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(source, (str, Path)):
            folder = Path(source)
            if not folder.is_dir():
                raise ValueError(f"source={str(source)!r} is not a directory; pass a saved adapter folder or a PeftModel")
            adapter_dirs(folder)
            staging = Path(tmp) / "upload"
            shutil.copytree(folder, staging, ignore=_ignore_leftovers)
        elif hasattr(source, "save_pretrained") and hasattr(source, "peft_config"):
            staging = Path(tmp) / "upload"
            source.save_pretrained(str(staging))
        else:
            raise TypeError(f"source must be a directory or a PeftModel, got {type(source).__name__}")
        model_card(staging, repo_id).save(staging / "README.md")
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(staging), commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
