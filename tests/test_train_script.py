"""examples/train_multidomain.py end to end: two Accelerate processes agree, a killed run resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_multidomain.py"
sys.path.insert(0, str(ROOT / "examples"))

TINY = ["--domains", "inverted", "--methods", "ftn", "--ranks", "1", "--lr_grid", "1", "--epochs", "1",
        "--batch_size", "32", "--source_epochs", "1", "--num_threads", "1"]


def run(args, cache, expect=0, launcher=(sys.executable,)):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([*launcher, str(SCRIPT), "--cache_dir", str(cache), *args], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def adapter(out, seed, label="ftn_r1", domain="inverted"):
    return load_file(str(Path(out) / label / f"seed{seed}" / domain / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_processes_end_with_the_same_adapter(tmp_path, monkeypatch):
    # In accelerate 1.15, `accelerate launch --cpu --num_processes 2` starts ONE process unless mpirun is set up.
    # Its torchrun-based launcher (`--multi_gpu`) with ACCELERATE_USE_CPU starts two gloo processes on CPU.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", "29533")  # = `accelerate launch ...`
    out = tmp_path / "out"
    run([*TINY, "--seeds", "0", "--output_dir", str(out), "--adapter_hash_file", str(tmp_path / "hash")],
        tmp_path / "cache", launcher=launcher)
    hashes = [(tmp_path / f"hash.rank{r}").read_text() for r in (0, 1)]  # rank1 exists: two processes ran
    assert hashes[0] == hashes[1] and hashes[0].strip()
    # only the main process writes: one result line per job, not one per process
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    from peft import PeftModel

    import ftn_peft  # noqa: F401
    from ftn_peft.demo import digits

    base = digits.load_source_model(cache_dir=tmp_path / "cache", epochs=1)
    model = PeftModel.from_pretrained(base, str(out / "ftn_r1" / "seed0" / "inverted"), adapter_name="inverted")
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


@pytest.mark.slow
def test_run_killed_with_sigkill_mid_epoch_resumes_to_bit_identical_adapters(tmp_path):
    common = [*TINY, "--seeds", "0,1", "--epochs", "2", "--checkpointing_steps", "4"]
    run([*common, "--output_dir", str(tmp_path / "full")], tmp_path / "cache")
    # 11 steps an epoch, 22 a job; checkpoints every 4 steps of the run: in the second job (seed 1) at its steps
    # 2, 6, 10, 14 and 18, all inside an epoch. SIGKILL as soon as one of them is on disk.
    killed = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--cache_dir", str(tmp_path / "cache"), *common,
                             "--output_dir", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer, deadline = killed / "checkpoint.json", time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if pointer.exists() and "seed1" in pointer.read_text():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    import safe_checkpoint

    state = safe_checkpoint.load_checkpoint(pointer)
    assert state["job"] == "ftn_r1/seed1/inverted/lr1" and state["step"] % 11 != 0  # mid-epoch
    assert not (killed / "ftn_r1" / "seed1").exists() and len(list(killed.glob("checkpoint-*.safetensors"))) <= 2
    log = run([*common, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"], tmp_path / "cache")
    assert "ftn_r1 × inverted × seed 0, lr ×1: done before this run" in log  # not trained again
    steps = [json.loads(line) for line in (killed / "results.jsonl").read_text().splitlines()]
    assert [r["optimizer_steps"] for r in steps] == [22, 22]
    for seed in (0, 1):
        full, resumed = adapter(tmp_path / "full", seed), adapter(killed, seed)
        assert full.keys() == resumed.keys()
        assert all(torch.equal(resumed[k], full[k]) for k in full), seed  # bit-identical


@pytest.mark.slow
def test_tracking_progress_max_steps_and_hub_dry_run_offline(tmp_path):
    """One run checks what users of accelerate's example scripts expect: TensorBoard event files written offline,
    --max_train_steps over --epochs, evaluation every epoch, --push_to_hub (staged locally), and plain progress
    lines when the output is not a terminal."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    log = run([*TINY, "--seeds", "0", "--lr_grid", "1,2", "--max_train_steps", "14", "--with_tracking",
               "--checkpointing_steps", "epoch",
               "--output_dir", str(out), "--push_to_hub", "--hub_model_id", "me/digits-ftn", "--hub_dry_run"],
              tmp_path / "cache")
    # progress: one plain line per job (2 lrs), no bar redraws in a file
    jobs = [line for line in log.splitlines() if line.startswith("[")]
    assert len(jobs) == 2 and jobs[1].startswith("[2/2] ftn_r1 × inverted × seed 0, lr ×2: val ")
    assert "\r" not in log and "\x1b" not in log and "epoch" not in log
    # --max_train_steps 14 beats --epochs 1 (11 steps): two epochs, each evaluated, cosine ends at 0
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["step"]) for e in epochs] == [(0, 11), (1, 14)] * 2 and epochs[1]["lr"] == 0.0
    import safe_checkpoint

    last = safe_checkpoint.load_checkpoint(out)  # --checkpointing_steps epoch: saved after each epoch's evaluation
    assert (last["job"], last["step"], last["global_step"]) == ("ftn_r1/seed0/inverted/lr2", 14, 28)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["optimizer_steps"] for r in rows] == [14, 14] and rows[0]["val"] == epochs[1]["val_acc"]
    (events,) = (out / "train_multidomain").glob("events.out.tfevents.*")
    tb = EventAccumulator(str(events))
    tb.Reload()
    val = tb.Scalars("ftn_r1/seed0/inverted/lr1/val_acc")
    assert [(e.step, round(e.value, 6)) for e in val] == [(e["step"], round(e["val_acc"], 6)) for e in epochs[:2]]
    assert {"ftn_r1/seed0/inverted/lr2/train_loss", "ftn_r1/seed0/inverted/lr2/test_acc"} <= set(tb.Tags()["scalars"])
    # --push_to_hub --hub_dry_run: the adapters and the model card, as they would be uploaded
    staged = out / "hub_dry_run" / "me" / "digits-ftn"
    assert (staged / "inverted" / "adapter_model.safetensors").read_bytes() == (
        out / "ftn_r1" / "seed0" / "inverted" / "adapter_model.safetensors").read_bytes()
    assert "FTN" in (staged / "README.md").read_text() and "pushed" in log


