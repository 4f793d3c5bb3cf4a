"""The paper's recipe: Adam on factors, SGD on task BatchNorm + head, one cosine schedule, one optimizer object."""

import pytest
import torch
from peft import get_peft_model
from timm.models.resnet import BasicBlock, ResNet

import ftn_peft
from ftn_peft import optim


def ftn_model():
    torch.manual_seed(0)
    base = ResNet(block=BasicBlock, layers=[1, 1, 1, 1], channels=(4, 8, 8, 8), in_chans=1, num_classes=5)
    return get_peft_model(base, ftn_peft.presets.resnet(r=2, num_classes=3))


def test_split_puts_factors_and_norm_head_apart():
    model = ftn_model()
    factors, heads = optim.split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert factors and heads
    assert all(".ftn_a." in names[id(p)] or ".ftn_b." in names[id(p)] or ".ftn_c." in names[id(p)] for p in factors)
    assert all(".ftn_norm." in names[id(p)] or ".ftn_head." in names[id(p)] for p in heads)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in factors + heads} == trainable


def test_combined_step_equals_adam_plus_sgd_run_separately():
    model, reference = ftn_model(), ftn_model()
    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    opt, sched = optim.create_optimizer_and_scheduler(model, num_training_steps=4, factor_lr=0.01, head_lr=0.1)
    f_ref, h_ref = optim.split_parameters(reference)
    adam = torch.optim.Adam(f_ref, lr=0.01)
    sgd = torch.optim.SGD(h_ref, lr=0.1, momentum=0.9)
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4) for o in (adam, sgd)]
    for _ in range(3):
        for m, opts, schs in ((model, [opt], [sched]), (reference, [adam, sgd], scheds)):
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            for o in opts:
                o.step()
                o.zero_grad()
            for s in schs:
                s.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    # cosine: after 3 of 4 steps the lr is base * (1 + cos(3π/4)) / 2
    factor = (1 + torch.cos(torch.tensor(3 * torch.pi / 4))) / 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * float(factor))
    assert opt.optimizers[0].param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert isinstance(opt.optimizers[0], torch.optim.Adam) and isinstance(opt.optimizers[1], torch.optim.SGD)


def test_state_dict_round_trip():
    model = ftn_model()
    opt = optim.create_optimizer(model)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    opt.step()
    other = optim.create_optimizer(model)
    other.load_state_dict(opt.state_dict())
    a = opt.optimizers[0].state_dict()["state"][0]["exp_avg"]
    torch.testing.assert_close(other.optimizers[0].state_dict()["state"][0]["exp_avg"], a)


def test_errors_name_the_argument():
    model = ftn_model()
    with pytest.raises(ValueError, match="factor_lr"):
        optim.create_optimizer(model, factor_lr=0)
    with pytest.raises(ValueError, match="num_training_steps"):
        optim.create_optimizer_and_scheduler(model, num_training_steps=0)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        optim.create_optimizer(model)
