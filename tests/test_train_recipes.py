"""train_multidomain.py's recipes, flags, optimizers, resumable data order and progress display (in process, fast)."""

import io
import random
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import recipes  # noqa: E402
import train_multidomain as tm  # noqa: E402
from progress import Progress  # noqa: E402

PAPER = ["--dataset", "/data/domains"]  # the paper recipes refuse the built-in digits


def test_no_arguments_is_the_demo_recipe_with_its_old_values():
    args = tm.parse_args([])
    assert (args.recipe, args.backbone, args.epochs, args.batch_size) == ("demo", "demo", 8, 64)
    assert args.ranks == [1, 8] and args.seeds == [0, 1, 2] and args.lr_grid == [0.5, 2.0]
    assert args.methods == ["ftn", "finetune", "feature_extractor", "bn_head", "lora"]
    assert args.optimizers["ftn"] == recipes.Optimizers("adam", 5e-3, "sgd", 5e-2)
    assert args.optimizers["finetune"] == recipes.Optimizers("adam", 1e-3, "sgd", 5e-2)
    assert [label for label, *_ in tm.method_labels(args)] == [
        "ftn_r1", "ftn_r8", "finetune", "feature_extractor", "bn_head", "lora_r1"]


def test_paper_resnet_recipe_values_and_explicit_flags_win():
    args = tm.parse_args(["--recipe", "paper-resnet", *PAPER])
    assert (args.backbone, args.epochs, args.batch_size, args.lr_scheduler) == ("resnet50", 30, 32, "cosine")
    assert args.ranks == [1, 5, 10, 15, 20, 25, 50] and args.lr_grid == [1.0]
    assert args.optimizers["ftn"] == recipes.Optimizers("adam", 0.005, "sgd", 0.008, 0.0)
    assert args.optimizers["finetune"] == recipes.Optimizers("sgd", 0.005, "sgd", 0.005, 0.0)
    # typed flags override the recipe; untyped ones keep it; an optimizer flag applies to every method
    args = tm.parse_args(["--recipe", "paper-resnet", *PAPER, "--epochs", "3", "--ranks", "1,10", "--factor_lr",
                          "0.01", "--batch_size=16"])
    assert (args.epochs, args.ranks, args.batch_size, args.backbone) == (3, [1, 10], 16, "resnet50")
    assert args.optimizers["ftn"].factor_lr == 0.01 and args.optimizers["bn_head"].factor_lr == 0.01
    assert args.optimizers["ftn"].head_lr == 0.008  # not typed: the recipe's
    assert args.config_sources["epochs"] == "given"
    assert args.config_sources["backbone"].startswith("recipe paper-resnet: §4.1.1")
    assert tm.parse_args(["--recipe", "paper-resnet", "--domains", "sketch.yaml"]).epochs == 30  # a domains file
    domainnet = tm.parse_args(["--recipe", "paper-domainnet", *PAPER])
    assert domainnet.backbone == "resnet34" and domainnet.ranks == [1, 5, 10, 20, 30, 40]
    assert domainnet.optimizers["bn_head"].weight_decay == 1e-4 and domainnet.optimizers["ftn"].weight_decay == 0


def test_paper_clip_recipe_builds_the_papers_adapters():
    from peft import get_peft_model_state_dict

    from conftest import tiny_clip_classifier

    args = tm.parse_args(["--recipe", "paper-clip", *PAPER])
    assert args.backbone == "openai/clip-vit-base-patch32" and (args.epochs, args.batch_size) == (100, 64)
    assert args.optimizers["ftn"] == recipes.Optimizers("adam", 5e-6, "adam", 5e-6)
    labels = {label: targets for label, method, rank, targets in tm.method_labels(args)}
    assert labels == {"ftn_qv_r4": "qv", "ftn_o_r4": "o"}
    source = tiny_clip_classifier(num_labels=3)
    spec = SimpleNamespace(head_module="classifier", has_batchnorm=False)
    domain = SimpleNamespace(name="cifar", num_classes=5)
    for label, targets in labels.items():
        job = dict(method="ftn", rank=4, seed=0, targets=targets)
        model = tm.build_model(args, job, source, domain, spec)
        config = model.peft_config["cifar"]
        assert (config.r, config.alpha, config.init_weights, config.init_std) == (
            4, {"qv": 10.0, "o": 100.0}[targets], "gaussian", 0.05)
        names = {n.split(".")[-1] for n in config.target_modules}
        assert names == ({"q_proj", "v_proj"} if targets == "qv" else {"out_proj"})
        factors = torch.cat([v.flatten() for k, v in get_peft_model_state_dict(model, adapter_name="cifar").items()
                             if k.endswith(("ftn_a", "ftn_b", "ftn_c"))])
        assert abs(factors.std().item() - 0.05) < 0.01  # N(0, 0.05²) factors
        assert model(torch.zeros(1, 3, 32, 32)).logits.shape == (1, 5)


