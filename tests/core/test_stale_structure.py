"""What a state keeps of its module stays true to it: the structure, the program, the buffers.

A state created again from a module changed since (a hook registered or removed, a parameter
frozen, a mode or an attribute set) runs the module as it is now, as a state of a fresh copy of it
does, and exports it so; a module left as it was shares its structure. A state's own module is the
structure its states share: replacing a submodule there is refused, naming the fix, while a module
kept as it is (one that cannot be copied) may change, and its step follows. A buffer the forward
writes from the graph comes out of every step kind detached, with its bits.
"""

from __future__ import annotations

import copy
import gc
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.core.body import train_body
from functrain.core.donation import step_in_scope
from functrain.errors import ConfigError, StateMismatchError
from functrain.optim.base import Transform
from tests.comparisons import assert_batched_trees_equal, assert_trees_equal
from tests.models import cross_entropy_loss_fn as loss_fn


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)


def _double(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    return out * 2


def _halve_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (args[0] * 0.5,)


def _no_input_gradient(module: nn.Module, grad_in: Any, grad_out: Any) -> tuple[Any, ...]:
    return (torch.zeros_like(grad_in[0]),)


# a change to the module after its first state; "removed": a hook registered before, removed after
CHANGES: dict[str, Callable[[nn.Sequential], Any]] = {
    "forward_hook": lambda net: net[3].register_forward_hook(_double),
    "forward_pre_hook": lambda net: net.register_forward_pre_hook(_halve_input),
    "full_backward_hook": lambda net: net[3].register_full_backward_hook(_no_input_gradient),
    "forward_hook_removed": lambda net: net[3].register_forward_hook(_double),
    "gradient_hook_removed": lambda net: net[0].bias.register_hook(lambda g: g * 0),
    "dropout_eval": lambda net: net[2].eval(),
    "dropout_p": lambda net: setattr(net[2], "p", 0.0),
    "requires_grad": lambda net: net[0].weight.requires_grad_(False),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_state_created_again_after_the_module_changed_runs_it_as_it_is_now(change: str) -> None:
    net = make_net()
    handle = CHANGES[change](net) if change.endswith("_removed") else None
    first = ft.TrainState.create(net, ft.sgd(0.5), loss_fn, seed=3)
    if handle is not None:
        handle.remove()
    else:
        CHANGES[change](net)
    again = ft.TrainState.create(net, ft.sgd(0.5), loss_fn, seed=3)
    fresh = ft.TrainState.create(copy.deepcopy(net), ft.sgd(0.5), loss_fn, seed=3)
    got, got_m = ft.train_step(again, batch())
    want, want_m = ft.train_step(fresh, batch())
    assert_trees_equal(want.tree(), got.tree(), "state")
    assert_trees_equal(want_m, got_m, "metrics")
    assert again.module is not first.module  # (a frozen weight trains alike: its export differs)


class Scaled(nn.Module):
    """A linear layer times a plain tensor attribute (neither a parameter nor a buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.scale = torch.tensor(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def test_a_state_created_again_after_a_tensor_attribute_was_written_in_place_reads_it_now() -> None:
    """A structure holds a copy of the values of a plain tensor attribute: one written in place
    since (its version moved) is copied again, as a fresh copy of the module would hold it."""
    torch.manual_seed(0)
    net = Scaled()
    ft.TrainState.create(net, ft.sgd(0.5), loss_fn)
    net.scale.mul_(3.0)
    again = ft.TrainState.create(net, ft.sgd(0.5), loss_fn)
    fresh = ft.TrainState.create(copy.deepcopy(net), ft.sgd(0.5), loss_fn)
    got, got_m = ft.train_step(again, batch())
    want, want_m = ft.train_step(fresh, batch())
    assert_trees_equal(want.tree(), got.tree(), "state")
    assert_trees_equal(want_m, got_m, "metrics")


def test_a_module_left_as_it_was_shares_its_structure_and_is_not_kept_alive() -> None:
    class Hooked(nn.Linear):
        def scaled(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            return out * 2

    net = Hooked(3, 2)
    net.register_forward_hook(net.scaled)  # a bound method: holds the module
    states = [ft.TrainState.create(net, ft.sgd(0.1), lambda m, x: m(x).sum()) for _ in range(2)]
    assert states[0].module is states[1].module
    alive = weakref.ref(net)
    del net
    gc.collect()
    assert alive() is None


def test_a_state_created_again_after_freezing_a_parameter_exports_it_frozen() -> None:
    net = make_net()
    ft.TrainState.create(net, ft.sgd(0.5), loss_fn)
    net[0].bias.requires_grad_(False)
    state = ft.TrainState.create(net, ft.sgd(0.5), loss_fn)
    exported = state.export_module()
    assert {n: p.requires_grad for n, p in exported.named_parameters()} == {
        "0.weight": True,
        "0.bias": False,
        "3.weight": True,
        "3.bias": True,
    }
    assert list(state.frozen) == ["0.bias"]


def test_replacing_a_submodule_of_a_states_module_is_refused_naming_export_module() -> None:
    net = nn.Sequential(nn.Linear(6, 8), nn.Sequential(nn.Tanh(), nn.Dropout(0.5)))
    state = ft.TrainState.create(net, ft.sgd(0.5), loss_fn)
    state, _ = ft.train_step(state, batch())
    with pytest.raises(ConfigError, match=r"submodule '1'.*state\.export_module\(\)"):
        state.module[1] = nn.Identity()
    with pytest.raises(ConfigError, match=r"submodule '1' of a TrainState's module to NoneType"):
        state.module[1][1] = None
    assert type(state.module[1][1]) is nn.Dropout
    # the user's module and an exported one are the user's to change
    net[1] = nn.Identity()
    exported = state.export_module()
    exported[1][1] = nn.Dropout(0.1)
    assert exported[1][1].p == 0.1


def _qat_net() -> nn.Module:
    from torch.ao import quantization as q

    torch.manual_seed(0)
    net = nn.Sequential(q.QuantStub(), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3), q.DeQuantStub())
    net.qconfig = q.get_default_qat_qconfig("fbgemm")
    return q.prepare_qat(net.train())


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_a_write_into_a_states_module_outside_a_step_is_refused_not_lost() -> None:
    # torchvision's QAT reference turns the observers off after some epochs:
    # model.apply(disable_observer); on state.module the write would land in meta tensors
    from torch.ao.quantization import disable_observer

    batches = [batch(seed) for seed in range(4)]
    model = _qat_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for i, b in enumerate(batches):
        if i == 2:
            model.apply(disable_observer)
        loss_fn(model, b).backward()
        opt.step()
        opt.zero_grad()
    state = ft.TrainState.create(_qat_net(), ft.sgd(0.5), loss_fn)
    for b in batches[:2]:
        state, _ = ft.train_step(state, b)
    state.module.apply(disable_observer)
    before = state.clone()
    with pytest.raises(ConfigError, match=r"'1\.weight_fake_quant\.observer_enabled'.*was lost"):
        ft.train_step(state, batches[2])
    assert ft.diff_states(before, state) == []
    # the fix the message names: the state's buffers, as torch's loop has them
    off = {
        k: torch.zeros_like(v) for k, v in state.buffers.items() if k.endswith("observer_enabled")
    }
    state = state.replace(buffers={**state.buffers, **off})
    for b in batches[2:]:
        state, _ = ft.train_step(state, b)
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert_trees_equal(
        {k: v.detach() for k, v in expected.items()}, {**state.params, **state.buffers}
    )


def test_pruning_a_states_module_is_refused_naming_the_changed_tensors() -> None:
    from torch.nn.utils import prune

    state = ft.TrainState.create(make_net(), ft.adamw(1e-2), loss_fn)
    state, _ = ft.train_step(state, batch())
    prune.l1_unstructured(state.module[0], "weight", amount=0.5)
    before = state.clone()
    match = r"\['0\.weight'\] that its module no longer has.*\['0\.weight_mask', '0\.weight_orig'\]"
    with pytest.raises(StateMismatchError, match=match + r".*state\.export_module\(\)"):
        ft.train_step(state, batch(2))
    assert ft.diff_states(before, state) == []


class _Locked(nn.Module):
    """A module that cannot be deep-copied (it holds a lock): a state runs it as it is."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 3)
        self.drop = nn.Dropout(0.5)
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.lin(x))


def test_a_submodule_swapped_into_a_module_kept_as_it_is_takes_the_steps_mode() -> None:
    net = _Locked().eval()
    state = ft.TrainState.create(net, ft.sgd(0.5), loss_fn, seed=3)
    assert state.module is net
    state, _ = ft.train_step(state, batch(1))
    net.drop = nn.Dropout(0.5).eval()  # the step puts it in train mode, as net.train() does
    got, got_m = ft.train_step(state, batch(2))
    want, want_m = ft.train_step(state.replace(), batch(2))  # decided afresh
    assert_trees_equal(want.tree(), got.tree(), "state")
    assert_trees_equal(want_m, got_m, "metrics")
    assert not net.drop.training


class _Running(nn.Module):
    """A forward that writes its buffer from activations outside ``torch.no_grad``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 3)
        self.register_buffer("running", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        self.running.mul_(0.9).add_(0.1 * y.mean(0))
        return y


def _stepped(kind: str) -> tuple[ft.TrainState, list[torch.Tensor]]:
    """Two steps of `kind` on `_Running`, and the buffer torch's own module holds after them."""
    data = [batch(1), batch(2)]
    ref = _Running()
    with torch.no_grad():
        for x, _ in data:
            ref(x)
    options: dict[str, Any] = {
        "grad_stats": {"grad_stats": "layer"},
        "differentiable": {"differentiable": True},
    }.get(kind, {})
    # a learning rate of 0: the weights stay the module's, so its buffer is the reference
    state = ft.TrainState.create(_Running(), ft.sgd(0.0), loss_fn, **options)
    if kind == "stacked":
        state = ft.stack([state, ft.TrainState.create(_Running(), ft.sgd(0.0), loss_fn)])
        data = [ft.PerMember((torch.stack([x, x]), torch.stack([y, y]))) for x, y in data]
    for b in data:
        if kind == "body":
            state, _ = step_in_scope(state, b, train_body, donate=False, call="body")
        else:
            state, _ = ft.train_step(state, b, donate=kind == "donated")
    return state, [ref.running] * (2 if kind == "stacked" else 1)


@pytest.mark.parametrize(
    "kind", ["pure", "donated", "grad_stats", "body", "stacked", "differentiable"]
)
def test_a_buffer_written_from_the_graph_comes_out_of_a_step_detached_with_its_bits(
    kind: str,
) -> None:
    state, want = _stepped(kind)
    running = state.buffers["running"]
    assert not running.requires_grad and running.grad_fn is None
    if kind == "stacked":  # (each member's batched product: bit for bit where the CPU's are)
        assert_batched_trees_equal(want, list(running), "running")
    else:
        assert_trees_equal(want, [running], "running")


def test_a_differentiable_state_whose_step_keeps_its_graph_keeps_the_buffers() -> None:
    state = ft.TrainState.create(_Running(), ft.sgd(0.0), loss_fn, differentiable=True)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    state, _ = ft.train_step(state.with_hyperparameters(lr=lr), batch(1))
    state, _ = ft.train_step(state, batch(2))
    assert state.buffers["running"].grad_fn is not None


def _switching(first: Transform, then: Transform, after: int) -> Transform:
    """A transform of the user's that runs `first` for `after` updates, then `then` from a fresh
    state: the optimizer state it returns changes its structure mid-run."""
    calls = [0]

    def update(updates: Any, state: Any, params: Any = None) -> Any:
        calls[0] += 1
        if calls[0] <= after:
            return first.update(updates, state, params)
        if calls[0] == after + 1:
            state = then.init(params)
        return then.update(updates, state, params)

    return Transform(first.init, update)


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("order", ["adamw_then_sgd", "sgd_then_adamw"])
def test_a_transform_whose_state_changes_structure_trains_as_torch_switching_optimizers(
    order: str, donate: bool
) -> None:
    # AdamW behind reduce_on_plateau (its scale 1 until a plateau, and a metric of its own), and
    # SGD: torch.optim's two optimizers, one after the other
    adamw = ft.chain(ft.adamw(1e-2), ft.reduce_on_plateau())
    sgd = ft.sgd(0.1)
    first, then = (adamw, sgd) if order == "adamw_then_sgd" else (sgd, adamw)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    state = ft.TrainState.create(net, _switching(first, then, 2), loss_fn)
    reference = copy.deepcopy(net)
    adamw_t = lambda: torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=True)  # noqa: E731
    sgd_t = lambda: torch.optim.SGD(reference.parameters(), lr=0.1)  # noqa: E731
    for i in range(5):
        if i in (0, 2):
            opt = (adamw_t if (order == "adamw_then_sgd") == (i == 0) else sgd_t)()
        reference.zero_grad()
        loss_fn(reference, batch(i)).backward()
        opt.step()
        state, metrics = ft.train_step(state, batch(i), donate=donate)
        in_adamw = (order == "adamw_then_sgd") == (i < 2)
        assert ("lr_scale" in metrics) == in_adamw, (i, sorted(metrics))
        assert float(metrics["lr"]) == pytest.approx(1e-2 if in_adamw else 0.1)
    assert_trees_equal(dict(reference.named_parameters()), state.params, "params")


@pytest.mark.parametrize("donate", [False, True])
def test_a_switching_transform_reports_the_metrics_its_new_state_gains(donate: bool) -> None:
    # from a state exposing no metric (identity) to sgd's rate, and from a chain to the same
    # chain with reduce_on_plateau behind it (its scale): each reported from the switch on
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    cases = (
        (ft.identity(), ft.sgd(0.1), "lr"),
        (ft.chain(ft.sgd(0.1)), ft.chain(ft.sgd(0.1), ft.reduce_on_plateau()), "lr_scale"),
    )
    for first, then, gained in cases:
        state = ft.TrainState.create(net, _switching(first, then, 2), loss_fn)
        for i in range(4):
            state, metrics = ft.train_step(state, batch(i), donate=donate)
            if i >= 2:
                assert gained in metrics and bool(torch.isfinite(metrics[gained])), (gained, i)