@pytest.mark.slow
def test_gradient_accumulation_and_bf16_autocast(tmp_path):
    """Accumulating 2 batches halves the optimizer steps; bf16 autocast trains fp32 factors that load back."""
    import json
    import math

    from peft import PeftModel

    import ftn_peft  # noqa: F401
    from ftn_peft.demo import digits

    out = tmp_path / "out"
    run([*TINY, "--seeds", "0", "--output_dir", str(out), "--gradient_accumulation_steps", "2",
         "--mixed_precision", "bf16"], tmp_path / "cache")
    (row,) = map(json.loads, (out / "results.jsonl").read_text().splitlines())
    batches = math.ceil(len(digits.make_domain("inverted", 0).train) / 32)
    assert row["optimizer_steps"] == math.ceil(batches / 2)
    saved = adapter(out, 0)
    floats = [v for v in saved.values() if v.is_floating_point()]  # BatchNorm's num_batches_tracked is int64
    assert floats and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in floats)
    # the factors moved away from the script's own initialisation (same seed, no training)
    import multidomain_data
    import train_multidomain
    from peft import get_peft_model_state_dict

    args = train_multidomain.parse_args([*TINY, "--seeds", "0", "--cache_dir", str(tmp_path / "cache")])
    spec = multidomain_data.load_spec(args)
    init = train_multidomain.build_model(args, {"seed": 0, "method": "ftn", "rank": 1}, spec.source_for(0),
                                         spec.domain("inverted", 0), spec)
    init = get_peft_model_state_dict(init, adapter_name="inverted")
    factors = [k for k in saved if "ftn_" in k and "ftn_norm" not in k and "ftn_head" not in k]
    assert factors and factors[0] in init
    assert max((saved[k] - init[k]).abs().max().item() for k in factors) > 1e-4
    base = digits.load_source_model(cache_dir=tmp_path / "cache", epochs=1)
    model = PeftModel.from_pretrained(base, str(out / "ftn_r1" / "seed0" / "inverted"), adapter_name="inverted")
    assert torch.isfinite(model(torch.zeros(2, 1, 16, 16))).all()