def test_every_recipe_value_names_its_source():
    keys = {name: set(r.flags) for name, r in recipes.RECIPES.items()}
    assert len({frozenset(k) for k in keys.values()}) == 1, keys  # every recipe sets the same flags
    for recipe in recipes.RECIPES.values():
        for entry in [*recipe.flags.values(), *recipe.optimizers.values()]:
            cited = re.search(r"§\d|A\.\d|Table \d", entry.source)
            assert cited or entry.source.startswith(recipes.NOT_IN_PAPER), entry
        assert set(recipe.optimizers) == set(tm.baselines.METHODS)  # any --methods works with any recipe
        assert recipe.name in recipes.describe(recipe)


def test_print_config_marks_given_and_recipe_values(capsys):
    tm.main(["--recipe", "paper-clip", "--epochs", "2", "--seed", "7", "--print_config"])
    out = capsys.readouterr().out
    assert "--epochs 2    # given\n" in out and "--seeds 7    # given (--seed)\n" in out
    assert "--ranks 4    # recipe paper-clip: §4.1.2" in out
    assert "--ftn_alpha qv=10,o=100    # recipe paper-clip: §4.1.2" in out


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "paper-vit"], "is not a recipe"),
    (["--recipe", "paper-resnet"], "pass your data"),
    (["--seed", "1", "--seeds", "1,2"], "--seed and --seeds both given"),
    (["--checkpointing_steps", "often"], 'or "epoch"'),
    (["--checkpointing_steps", "0"], 'or "epoch"'),
    (["--max_train_steps", "0"], "--max_train_steps must be >= 1"),
    (["--ftn_targets", "qv,o", "--ftn_alpha", "qv=10"], "no alpha for the FTN targets ['o']"),
    (["--ftn_alpha", "big"], "--ftn_alpha 'big'"),
    (["--ftn_targets", "queries"], "--ftn_targets has unknown ['queries']"),
    (["--ranks", "1,two"], "--ranks '1,two'"),
    (["--factor_lr", "0"], "--factor_lr must be > 0, got 0"),
    (["--momentum", "-0.5"], "--momentum must be >= 0, got -0.5"),
    (["--methods", ","], "--methods is empty"),
    (["--methods", "bn_head", "--push_to_hub"], "--push_to_hub uploads FTN adapters"),
])
def test_bad_flags_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit):
        tm.parse_args(argv)
    assert message in capsys.readouterr().err


def test_optimizer_groups_follow_the_recipe():
    from conftest import tiny_timm_resnet
    from peft import get_peft_model

    from ftn_peft import baselines, presets

    args = tm.parse_args(["--recipe", "paper-resnet", *PAPER])
    model = get_peft_model(tiny_timm_resnet(), presets.resnet(r=1, num_classes=3))
    optimizer, scheduler = tm.make_optimizer(model, args.optimizers["ftn"], 2.0, 10, "cosine")
    adam, sgd = optimizer.optimizers
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == pytest.approx(0.01)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["lr"] == pytest.approx(0.016)
    factors, heads = tm.optim.split_parameters(model)
    assert {id(p) for p in adam.param_groups[0]["params"]} == {id(p) for p in factors}
    assert {id(p) for p in sgd.param_groups[0]["params"]} == {id(p) for p in heads}
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == [0.0, 0.0]  # cosine to 0 over the job
    finetune = baselines.build("finetune", tiny_timm_resnet(), 3)
    optimizer, _ = tm.make_optimizer(finetune, args.optimizers["finetune"], 1.0, 10, "cosine")
    assert all(isinstance(o, torch.optim.SGD) for o in optimizer.optimizers)
    assert {g["momentum"] for o in optimizer.optimizers for g in o.param_groups} == {0.9}


