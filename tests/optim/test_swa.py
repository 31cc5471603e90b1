"""Stochastic weight averaging as torch.optim.swa_utils has it: AveragedModel, SWALR, update_bn."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

import functrain as ft
from functrain.schedules import from_torch, join, swalr
from tests.models import cross_entropy_loss_fn as loss_fn

START, STEPS, SWA_LR = 4, 12, 0.02


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def torch_swa(net):
    """The recipe of torch's docs, stepped per batch: SWALR and the average from step START."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, fused=True)
    scheduler = MultiStepLR(opt, milestones=[2], gamma=0.5)
    swa_model = AveragedModel(net)
    swa_scheduler = SWALR(opt, swa_lr=SWA_LR, anneal_epochs=3)
    for i, batch in enumerate(batches(STEPS)):
        opt.zero_grad()
        loss_fn(net, batch).backward()
        opt.step()
        if i >= START:
            swa_model.update_parameters(net)
            swa_scheduler.step()
        else:
            scheduler.step()
    return net, swa_model


def lr():
    before = from_torch(MultiStepLR, lr=0.1, milestones=[2], gamma=0.5)
    return join([before, swalr(SWA_LR, lr=before(START), anneal_epochs=3)], [START])


def functrain_swa(steps=STEPS):
    state = ft.TrainState.create(model(), ft.sgd(lr(), momentum=0.9), loss_fn, swa_start=START)
    for batch in batches(STEPS)[:steps]:
        state, _ = ft.train_step(state, batch)
    return state


def test_swa_and_swalr_match_torch_swa_utils_bit_for_bit():
    net, swa_model = torch_swa(model())
    state = functrain_swa()
    for name, p in net.named_parameters():
        assert torch.equal(state.params[name], p), name
    for name, p in swa_model.module.named_parameters():
        assert torch.equal(state.ema_params[name], p), name
    assert int(state.ema_state.averaged) == int(swa_model.n_averaged) == STEPS - START


def test_update_bn_on_the_exported_average_is_torchs(tmp_path):
    net, swa_model = torch_swa(model())
    loader = [x for x, _ in batches(5)]
    update_bn(loader, swa_model)
    exported = functrain_swa().export_module(use_ema=True)
    update_bn(loader, exported)
    for (name, b), theirs in zip(exported.named_buffers(), swa_model.module.buffers(), strict=True):
        assert torch.equal(b, theirs), name


def test_swa_resumes_from_a_checkpoint_bit_for_bit(tmp_path):
    straight = functrain_swa()
    state = functrain_swa(steps=START + 2)
    ft.save(state, tmp_path / "ckpt")
    template = ft.TrainState.create(model(), ft.sgd(lr(), momentum=0.9), loss_fn, swa_start=START)
    state = ft.load(tmp_path / "ckpt", like=template)
    for batch in batches(STEPS)[START + 2 :]:
        state, _ = ft.train_step(state, batch)
    ft.testing.assert_states_equal(state, straight)


def test_a_checkpoint_without_swa_is_refused_under_swa(tmp_path):
    plain = ft.TrainState.create(model(), ft.sgd(0.1), loss_fn, ema_decay=0.9)
    ft.save(plain, tmp_path / "ckpt")
    swa = ft.TrainState.create(model(), ft.sgd(0.1), loss_fn, swa_start=START)
    with pytest.raises(ft.StateMismatchError, match="step options differ"):
        ft.load(tmp_path / "ckpt", like=swa)


def test_swa_start_and_ema_decay_are_refused_together():
    with pytest.raises(
        ft.ConfigError, match="ema_decay and swa_start both ask for the state's one"
    ):
        ft.TrainState.create(model(), ft.sgd(0.1), loss_fn, swa_start=3, ema_decay=0.9)


def test_from_torch_swalr_is_swalr():
    s = from_torch(SWALR, lr=0.1, swa_lr=SWA_LR, anneal_epochs=3)
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, fused=True)
    scheduler = SWALR(opt, swa_lr=SWA_LR, anneal_epochs=3)
    for k in range(8):
        assert s(k) == opt.param_groups[0]["lr"] == float(s(torch.tensor(k)))
        opt.step()
        scheduler.step()


def test_from_torch_optimizer_continues_a_live_swalr():
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, fused=True)
    before = MultiStepLR(opt, milestones=[2], gamma=0.5)
    for batch in batches(START):  # the recipe's first phase, then SWALR built late
        opt.zero_grad()
        loss_fn(net, batch).backward()
        opt.step()
        before.step()
    swa_scheduler = SWALR(opt, swa_lr=SWA_LR, anneal_epochs=3)
    converted = ft.from_torch_optimizer(opt, net, scheduler=swa_scheduler)
    state = converted.create_state(net, loss_fn)
    for batch in batches(STEPS)[START:]:
        state, _ = ft.train_step(state, batch)
        opt.zero_grad()
        loss_fn(net, batch).backward()
        opt.step()
        swa_scheduler.step()
    for name, p in net.named_parameters():
        assert torch.equal(state.params[name], p), name


def test_the_documented_once_an_epoch_recipe_is_the_loop_own_average_not_swa_start():
    """torch's docs average once an epoch: the loop keeps that average, swa_start is another."""
    epochs, per_epoch, first = 6, 3, 2
    net, data = model(), batches(per_epoch)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, fused=True)
    swa_model = AveragedModel(net)
    scheduler = MultiStepLR(opt, milestones=[2], gamma=0.5)
    swa_scheduler = SWALR(opt, swa_lr=SWA_LR, anneal_epochs=2)
    for epoch in range(epochs):
        for batch in data:
            opt.zero_grad()
            loss_fn(net, batch).backward()
            opt.step()
        if epoch > first:
            swa_model.update_parameters(net)
            swa_scheduler.step()
        else:
            scheduler.step()

    before = from_torch(MultiStepLR, lr=0.1, milestones=[2], gamma=0.5)
    switch = first + 1
    by_epoch = join([before, swalr(SWA_LR, lr=before(switch), anneal_epochs=2)], [switch])
    rate = ft.schedules.per_epoch(by_epoch, steps_per_epoch=per_epoch)
    state = ft.TrainState.create(model(), ft.sgd(rate, momentum=0.9), loss_fn)
    average = AveragedModel(state.export_module())
    every_update = ft.TrainState.create(
        model(), ft.sgd(rate, momentum=0.9), loss_fn, swa_start=switch * per_epoch
    )
    for epoch in range(epochs):
        for batch in data:
            state, _ = ft.train_step(state, batch)
            every_update, _ = ft.train_step(every_update, batch)
        if epoch > first:
            average.update_parameters(state.export_module())
    for (name, p), theirs in zip(
        average.module.named_parameters(), swa_model.module.parameters(), strict=True
    ):
        assert torch.equal(p, theirs), name
    assert int(average.n_averaged) == int(swa_model.n_averaged) == epochs - first - 1
    assert not torch.equal(every_update.ema_params["0.weight"], swa_model.module[0].weight)
