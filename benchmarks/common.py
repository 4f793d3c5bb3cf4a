"""Shared pieces of the benchmarks: backbones, the methods compared, and how each cost is measured.

Every method gets its own copy of the same randomly initialised backbone. Times are taken interleaved (one
sample of every method per repeat) so that contention from other processes hits all methods alike, and ratios
are computed per repeat before taking their median.
"""

from __future__ import annotations

import copy
from functools import partial
import json
import math
import os
import statistics
import struct
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ftn_peft  # noqa: F401  (registers peft_type "FTN")
from ftn_peft import presets
from peft import LoraConfig, get_peft_model

OUT_HELP = "output directory; default outputs/<script>/ (ignored by git); maintainers pass --out docs"


def output_dir(out, script: str) -> str:
    """`out`, or outputs/<script>/ under the working directory: a user's run never writes into docs/."""
    path = out or os.path.join("outputs", script)
    os.makedirs(path, exist_ok=True)
    return path

NUM_CLASSES = 10  # a small head keeps the trainable counts about the adapters, not the classifier


# --- backbones -----------------------------------------------------------------------------------------
@dataclass
class Backbone:
    name: str
    model: nn.Module
    make_input: Callable[[int, int], torch.Tensor]  # (batch, image_size) -> input
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, input) -> scalar training loss
    forward: Callable[[nn.Module, torch.Tensor], object]  # (model, input) -> output, for inference
    targets: object  # the FTN preset's target_modules, reused for LoRA
    ftn_config: Callable[[int], object]  # r -> FTNConfig
    lora_extra: dict = field(default_factory=dict)


def _resnet_loss(model, x):
    return F.cross_entropy(model(x), torch.arange(x.shape[0], device=x.device) % NUM_CLASSES)


def _clip_loss(model, x):
    return model(pixel_values=x).pooler_output.float().square().mean()


# (batch, image size) per backbone that a 2-core CPU runs in a few minutes; GPU runs pass their own.
CPU_SIZES = {"resnet50": (4, 64), "resnet18": (4, 64), "clip-qv": (2, 128), "clip-o": (2, 128)}


def build_backbone(name: str, image_size: int) -> Backbone:
    """Full-size backbones with random weights: "resnet50", "resnet18", "clip-qv", "clip-o"."""
    torch.manual_seed(0)
    if name in ("resnet50", "resnet18"):
        import timm

        model = timm.create_model(name, num_classes=NUM_CLASSES)
        return Backbone(
            name, model, lambda b, s: torch.randn(b, 3, s, s), _resnet_loss, lambda m, x: m(x),
            presets.RESNET_TARGETS, lambda r: presets.resnet(r=r),
            # LoRA gets what FTN's preset trains besides the factors: every BatchNorm and the classifier.
            {"modules_to_save": ["fc", "bn1", "bn2", "bn3", "downsample.1"]},
        )
    if name in ("clip-qv", "clip-o"):
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                               num_hidden_layers=12, image_size=image_size, patch_size=32)
        targets = name.split("-")[1]
        return Backbone(
            name, CLIPVisionModel(cfg), lambda b, s: torch.randn(b, 3, s, s), _clip_loss,
            lambda m, x: m(pixel_values=x),
            presets.CLIP_VISION_TARGETS[targets], lambda r: presets.clip_vision(r=r, targets=targets),
        )
    raise ValueError(f"backbone={name!r} must be one of resnet50, resnet18, clip-qv, clip-o")


def lora_param_count(backbone: Backbone, r: int) -> int:
    """LoRA factor parameters at rank r on the backbone's FTN targets: r·(Cin·k² + Cout) or r·(in + out) each."""
    import re

    total = 0
    for name, m in backbone.model.named_modules():
        if re.fullmatch(backbone.targets, name):
            if isinstance(m, nn.Conv2d):
                total += r * (m.in_channels * math.prod(m.kernel_size) + m.out_channels)
            else:
                total += r * (m.in_features + m.out_features)
    return total


def closest_lora_rank(backbone: Backbone, ftn_factor_params: int) -> int:
    return min(range(1, 257), key=lambda r: abs(lora_param_count(backbone, r) - ftn_factor_params))


# --- methods -------------------------------------------------------------------------------------------
@dataclass
class Method:
    name: str
    kind: str  # "base" | "full" | "lora" | "ftn"
    r: Optional[int]
    model: nn.Module
    optimizer: Optional[torch.optim.Optimizer] = None
    config_factory: Optional[Callable[[], object]] = None

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def build_method(backbone: Backbone, kind: str, r: Optional[int] = None, device: str = "cpu", name=None) -> Method:
    model = copy.deepcopy(backbone.model)
    factory = None
    if kind == "base":
        model.requires_grad_(False)
    elif kind == "full":
        model.requires_grad_(True)
    elif kind == "lora":
        factory = partial(LoraConfig, r=r, lora_alpha=r, target_modules=backbone.targets, **backbone.lora_extra)
    elif kind == "ftn":
        factory = partial(backbone.ftn_config, r)
    else:
        raise ValueError(f"kind={kind!r} must be base, full, lora or ftn")
    if factory is not None:
        model = get_peft_model(model, factory())
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4) if params else None
    label = name or (kind if r is None else f"{kind} r={r}")
    return Method(label, kind, r, model, optimizer, factory)


