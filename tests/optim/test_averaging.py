"""The EMA's conventions, bit for bit with the loops they are named after.

``ema_convention="torch"`` against `torch.optim.swa_utils.AveragedModel` with
``get_ema_multi_avg_fn`` (with and without ``use_buffers``), ``"diffusers"`` against diffusers'
``EMAModel`` itself (its settings, with and without its warm-up), ``"timm"`` against timm's
``ModelEmaV3`` updated with ``step=`` the updates taken (its algorithm written out below as
`TimmEmaReference`, and against timm itself where it is importable), functrain's own against
timm's ``update(model)`` without ``step=`` (the average from the initial weights), on a model with
BatchNorm: over several steps with a checkpoint round trip in the middle, pure and donated, and
the EMA that evaluation, `predict` and `export_module` use equal to the reference's averaged
module, buffers included. A checkpoint written before the conventions (commit ae23ff1) resumes as
it was written.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import functrain as ft
from functrain.errors import ConfigError, StateMismatchError
from functrain.optim import averaging
from tests.comparisons import assert_trees_equal
from tests.earlier import assert_exact_leaves_equal, writer
from tests.models import cross_entropy_loss_fn as loss_fn

DECAY, LR, STEPS, SAVED_AT = 0.9, 1e-2, 7, 3


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


class TimmEmaReference:
    """timm's ``ModelEmaV3`` as its documentation and source describe it (foreach path).

    A copy of the model, in eval mode. ``update(model, step)``: the decay is 0 while
    ``step <= update_after_step + 1`` (the average becomes the weights: a lerp of weight 1), then
    ``decay``, or with ``use_warmup`` ``1 - (1 + s / gamma) ** -power`` at ``s = step -
    update_after_step - 1``, held within ``[min_decay, decay]``; ``step=None`` always ``decay``.
    Every floating tensor of the state dict (parameters and buffers) moves by one
    ``_foreach_lerp_`` of weight ``1 - decay``; integer ones are copied. With
    ``exclude_buffers``, the parameters move and every buffer is copied.
    """

    def __init__(
        self,
        net: nn.Module,
        decay: float,
        update_after_step: int = 0,
        use_warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        min_decay: float = 0.0,
        exclude_buffers: bool = False,
    ) -> None:
        self.module = copy.deepcopy(net).eval()
        self.decay, self.after, self.use_warmup = decay, update_after_step, use_warmup
        self.gamma, self.power, self.min_decay = warmup_gamma, warmup_power, min_decay
        self.exclude_buffers = exclude_buffers

    def decay_at(self, step: int | None) -> float:
        if step is None:
            return self.decay
        s = max(0, step - self.after - 1)
        if s <= 0:
            return 0.0
        if not self.use_warmup:
            return self.decay
        ramp = 1 - (1 + s / self.gamma) ** -self.power
        return max(min(ramp, self.decay), self.min_decay)

    @torch.no_grad()
    def update(self, net: nn.Module, step: int | None = None) -> None:
        weight = 1.0 - self.decay_at(step)
        if self.exclude_buffers:
            torch._foreach_lerp_(list(self.module.parameters()), list(net.parameters()), weight)
            for mine, theirs in zip(self.module.buffers(), net.buffers(), strict=True):
                mine.copy_(theirs)
            return
        pairs = zip(self.module.state_dict().values(), net.state_dict().values(), strict=True)
        lerped: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for mine, theirs in pairs:
            if mine.is_floating_point():
                lerped[0].append(mine)
                lerped[1].append(theirs)
            else:
                mine.copy_(theirs)
        torch._foreach_lerp_(lerped[0], lerped[1], weight)


class WithoutStep(TimmEmaReference):
    """timm's ``update(model)`` called without ``step=`` (functrain's own convention)."""

    def update(self, net: nn.Module, step: int | None = None) -> None:
        super().update(net)


class DiffusersEma:
    """diffusers' ``EMAModel`` itself (its default ``foreach=False``), stepped after each update;
    its `module`: the model with the averaged parameters and, as diffusers keeps none, the live
    buffers."""

    def __init__(self, net: nn.Module, decay: float, **settings: Any) -> None:
        from diffusers.training_utils import EMAModel

        self.net, self.ema = net, EMAModel(net.parameters(), decay=decay, **settings)

    def update(self, net: nn.Module, step: int | None = None) -> None:
        self.ema.step(net.parameters())

    @property
    def module(self) -> nn.Module:
        averaged = copy.deepcopy(self.net)
        self.ema.copy_to(averaged.parameters())
        return averaged


# name: (create's EMA options, the reference's averager of a model, whether it takes step=)
CONVENTIONS: dict[str, tuple[dict[str, Any], Any, bool]] = {
    "functrain": ({}, lambda net: WithoutStep(net, DECAY, exclude_buffers=True), True),
    "functrain-buffers": ({"ema_buffers": True}, lambda net: WithoutStep(net, DECAY), True),
    "torch": (
        {"ema_convention": "torch"},
        lambda net: AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(DECAY)),
        False,
    ),
    "torch-use-buffers": (
        {"ema_convention": "torch", "ema_buffers": True},
        lambda net: AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True),
        False,
    ),
    "timm": ({"ema_convention": "timm"}, lambda net: TimmEmaReference(net, DECAY), True),
    "timm-warmup": (
        {"ema_convention": "timm", "ema_warmup": True},
        lambda net: TimmEmaReference(net, 0.99, use_warmup=True),
        True,
    ),
    "timm-warmup-settings": (
        {
            "ema_convention": "timm",
            "ema_warmup": True,
            "ema_update_after_step": 2,
            "ema_warmup_power": 3 / 4,
            "ema_warmup_gamma": 2.0,
            "ema_min_decay": 0.3,
        },
        lambda net: TimmEmaReference(
            net,
            0.99,
            update_after_step=2,
            use_warmup=True,
            warmup_power=3 / 4,
            warmup_gamma=2.0,
            min_decay=0.3,
        ),
        True,
    ),
    "timm-update-after-step": (
        {"ema_convention": "timm", "ema_update_after_step": 2},
        lambda net: TimmEmaReference(net, DECAY, update_after_step=2),
        True,
    ),
    "timm-exclude-buffers": (
        {"ema_convention": "timm", "ema_buffers": False},
        lambda net: TimmEmaReference(net, DECAY, exclude_buffers=True),
        True,
    ),
    "diffusers": ({"ema_convention": "diffusers"}, lambda net: DiffusersEma(net, DECAY), True),
    "diffusers-update-after-step": (
        {"ema_convention": "diffusers", "ema_update_after_step": 2, "ema_min_decay": 0.5},
        lambda net: DiffusersEma(net, DECAY, update_after_step=2, min_decay=0.5),
        True,
    ),
    # timm's ModelEmaV3 takes a min_decay above decay: with its warm-up, every decay is min_decay
    "timm-min-decay-above-decay": (
        {"ema_convention": "timm", "ema_warmup": True, "ema_min_decay": 0.995},
        lambda net: TimmEmaReference(net, 0.99, use_warmup=True, min_decay=0.995),
        True,
    ),
    # diffusers takes a min_decay above decay: every decay after update_after_step is min_decay
    "diffusers-min-decay-above-decay": (
        {"ema_convention": "diffusers", "ema_update_after_step": 1, "ema_min_decay": 0.95},
        lambda net: DiffusersEma(net, DECAY, update_after_step=1, min_decay=0.95),
        True,
    ),
    "diffusers-warmup": (
        {"ema_convention": "diffusers", "ema_warmup": True},
        lambda net: DiffusersEma(net, 0.99, use_ema_warmup=True),
        True,
    ),
    "diffusers-warmup-settings": (
        {
            "ema_convention": "diffusers",
            "ema_warmup": True,
            "ema_update_after_step": 1,
            "ema_warmup_power": 3 / 4,
            "ema_warmup_gamma": 2.0,
            "ema_min_decay": 0.3,
        },
        lambda net: DiffusersEma(
            net,
            0.99,
            update_after_step=1,
            use_ema_warmup=True,
            power=3 / 4,
            inv_gamma=2.0,
            min_decay=0.3,
        ),
        True,
    ),
}


def decay_of(name: str) -> float:
    return 0.99 if "warmup" in name else DECAY


def reference(
    name: str, steps: int = STEPS, skipped: int = 0, device: str = "cpu"
) -> tuple[nn.Module, nn.Module]:
    """The hand-written loop: AdamW, then the convention's averager after each update.

    `skipped`: batches whose update was skipped before the loop's (their forwards counted in
    ``num_batches_tracked``; their non-finite statistics not kept).
    """
    net = model().to(device)
    opt = torch.optim.AdamW(net.parameters(), LR, fused=True)
    averager = CONVENTIONS[name][1](net)
    net[1].num_batches_tracked += skipped
    for step, batch in enumerate(batches(steps), start=1):
        loss_fn(net, tuple(t.to(device) for t in batch)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if CONVENTIONS[name][2]:
            averager.update(net, step=step)
        else:
            averager.update_parameters(net)
    return net, averager.module


def create(name: str, seed: int = 0, **options: Any) -> ft.TrainState:
    return ft.TrainState.create(
        model(seed),
        ft.adamw(LR),
        loss_fn,
        ema_decay=decay_of(name),
        **CONVENTIONS[name][0],
        **options,
    )


def trained(name: str, donate: bool, tmp_path: Path) -> ft.TrainState:
    """The functrain run, saved after `SAVED_AT` updates and continued from the loaded copy."""
    state = create(name)
    for i, batch in enumerate(batches()):
        if i == SAVED_AT:
            path = ft.save(state, tmp_path / "ckpt")
            state = ft.load(path, like=create(name))
        given, before = state, None if donate else state.clone()
        state, _ = ft.train_step(state, batch, donate=donate)
        if before is not None:
            assert ft.diff_states(before, given) == [], "a pure step wrote its input"
    return state


def tensors(net: nn.Module | None) -> dict[str, torch.Tensor]:
    assert net is not None
    return {k: v.detach() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_the_ema_of_a_convention_is_its_loops_average_bit_for_bit(
    name: str, donate: bool, tmp_path: Path
) -> None:
    state = trained(name, donate, tmp_path)
    assert state.program is not None  # the step program ran it
    net, averaged = reference(name)
    assert_trees_equal(tensors(net), tensors(state.export_module()), "weights")
    # the weights and buffers that evaluation and export use: the reference's averaged module
    assert_trees_equal(tensors(averaged), tensors(state.export_module(use_ema=True)), "EMA")
    batch = batches(STEPS + 1)[-1]
    with torch.no_grad():
        expected = loss_fn(averaged.eval(), batch)
        logits = averaged(batch[0])
    assert torch.equal(ft.eval_step(state, batch, use_ema=True)["loss"], expected)
    assert torch.equal(ft.predict(state, batch[0], use_ema=True), logits)


@pytest.mark.parametrize("name", ["torch-use-buffers", "timm-update-after-step"])
def test_a_skipped_update_neither_counts_nor_moves_the_average(name: str) -> None:
    # the first batch is non-finite: its update is skipped, so the next one is the first the
    # average takes (torch's copy, timm's step 1); the loop never sees the skipped batch
    x, y = batches(1)[0]
    bad = (torch.full_like(x, float("nan")), y)
    state = create(name)
    for batch in [bad, *batches()]:
        state, _ = ft.train_step(state, batch, donate=True)
    assert int(state.skipped) == 1
    _, averaged = reference(name, skipped=1)
    assert_trees_equal(tensors(averaged), tensors(state.export_module(use_ema=True)))


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize(
    "name", ["torch-use-buffers", "timm-warmup-settings", "diffusers-min-decay-above-decay"]
)
def test_the_path_of_a_counter_not_on_the_host_averages_the_same(
    name: str, donate: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what an accelerator's step runs (its counter is not read): the first update's copy as a
    # select, timm's decay in float64 tensor ops; here on the CPU, against the same loops
    monkeypatch.setattr(averaging, "_host_count", lambda count: None)
    state = trained(name, donate, tmp_path)
    _, averaged = reference(name)
    assert_trees_equal(tensors(averaged), tensors(state.export_module(use_ema=True)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["torch-use-buffers", "timm-warmup", "timm-update-after-step"])
def test_the_ema_of_a_convention_is_its_loops_average_on_cuda(name: str) -> None:
    # on a GPU the counter is not read on the host: the copy is a select, timm's decay float64 ops
    state = ft.TrainState.create(
        model().cuda(), ft.adamw(LR), loss_fn, ema_decay=decay_of(name), **CONVENTIONS[name][0]
    )
    for batch in batches():
        state, _ = ft.train_step(state, tuple(t.cuda() for t in batch), donate=True)
    _, averaged = reference(name, device="cuda")
    assert_trees_equal(tensors(averaged), tensors(state.export_module(use_ema=True)))


def test_the_averaged_buffers_differ_from_the_live_ones() -> None:
    # the test above would not see a buffer left live: here they are apart
    state = create("timm")
    for batch in batches():
        state, _ = ft.train_step(state, batch)
    assert state.ema_buffers is not None
    live, averaged = state.buffers["1.running_var"], state.ema_buffers["1.running_var"]
    assert (live - averaged).abs().max() > 1e-3
    assert torch.equal(state.ema_buffers["1.num_batches_tracked"], torch.tensor(STEPS))


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", ["torch-use-buffers", "timm-warmup"])
def test_a_stacked_state_averages_each_members_weights_as_its_loop(name: str, donate: bool) -> None:
    # each member's average is the convention's loop over that member's own weights (a stacked
    # step's weights are not an unstacked step's bit for bit: vmap sums in another order)
    stacked = ft.stack([create(name, seed=k) for k in range(2)])
    averagers = [CONVENTIONS[name][1](m.export_module()) for m in ft.unstack(stacked)]
    data = batches(8)
    for step, pair in enumerate(zip(data[:4], data[4:], strict=True), start=1):
        given = ft.PerMember(tuple(torch.stack(t) for t in zip(*pair, strict=True)))
        stacked, _ = ft.train_step(stacked, given, donate=donate)
        for averager, member in zip(averagers, ft.unstack(stacked), strict=True):
            net = member.export_module()
            if CONVENTIONS[name][2]:
                averager.update(net, step=step)
            else:
                averager.update_parameters(net)
    for averager, member in zip(averagers, ft.unstack(stacked), strict=True):
        assert_trees_equal(tensors(averager.module), tensors(member.export_module(use_ema=True)))


@pytest.mark.parametrize("name", ["torch-use-buffers", "timm-warmup"])
def test_a_compiled_step_averages_as_the_eager_step(name: str) -> None:
    step = ft.compile_step(backend="aot_eager")
    eager, compiled = create(name), create(name)
    for batch in batches(4):
        eager, _ = ft.train_step(eager, batch)
        compiled, _ = step(compiled, batch)
    assert_trees_equal(eager.ema_state, compiled.ema_state)


@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_a_sharded_state_averages_its_slices_and_whole_buffers(tmp_path: Path) -> None:
    alone = create("timm")
    for batch in batches(4):
        alone, _ = ft.train_step(alone, batch)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        sharded = create("timm", sharding="full")
        for batch in batches(4):
            sharded, _ = ft.train_step(sharded, batch)
        module = sharded.export_module(use_ema=True)
    finally:
        dist.destroy_process_group()
    assert module is not None
    assert_trees_equal(tensors(alone.export_module(use_ema=True)), tensors(module))


def test_load_weights_starts_the_averaged_buffers_from_the_loaded_ones(tmp_path: Path) -> None:
    trained_state = create("timm")
    for batch in batches(2):
        trained_state, _ = ft.train_step(trained_state, batch)
    path = ft.save(trained_state, tmp_path / "weights")
    warm = ft.load_weights(path, into=create("timm"))
    assert warm.ema_buffers is not None
    assert_trees_equal(dict(trained_state.buffers), warm.ema_buffers)
    assert_trees_equal(dict(trained_state.params), warm.ema_params)


def test_a_checkpoint_of_one_convention_is_refused_under_another(tmp_path: Path) -> None:
    state, _ = ft.train_step(create("timm"), batches(1)[0])
    path = ft.save(state, tmp_path / "timm")
    words = "ema_buffers=True in the checkpoint, False in the template; ema_convention='timm' in"
    with pytest.raises(StateMismatchError, match=words) as caught:
        ft.load(path, like=create("torch"))
    assert "in the checkpoint but not in the template: ['ema_state/buffers/0'" in str(caught.value)


def continued(state: ft.TrainState, batches: list[Any]) -> ft.TrainState:
    """`state` stepped over `batches`."""
    for batch in batches:
        state, _ = ft.train_step(state, batch)
    return state


def test_a_checkpoint_written_before_the_conventions_resumes_as_it_was_written() -> None:
    golden = writer(Path(__file__).parent / "golden" / "make_ema.py")
    saved = golden.HERE / "saved"
    state = continued(ft.load(saved, like=golden.run()), golden.batches()[3:])
    assert state.options.ema_convention == "functrain"
    assert state.ema_state.buffers == ()
    # the same tensors continued here with the convention it trained under asked for: that run
    asked = ft.TrainState.create(
        model(),
        ft.adamw(1e-2),
        golden.loss_fn,
        ema_decay=0.9,
        ema_warmup=True,
        ema_convention="functrain",
        ema_buffers=False,
    )
    asked = continued(ft.load(saved, like=asked), golden.batches()[3:])
    assert_trees_equal(asked.tree(), state.tree())
    assert_exact_leaves_equal(ft.load(golden.HERE / "continued", like=golden.run()), state)
    # a template of another convention is refused, naming it
    timm = ft.TrainState.create(
        model(), ft.adamw(1e-2), golden.loss_fn, ema_decay=0.9, ema_convention="timm"
    )
    with pytest.raises(StateMismatchError, match="step options differ"):
        ft.load(golden.HERE / "saved", like=timm)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"ema_decay": 0.9, "ema_convention": "keras"}, "ema_convention must be 'functrain'"),
        (
            {"ema_decay": 0.9, "ema_convention": "torch", "ema_warmup": True},
            "AveragedModel has no warm-up",
        ),
        ({"ema_decay": 0.9, "ema_update_after_step": 3}, "ema_update_after_step: timm's"),
        ({"ema_convention": "timm"}, "ema_convention set how an EMA averages.*give ema_decay="),
        ({"swa_start": 2, "ema_buffers": True}, "swa_start's equal average .*update_bn"),
        ({"ema_decay": 0.9, "ema_convention": "timm", "ema_warmup_gamma": 0}, "must be > 0"),
        # the warm-up's settings without the warm-up would be read by nothing
        (
            {"ema_decay": 0.9, "ema_convention": "timm", "ema_min_decay": 0.5},
            "ema_min_decay: timm's warm-up settings.*give ema_warmup=True",
        ),
        (
            {"ema_decay": 0.9, "ema_convention": "timm", "ema_update_after_step": -3},
            r"ema_update_after_step must be an int >= 0, got ema_update_after_step=-3",
        ),
        (
            {
                "ema_decay": 0.9,
                "ema_convention": "timm",
                "ema_warmup": True,
                "ema_warmup_power": True,
            },
            "ema_warmup_power must be > 0, got ema_warmup_power=True",
        ),
        (
            {"ema_decay": 0.9, "ema_warmup": True, "ema_min_decay": 0.95},
            "ema_min_decay=0.95 is above ema_decay=0.9",
        ),
        (
            {"ema_decay": 0.9, "ema_convention": "diffusers", "ema_buffers": True},
            "ema_buffers=True: diffusers' EMAModel averages the parameters alone",
        ),
        (
            {"ema_decay": 0.9, "ema_convention": "diffusers", "ema_warmup_power": 0.5},
            r"ema_warmup_power: diffusers' warm-up settings \(power, inv_gamma\).*ema_warmup=True",
        ),
        (
            {"ema_decay": 0.9, "ema_convention": "torch", "ema_min_decay": 0.5},
            "ema_min_decay: timm's ModelEmaV3 and diffusers' EMAModel settings",
        ),
    ],
)
def test_ema_settings_out_of_their_convention_are_refused(options: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        ft.TrainState.create(model(), ft.adamw(LR), loss_fn, **options)


def test_the_timm_reference_is_timms_own_model_ema_v3() -> None:
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    for kwargs in ({}, {"use_warmup": True, "update_after_step": 1}, {"exclude_buffers": True}):
        nets = [model(), model()]
        opts = [torch.optim.AdamW(n.parameters(), LR, fused=True) for n in nets]
        theirs = timm_ema.ModelEmaV3(nets[0], decay=DECAY, **kwargs)
        ours = TimmEmaReference(nets[1], DECAY, **kwargs)
        for step, batch in enumerate(batches(), start=1):
            for net, opt in zip(nets, opts, strict=True):
                loss_fn(net, batch).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            theirs.update(nets[0], step=step)
            ours.update(nets[1], step=step)
        assert_trees_equal(tensors(theirs.module), tensors(ours.module))


def test_torchvisions_average_of_bfloat16_weights_in_a_donated_step_is_its_references() -> None:
    """torchvision's ``decay * avg + (1 - decay) * p``: the product taken in place rounded a
    bfloat16 average otherwise than torch's ``decay * avg`` (every weight off in a donated step)."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).bfloat16()

    def bf16_loss(model: Any, batch: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[0]).float(), batch[1])

    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(4, 6, generator=gen).bfloat16(), torch.randint(0, 3, (4,), generator=gen))
        for _ in range(4)
    ]
    decay = 0.8
    for donate in (False, True):
        state = ft.TrainState.create(
            make(), ft.sgd(0.1), bf16_loss, ema_decay=decay, ema_convention="torchvision"
        )
        live = make()
        reference = AveragedModel(
            live, avg_fn=lambda a, p, n: decay * a + (1 - decay) * p, use_buffers=True
        )
        for batch in data:
            state, _ = ft.train_step(state, batch, donate=donate)
            with torch.no_grad():
                for name, p in live.named_parameters():
                    p.copy_(state.params[name])
            reference.update_parameters(live)
        for a, r in zip(state.ema_state.average, reference.module.parameters(), strict=True):
            assert torch.equal(a, r), donate


def test_an_int_decay_of_0_averages_as_torchs_lerp_by_1() -> None:
    """``ema_decay=0``, an int: each update's weight ``1 - 0`` lerped as a number (it was handed
    to the tensor form, which has no ``.to`` for an int)."""
    for donate in (False, True):
        torch.manual_seed(0)
        state = ft.TrainState.create(model(), ft.sgd(LR), loss_fn, ema_decay=0)
        average = [p.detach().clone() for p in state.params.values()]
        for batch in batches(3):
            state, _ = ft.train_step(state, batch, donate=donate)
            torch._foreach_lerp_(average, [p.detach() for p in state.params.values()], 1.0)
        exported = dict(state.export_module(use_ema=True).named_parameters())
        for name, expected in zip(state.params, average, strict=True):
            assert torch.equal(exported[name], expected), name