class NoisyImages(Dataset):
    """A data set with random augmentation from all three RNGs a transform may use (torch, random, numpy)."""

    def __len__(self):
        return 23

    def __getitem__(self, i):
        noise = torch.rand(2).sum() + random.random() + np.random.rand()
        return torch.full((3,), float(i)) + noise, i % 3


def _batches(loader):
    return [x.clone() for x, _ in loader]


def test_resumed_epoch_sees_the_same_augmented_batches():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    full = _batches(accelerator.prepare_data_loader(tm.epoch_loader(NoisyImages(), 4, seed=3, epoch=1)))
    torch.manual_seed(123)  # whatever the caller's random state
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    loader = accelerator.prepare_data_loader(tm.epoch_loader(NoisyImages(), 4, seed=3, epoch=1))
    resumed = _batches(accelerator.skip_first_batches(loader, 2))
    assert len(full) == 6 and len(resumed) == 4
    assert all(torch.equal(a, b) for a, b in zip(full[2:], resumed))
    after = torch.get_rng_state(), random.getstate(), np.random.get_state()[1]
    # loading an epoch leaves the caller's random state as it was (a resumed run restores it for dropout)
    assert torch.equal(after[0], before[0]) and after[1] == before[1] and np.array_equal(after[2], before[2])
    other_epoch = _batches(tm.epoch_loader(NoisyImages(), 4, seed=3, epoch=2))
    assert not torch.equal(torch.cat(full).sort(0).values, torch.cat(other_epoch).sort(0).values)
    workers = _batches(tm.epoch_loader(NoisyImages(), 4, seed=3, epoch=1, num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(full, workers))  # augmentation does not depend on workers


def test_progress_to_a_file_is_one_line_per_job_without_bar_output():
    out = io.StringIO()
    jobs = [dict(label="ftn_r1", domain=d, seed=s, lr_scale=1.0) for d in ("a", "b") for s in (0, 1)]
    progress = Progress(len(jobs), bar=False, out=out)
    progress.skip(jobs[0])
    for job in jobs[1:]:
        progress.start(job)
        for step in range(1, 4):
            progress.step(step, 3)
        progress.finish(job, "val 50.0 %, test 40.0 %, 3 steps")
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0].startswith("[1/4] ftn_r1 × a × seed 0, lr ×1: done before")
    assert lines[3].startswith("[4/4] ftn_r1 × b × seed 1, lr ×1: val 50.0 %, test 40.0 %, 3 steps (")
    assert lines[3].endswith("ETA 0:00:00")


def test_progress_bar_on_a_terminal_keeps_the_job_lines_whole(capsys):
    out = io.StringIO()
    progress = Progress(2, bar=True, out=out)
    job = dict(label="bn_head", domain="a", seed=0, lr_scale=0.5)
    progress.start(job)
    progress.step(1, 1)
    progress.finish(job, "val 1.0 %, test 2.0 %, 1 steps")
    progress.close()
    assert out.getvalue().splitlines()[0].startswith("[1/2] bn_head × a × seed 0, lr ×0.5: val 1.0 %")
    bar = capsys.readouterr().err
    assert "job 1/2: bn_head × a × seed 0" in bar and "1/2" in bar


@pytest.mark.parametrize("name", ["paper-resnet", "paper-domainnet", "paper-clip"])
def test_docs_show_each_recipe_as_print_config_prints_it(name, capsys):
    tm.main(["--recipe", name, "--print_config"])
    printed = capsys.readouterr().out
    assert f"```text\n{printed}```" in (ROOT / "docs" / "training.md").read_text()


def test_a_training_split_without_length_is_refused_with_the_reason():
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(3), 0

    with pytest.raises(TypeError, match="needs a map-style Dataset"):
        tm.epoch_loader(Stream(), 4, seed=0, epoch=0)