# --- measurements --------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(m: Method, backbone: Backbone, x: torch.Tensor) -> None:
    m.model.train()
    m.optimizer.zero_grad(set_to_none=True)
    backbone.loss(m.model, x).backward()
    m.optimizer.step()


@torch.no_grad()
def infer(m: Method, backbone: Backbone, x: torch.Tensor) -> None:
    m.model.eval()
    backbone.forward(m.model, x)


def timed(fn: Callable[[], None], device: str, inner: int = 1, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of fn, averaged over `inner` back-to-back calls (`clock`: wall time unless told)."""
    sync(device)
    start = clock()
    for _ in range(inner):
        fn()
    sync(device)
    return (clock() - start) / inner


def interleaved(jobs: dict[str, Callable[[], None]], repeats: int, warmup: int, device: str, inner: int = 1,
                clock: Callable[[], float] = time.perf_counter):
    """{name: [seconds per repeat]}; each repeat runs every job once, in a rotated order."""
    names = list(jobs)
    for _ in range(warmup):
        for n in names:
            jobs[n]()
    out = {n: [] for n in names}
    for i in range(repeats):
        shift = i % len(names)
        for n in names[shift:] + names[:shift]:
            out[n].append(timed(jobs[n], device, inner, clock))
    return out


def summary(values: list[float]) -> dict:
    """Median, quartiles (IQR), min and max of a list of repeats."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "min": min(values), "max": max(values),
            "n": len(values)}


class TransientPeak(TorchDispatchMode):
    """Peak bytes of tensor storages created while active (activations, gradients, temporaries).

    CPU has no allocator statistics, so every op's output storage is counted until it is garbage collected;
    storages an op merely writes to (in-place ops, views of its inputs) are not new and are skipped.
    """

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, weakref.finalize] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            if id(st) in self._live or not st.nbytes() or st.data_ptr() in inputs:
                continue
            self._live[id(st)] = weakref.finalize(st, self._free, id(st), st.nbytes())
            self.current += st.nbytes()
            self.peak = max(self.peak, self.current)
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._live.pop(key, None)
        self.current -= nbytes


def persistent_bytes(m: Method) -> int:
    """Parameters, buffers and optimizer state: what lives across steps."""
    total = sum(t.numel() * t.element_size() for t in list(m.model.parameters()) + list(m.model.buffers()))
    if m.optimizer is not None:
        for state in m.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def train_peak_bytes(m: Method, backbone: Backbone, x: torch.Tensor, device: str) -> tuple[int, int]:
    """(persistent bytes, transient peak bytes) of one training step taken after warm-up."""
    if device.startswith("cuda"):
        m.optimizer.zero_grad(set_to_none=True)
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(m, backbone, x)
        sync(device)
        return persistent_bytes(m), torch.cuda.max_memory_allocated() - before
    m.optimizer.zero_grad(set_to_none=True)
    with TransientPeak() as tracker:
        train_step(m, backbone, x)
    m.optimizer.zero_grad(set_to_none=True)
    return persistent_bytes(m), tracker.peak


def safetensors_check(path: str) -> dict:
    """File size and what it should be: 8 bytes + JSON header + Σ numel × element size, nothing else."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "F64": 8, "I32": 4}
    data = sum(math.prod(t["shape"]) * sizes[t["dtype"]] for k, t in header.items() if k != "__metadata__")
    elements = sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    size = os.path.getsize(path)
    return {"file_bytes": size, "header_bytes": 8 + header_len, "tensor_bytes": data, "saved_elements": elements,
            "exact": size == 8 + header_len + data}


def adapter_file(m: Method) -> Optional[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        if m.kind in ("lora", "ftn"):
            m.model.save_pretrained(tmp)
            return safetensors_check(os.path.join(tmp, "adapter_model.safetensors"))
        if m.kind == "full":
            from safetensors.torch import save_file

            path = os.path.join(tmp, "model.safetensors")
            save_file({k: v.contiguous() for k, v in m.model.state_dict().items()}, path)
            return safetensors_check(path)
    return None


def switch_cost(m: Method, n_adapters: int, device: str, rounds: int = 3) -> dict:
    """Seconds per switch among n adapters: set_adapter (unmerged) and unmerge + set + merge (merged)."""
    if m.kind == "full":  # a fully fine-tuned model switches by loading another full state dict
        states = [copy.deepcopy(m.model.state_dict()) for _ in range(2)]
        times = [timed(lambda s=states[i % 2]: m.model.load_state_dict(s), device) for i in range(2 * rounds)]
        return {"unmerged": statistics.median(times), "merged": statistics.median(times)}
    names = ["default"] + [f"a{i}" for i in range(1, n_adapters)]
    for n in names[1:]:
        if n not in m.model.peft_config:
            m.model.add_adapter(n, m.config_factory())
    m.model.to(device)
    unmerged, merged = [], []
    for _ in range(rounds):
        for n in names:
            unmerged.append(timed(lambda n=n: m.model.set_adapter(n), device))
    m.model.base_model.merge_adapter()
    for _ in range(1):  # a merged switch rewrites every target weight twice: one round is enough
        for n in names:
            def swap(n=n):
                m.model.base_model.unmerge_adapter()
                m.model.set_adapter(n)
                m.model.base_model.merge_adapter()
            merged.append(timed(swap, device))
    m.model.base_model.unmerge_adapter()
    m.model.set_adapter("default")
    return {"unmerged": statistics.median(unmerged), "merged": statistics.median(merged)}
