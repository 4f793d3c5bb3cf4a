"""Importing ftn_peft leaves other PEFT methods alone: a LoRA save, card update and load give the same files and outputs.

The same script runs in two fresh interpreters, one that imports ftn_peft first and one that never does; their saved
files (byte for byte) and the loaded models' outputs must be identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

SCRIPT = r"""
import hashlib, json, sys
from pathlib import Path

if sys.argv[1] == "with":
    import ftn_peft
    from peft import PeftModel
    assert getattr(PeftModel.save_pretrained, "_ftn_atomic", False), "the save wrapper is not installed"
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from conftest import tiny_bert

assert ("ftn_peft" in sys.modules) == (sys.argv[1] == "with")
out = Path(sys.argv[2])
torch.manual_seed(0)
model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False))
model.add_adapter("second", LoraConfig(r=3, target_modules=["key"], init_lora_weights=False))
model.save_pretrained(out)
card = out / "README.md"
card.write_text(card.read_text() + "\nUser notes: keep me.\n")
model.save_pretrained(out)  # PEFT updates the existing card
ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
loaded = PeftModel.from_pretrained(tiny_bert(), out)
loaded.load_adapter(out / "second", adapter_name="second")
outputs = {}
for name in ("default", "second"):
    loaded.set_adapter(name)
    outputs[name] = loaded(input_ids=ids).last_hidden_state.flatten()[:50].tolist()
files = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*")) if p.is_file()}
print(json.dumps({"files": files, "outputs": outputs, "card": card.read_text()}))
"""


def test_lora_save_load_and_card_are_unchanged_by_importing_ftn_peft(tmp_path):
    # PYTHONHASHSEED: PEFT writes set-valued config fields (target_modules) in hash order
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    script = tmp_path / "lora_round_trip.py"
    script.write_text(SCRIPT)
    runs = {side: subprocess.Popen([sys.executable, str(script), side, str(tmp_path / side)], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for side in ("with", "without")}
    results = {}
    for side, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{side}: {stderr[-3000:]}"
        results[side] = json.loads(stdout.strip().splitlines()[-1])
    with_ftn, without = results["with"], results["without"]
    assert "User notes: keep me." in without["card"] and "ftn" not in without["card"]
    assert sorted(with_ftn["files"]) == sorted(without["files"]) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors",
        "second/adapter_config.json", "second/adapter_model.safetensors",
    ]
    assert with_ftn["card"] == without["card"]
    assert with_ftn["files"] == without["files"]
    assert with_ftn["outputs"] == without["outputs"]