def test_summary_table_and_multiples():
    import multidomain_report as rep

    results = [dict(label="m", domain=d, seed=s, test=t, trainable=10, lr_scale=1.0)
               for d, s, t in [("a", 0, 0.5), ("a", 1, 0.7), ("b", 0, 0.9), ("b", 1, 0.9)]]
    rows = {(r["method"], r["domain"]): r for r in rep.summarize(results, backbone_params=100)}
    assert rows[("m", "a")]["top1"] == pytest.approx(60.0)
    assert rows[("m", "a")]["top1_std"] == pytest.approx(14.142, abs=1e-3)
    # the mean row's spread is over seeds of the per-seed mean: seed0 70, seed1 80
    assert rows[("m", "mean")]["top1"] == pytest.approx(75.0)
    assert rows[("m", "mean")]["top1_std"] == pytest.approx(7.071, abs=1e-3)
    assert rows[("m", "mean")]["total_params_multiple"] == pytest.approx(1.2)


@pytest.mark.slow
def test_local_save_pretrained_backbone_and_imagefolder_domains(tmp_path):
    """The non-demo paths, on local copies: a transformers model dir and one imagefolder per domain."""
    from PIL import Image
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4, num_channels=3)
    ResNetForImageClassification(config).save_pretrained(tmp_path / "backbone")
    rng = torch.Generator().manual_seed(0)
    for domain, classes in (("dark", 2), ("light", 3)):
        for c in range(classes):
            folder = tmp_path / "data" / domain / "train" / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(12):
                pixels = (torch.rand(16, 16, 3, generator=rng) * 60 + 60 * c).byte().numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "out"
    run(["--backbone", str(tmp_path / "backbone"), "--dataset", str(tmp_path / "data"), "--image_size", "16",
         "--methods", "ftn,bn_head", "--ranks", "1", "--seeds", "0", "--lr_grid", "1", "--epochs", "1",
         "--batch_size", "8", "--output_dir", str(out)], tmp_path / "cache")
    table = (out / "results.md").read_text()
    assert "dark" in table and "light" in table and "bn_head" in table
    from peft import PeftModel

    import ftn_peft  # noqa: F401

    base = ResNetForImageClassification.from_pretrained(tmp_path / "backbone")
    model = PeftModel.from_pretrained(base, str(out / "ftn_r1" / "seed0" / "dark"), adapter_name="dark")
    model.load_adapter(str(out / "ftn_r1" / "seed0" / "light"), adapter_name="light")
    model.set_adapter("light")
    assert model(torch.zeros(1, 3, 16, 16)).logits.shape == (1, 3)


@pytest.mark.slow
def test_resume_restores_the_random_state_of_dropout(tmp_path, monkeypatch):
    """A backbone with dropout, stopped mid-epoch and resumed in process: the adapter is bit-identical to an
    uninterrupted run's only if the checkpoint restores the random generator that dropout draws from."""
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    import train_multidomain

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=2, hidden_dropout_prob=0.3)
    ViTForImageClassification(config).save_pretrained(tmp_path / "backbone")
    rng = torch.Generator().manual_seed(0)
    for c in range(2):
        folder = tmp_path / "data" / "dark" / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(9):
            Image.fromarray((torch.rand(16, 16, 3, generator=rng) * 60 + 60 * c).byte().numpy()).save(folder / f"{i}.png")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = ["--backbone", str(tmp_path / "backbone"), "--dataset", str(tmp_path / "data"), "--image_size", "16",
              "--methods", "ftn", "--ranks", "1", "--seeds", "0", "--lr_grid", "1", "--epochs", "2", "--batch_size",
              "2", "--num_threads", "1", "--checkpointing_steps", "1", "--cache_dir", str(tmp_path / "cache")]
    train_multidomain.main([*common, "--output_dir", str(tmp_path / "full")])
    with pytest.raises(SystemExit):  # 5 steps an epoch: stops inside the first epoch
        train_multidomain.main([*common, "--output_dir", str(tmp_path / "cut"), "--stop_after_steps", "3"])
    train_multidomain.main([*common, "--output_dir", str(tmp_path / "cut"), "--resume_from_checkpoint", "latest"])
    full = adapter(tmp_path / "full", 0, domain="dark")
    resumed = adapter(tmp_path / "cut", 0, domain="dark")
    assert all(torch.equal(resumed[k], full[k]) for k in full)
