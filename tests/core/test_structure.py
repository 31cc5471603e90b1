"""What a step must honour of the module: its parameters' gradient hooks and their aliases.

A gradient hook (``Tensor.register_hook``) on a parameter runs on its gradient before the optimizer
sees it, as under ``loss.backward()``. A parameter or buffer also held in a plain attribute (a
list, tuple, dict, or the attribute itself; torch's RNNs keep their weights so) is bound there too.
Both bit for bit against the hand-written torch loop, pure and donated; compiled where dynamo can
rebind, refused by `compile_step` where it cannot. A lazy module not yet run and a
post-accumulate-grad hook are refused by `TrainState.create` with the fix.
"""

from __future__ import annotations

import collections
import copy
import functools
import types
import weakref
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.errors import ConfigError
from tests.comparisons import assert_trees_equal
from tests.models import cross_entropy_loss_fn as loss_fn

STEPS = 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids).mean(1))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randint(0, 10, (5, 4), generator=gen), torch.randint(0, 3, (5,), generator=gen))
        for _ in range(STEPS)
    ]


def with_hooks(model: Net) -> Net:
    """Rows 0-4 of the embedding masked out of the gradient; three hooks on the output weight."""
    mask = torch.ones(10, 1)
    mask[:5] = 0
    model.emb.weight.register_hook(lambda g: g * mask)
    model.out.weight.register_hook(lambda g: g * 0.5)
    model.out.weight.register_hook(lambda g: None)  # returns nothing: the gradient stays
    model.out.weight.register_hook(lambda g: g.clamp(-0.01, 0.01))
    return model


def torch_run(model: nn.Module) -> nn.Module:
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    for batch in batches():
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("kind", ["pure", "donated", "compiled"])
def test_parameter_gradient_hooks_run_as_under_backward(kind: str) -> None:
    torch.manual_seed(0)
    model = with_hooks(Net())
    start = copy.deepcopy(Net())
    start.load_state_dict(model.state_dict())
    ref = torch_run(with_hooks(start))
    state = ft.TrainState.create(model, ft.adamw(0.05), loss_fn)
    # hooks are traced by dynamo: aot_eager
    step = ft.compile_step(backend="aot_eager") if kind == "compiled" else ft.train_step
    for batch in batches():
        if kind == "donated":
            state, _ = ft.train_step(state, batch, donate=True)
        else:
            state, _ = step(state, batch)
    mine = dict(state.params)
    theirs = {k: p.detach() for k, p in ref.named_parameters()}
    if kind == "compiled":  # compiled numerics: the frozen rows and the clamp still hold exactly
        torch.testing.assert_close(mine, theirs)
    else:
        assert_trees_equal(mine, theirs)


def keeping_hook(model: nn.Linear) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A hook on `model`'s weight that returns a tensor it keeps: each one, with a copy of the
    values it returned."""
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(g: torch.Tensor) -> torch.Tensor:
        out = g * 2.0
        kept.append((out, out.clone()))
        return out

    model.weight.register_hook(keep)
    return kept


@pytest.mark.parametrize("donate", [False, True])
def test_a_gradient_a_hook_returns_and_keeps_is_never_written_by_clipping(donate: bool) -> None:
    """torch's ``.grad`` copies a gradient a hook still holds, so ``clip_grad_norm_`` scales the
    copy; a step (donated too: its first step runs the body, the later ones straight) clips its
    own, and the hook's tensor keeps the values it returned."""
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(3)]
    mse = nn.functional.mse_loss
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    start = copy.deepcopy(model)
    kept = keeping_hook(model)
    state = ft.TrainState.create(
        model, ft.sgd(0.1), lambda m, b: mse(m(b[0]), b[1]), clip_grad_norm=1e-3
    )
    for batch in data:
        state, metrics = ft.train_step(state, batch, donate=donate)
        assert float(metrics["grad_norm"]) > 1e-3  # (clipped: the gradients were scaled)
    ref, ref_kept = start, keeping_hook(start)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x, y in data:
        mse(ref(x), y).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e-3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert_trees_equal(dict(state.params), {k: p.detach() for k, p in ref.named_parameters()})
    for i, ((given, values), (theirs, _)) in enumerate(zip(kept, ref_kept, strict=True)):
        assert torch.equal(given, values), f"step {i}"
        assert torch.equal(given, theirs), f"step {i}"


def test_a_hook_registered_after_create_is_seen_by_a_state_created_again() -> None:
    # the state's structure is the module as it was at create; a new hook makes a new structure
    torch.manual_seed(0)
    model = Net()
    first = ft.TrainState.create(model, ft.sgd(0.5), loss_fn)
    model.out.bias.register_hook(lambda g: g * 0)
    second = ft.TrainState.create(model, ft.sgd(0.5), loss_fn)
    batch = batches()[0]
    a, _ = ft.train_step(first, batch)
    b, _ = ft.train_step(second, batch)
    assert not torch.equal(a.params["out.bias"], first.params["out.bias"])
    assert torch.equal(b.params["out.bias"], second.params["out.bias"])


class Aliased(nn.Module):
    """A parameter (or buffer) also held in a plain attribute, and read from there in forward."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)
        self.register_buffer("scale", torch.full((3,), 1.5))
        self.where = where
        if where == "list":
            self.ws = [self.a.weight]
        elif where == "tuple":
            self.ws = (self.a.bias, self.a.weight)
        elif where == "dict":
            self.ws = {"w": self.a.weight}
        elif where == "nested":
            self.ws = {"all": [self.a.bias, self.a.weight]}
        elif where == "direct":
            self.__dict__["w"] = self.a.weight
        elif where == "buffer":
            self.scales = [self.scale]

    def aliased(self) -> torch.Tensor:
        where = self.where
        if where == "list":
            return self.ws[0]
        if where == "tuple":
            return self.ws[1]
        if where == "dict":
            return self.ws["w"]
        if where == "nested":
            return self.ws["all"][1]
        if where == "direct":
            return self.w
        return self.a.weight * self.scales[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x @ self.aliased().t() + self.a(x))


def aliased_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [
        (torch.randn(4, 3, generator=gen), torch.randint(0, 2, (4,), generator=gen))
        for _ in range(STEPS)
    ]


WHERE = ["list", "tuple", "dict", "nested", "direct", "buffer"]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_tensor_also_held_in_a_plain_attribute_is_bound_there_too(
    where: str, donate: bool
) -> None:
    torch.manual_seed(0)
    model = Aliased(where)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, fused=True)
    state = ft.TrainState.create(model, ft.adamw(0.05), loss_fn)
    for batch in aliased_batches():
        state, _ = ft.train_step(state, batch, donate=donate)
        loss_fn(ref, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert_trees_equal(dict(state.params), {k: p.detach() for k, p in ref.named_parameters()})
    # the structure holds its own (meta) tensors again after the steps
    assert state.module.aliased().device.type == "meta"


@pytest.mark.parametrize("where", ["list", "dict", "nested"])
def test_an_alias_in_a_list_or_dict_is_bound_in_a_compiled_step(where: str) -> None:
    torch.manual_seed(0)
    model = Aliased(where)
    eager = ft.TrainState.create(copy.deepcopy(model), ft.adamw(0.05), loss_fn)
    compiled = ft.TrainState.create(model, ft.adamw(0.05), loss_fn)
    step = ft.compile_step(backend="aot_eager")  # the rebinding is dynamo's: no inductor needed
    for batch in aliased_batches():
        eager, _ = ft.train_step(eager, batch)
        compiled, _ = step(compiled, batch)
    torch.testing.assert_close(dict(compiled.params), dict(eager.params))


class Tied(nn.Module):
    """An embedding whose weight the output head shares (GPT-2's tying), and a buffer registered
    under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.full((6,), 0.5))
        self.register_buffer("scale_again", self.scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1) * self.scale + self.scale_again)


@pytest.mark.parametrize("donate", [False, True])
def test_a_tied_weight_and_buffer_are_bound_under_every_name_in_a_compiled_step(
    donate: bool,
) -> None:
    torch.manual_seed(0)
    model = Tied()
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, fused=True)
    state = ft.TrainState.create(model, ft.adamw(0.05), loss_fn)
    assert "head.weight" not in state.params  # held once, under its first name
    step = ft.compile_step(backend="aot_eager")  # the binding is dynamo's: no inductor needed
    for i, batch in enumerate(batches()):
        state, metrics = step(state, batch, donate=donate and i > 0)
        loss = loss_fn(ref, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(metrics["loss"], loss.detach())
    torch.testing.assert_close(
        dict(state.params), {k: p.detach() for k, p in ref.named_parameters()}
    )


@pytest.mark.parametrize("where", ["tuple", "direct"])
def test_compile_step_refuses_an_alias_it_cannot_rebind_naming_it(where: str) -> None:
    state = ft.TrainState.create(Aliased(where), ft.adamw(0.05), loss_fn)
    named = "ws" if where == "tuple" else "w"
    with pytest.raises(ConfigError, match=f"plain attribute '{named}'.*hold it in a list"):
        ft.compile_step()(state, aliased_batches()[0])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_torch_rnns_which_keep_their_weights_in_a_list_train_bit_for_bit(cell: type) -> None:
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = cell(3, 5, num_layers=2, batch_first=True)
            self.out = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model = Recurrent()
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, fused=True)
    state = ft.TrainState.create(model, ft.adamw(0.05), loss_fn)
    gen = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        batch = (torch.randn(4, 6, 3, generator=gen), torch.randint(0, 2, (4,), generator=gen))
        state, _ = ft.train_step(state, batch, donate=True)
        loss_fn(ref, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert_trees_equal(dict(state.params), {k: p.detach() for k, p in ref.named_parameters()})


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
@pytest.mark.parametrize("kind", ["quantized", "nested"])
def test_a_quantized_or_nested_buffer_is_refused_naming_the_fix(kind: str) -> None:
    model = nn.Linear(3, 1)
    held = (
        torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)
        if kind == "quantized"
        else torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    )
    model.register_buffer("held", held)
    with pytest.raises(ConfigError, match=rf"quantized or nested tensors \(held \({kind}\)\)"):
        ft.TrainState.create(model, ft.sgd(0.1), lambda m, b: m(b).sum())


def test_a_lazy_module_not_yet_run_is_refused_naming_the_fix() -> None:
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ConfigError, match=r"not yet initialized \(0.weight, 0.bias\).*model\(ex"):
        ft.TrainState.create(model, ft.sgd(0.1), lambda m, b: m(b).sum())
    model(torch.ones(2, 3))  # run once: it trains
    state = ft.TrainState.create(model, ft.sgd(0.1), lambda m, b: m(b).sum())
    ft.train_step(state, torch.ones(2, 3))


def test_a_post_accumulate_grad_hook_is_refused_naming_the_parameter() -> None:
    model = Net()
    model.out.weight.register_post_accumulate_grad_hook(lambda p: None)
    with pytest.raises(ConfigError, match="'out.weight'.*register_post_accumulate_grad_hook"):
        ft.TrainState.create(model, ft.sgd(0.1), loss_fn)


def test_stack_refuses_gradient_hooks_naming_the_parameter() -> None:
    torch.manual_seed(0)
    states = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = Net()
        model.out.bias.register_hook(lambda g: g * 0)
        states.append(ft.TrainState.create(model, ft.sgd(0.1), loss_fn, seed=seed))
    with pytest.raises(ConfigError, match="stack cannot run the gradient hooks of out.bias"):
        ft.stack(states)


@pytest.mark.parametrize("later", ["straight", "body"])
def test_a_forward_that_writes_a_weight_in_a_later_step_is_refused_there_too(later: str) -> None:
    # the first step runs the body's first forward, the later ones the straight step, or the
    # body's later forward (gradient statistics, which the straight step does not write): each
    # checks
    calls = {"n": 0}

    def loss_writing_later(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                model.out.weight.mul_(0.5)
        return loss_fn(model, batch)

    stats = {"grad_stats": "layer"} if later == "body" else {}
    state = ft.TrainState.create(Net(), ft.adamw(0.05), loss_writing_later, **stats)
    data = batches()
    for batch in data[:2]:
        state, _ = ft.train_step(state, batch)
    assert (state.program.runner is not None) == (later == "straight")
    with pytest.raises(ConfigError, match="wrote the state's tensor 'out.weight'"):
        ft.train_step(state, data[2])


def test_calling_the_state_module_raises_naming_predict_and_export_module() -> None:
    """``state.module(x)``, a notebook's first try, names what runs the model on the weights."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    state = ft.TrainState.create(model, ft.adamw(1e-2), lambda m, b: m(b).square().mean())
    x = torch.randn(5, 3)
    with pytest.raises(
        ft.WeightlessModuleError, match=r"functrain\.predict\(state, x\).*export_module"
    ):
        state.module(x)
    state, _ = ft.train_step(state, x)  # the step, which binds the weights, is unaffected
    exported = state.export_module()
    assert exported is not None
    assert not exported._forward_pre_hooks  # a module with weights runs as it is
    model.load_state_dict(exported.state_dict())
    expected = model.eval()(x)
    assert torch.equal(exported(x), expected)
    assert torch.equal(ft.predict(state, x), expected)


def test_a_step_lifts_the_call_guard_for_its_loss_function_and_puts_it_back() -> None:
    """The guard leaves the step's hot path (torch's fast module call) but not the structure."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    seen: list[int] = []

    def loss_raising_on_one_row(m: Any, batch: torch.Tensor) -> torch.Tensor:
        seen.append(len(state.module._forward_pre_hooks))
        if batch.shape[0] == 1:
            raise ValueError("a loss function that raises")
        return m(batch).square().mean()

    state = ft.TrainState.create(model, ft.adamw(1e-2), loss_raising_on_one_row)
    guarded = len(state.module._forward_pre_hooks)
    state, _ = ft.train_step(state, torch.randn(5, 3))
    state, _ = ft.train_step(state, torch.randn(5, 3), donate=True)
    with pytest.raises(ft.BatchError):
        ft.train_step(state, torch.randn(1, 3))
    assert guarded == 1 and seen == [0, 0, 0]
    with pytest.raises(ft.WeightlessModuleError):  # put back, also after the exception
        state.module(torch.randn(5, 3))


def test_create_given_a_state_module_names_export_module() -> None:
    state = ft.TrainState.create(nn.Linear(2, 2), ft.sgd(0.1), lambda m, b: m(b).sum())
    with pytest.raises(ConfigError, match=r"state\.export_module\(\)"):
        ft.TrainState.create(state.module, ft.sgd(0.1), lambda m, b: m(b).sum())


@pytest.mark.parametrize(
    "hook",
    [lambda g: g[:1], lambda g: g.double(), lambda g: g.tolist()],
    ids=["shape", "dtype", "not a tensor"],
)
def test_a_hook_that_changes_its_gradients_size_or_dtype_is_refused_as_torch_refuses_it(
    hook: Any,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].weight.register_hook(hook)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises((RuntimeError, TypeError)):  # torch's own refusal
        loss_fn(model, (x, y)).backward()
    for tx in (ft.lion(1e-3), ft.adamw(1e-2)):
        state = ft.TrainState.create(model, tx, loss_fn)
        with pytest.raises(ConfigError, match="not its size or dtype"):
            ft.train_step(state, (x, y), donate=True)
        state.check_live("the test")  # refused before any write: the given state lives on


# functions a module holds that read the module through their closure (``self`` in ``__init__``):
# the state's copy of the module runs them on its own weights, as torch runs them on the module's
class _Helper:
    def __init__(self, act: Any) -> None:
        self.act = act


class ClosingOverSelf(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)
        self.gate = nn.Parameter(torch.full((6,), 0.5))
        self.slope = nn.Parameter(torch.tensor(0.25))
        self.feats: list[torch.Tensor] = []
        self.how = how
        if how == "forward-hook":
            self.a.register_forward_hook(lambda m, i, o: o * self.gate)
        elif how == "attribute":
            self.act = lambda x: torch.where(x > 0, x, self.slope * x)
        elif how == "nested":
            scale = lambda: self.gate  # noqa: E731 - a closure a closure reads
            self.act = lambda x: x * scale()
        elif how == "gradient-hook":
            self.a.weight.register_hook(lambda g: g * self.slope.detach())
        elif how == "stored-activations":
            self.a.register_forward_hook(lambda m, i, o: self.feats.append(o))
        elif how == "default-argument":
            self.act = lambda x, self=self: x * self.gate
        elif how == "recursive":

            def act(x: torch.Tensor, n: int = 2) -> torch.Tensor:
                return x * self.gate if n == 0 else act(x, n - 1)

            self.act = act
        elif how == "helper-object":
            self.helper = _Helper(lambda x: x * self.gate)
        elif how == "bound-method":
            b = self.b.forward  # (a submodule's bound method, beside self)
            self.out = lambda h: b(h) * self.slope
        elif how == "weak-reference":
            me = weakref.ref(self)
            self.a.register_forward_hook(lambda m, i, o: o * me().gate)
        elif how == "partial":
            self.act = functools.partial(lambda x, m: x * m.gate, m=self)
            scale = functools.partial(torch.mul, other=2.0)
            self.double = lambda x: scale(x) * self.slope  # (a partial of no weight: shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x.float())
        if self.how in ("attribute", "nested", "default-argument", "recursive", "partial"):
            h = self.act(h)
        if self.how == "partial":
            h = self.double(h)
        if self.how == "helper-object":
            h = self.helper.act(h)
        if self.how == "bound-method":
            return self.out(torch.tanh(h) * self.gate)
        out = self.b(torch.tanh(h) * self.gate) * self.slope  # (each weight used: torch's
        # AdamW leaves one without a gradient alone)
        if self.how == "stored-activations":
            out = out + self.feats.pop().mean()
        return out


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize(
    "how",
    [
        "forward-hook",
        "attribute",
        "nested",
        "stored-activations",
        "default-argument",
        "recursive",
        "helper-object",
        "bound-method",
        "weak-reference",
        "partial",
    ],
)
def test_a_function_closing_over_the_module_reads_the_states_weights(
    how: str, donate: bool
) -> None:
    torch.manual_seed(0)
    model = ClosingOverSelf(how)
    reference = ClosingOverSelf(how)
    reference.load_state_dict(model.state_dict())
    state = ft.TrainState.create(model, ft.adamw(1e-2), loss_fn)
    opt = torch.optim.AdamW(reference.parameters(), 1e-2, fused=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        batch = (torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen))
        state, _ = ft.train_step(state, batch, donate=donate)
        loss_fn(reference, batch).backward()
        opt.step()
        opt.zero_grad()
    for name, p in reference.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name
    exported = state.export_module()
    x = torch.randn(4, 6, generator=gen)
    with torch.no_grad():
        assert torch.equal(exported(x), reference.eval()(x))
    # a deep copy of the state runs its own copy of the module, the functions reading that
    copied = copy.deepcopy(state)
    again, _ = ft.train_step(copied, batch)
    continued, _ = ft.train_step(state, batch)
    assert_trees_equal(again.tree(), continued.tree())


def test_a_function_holding_a_weight_itself_is_refused_naming_it() -> None:
    # (a state binds its weights where the module holds them, never in a closure: the function
    # would read a tensor no step binds)
    class Holding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 3)
            w = self.a.weight
            self.f = lambda x: x @ w.t()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.f(x) + self.a.bias

    with pytest.raises(ConfigError, match="holds the module's tensor 'a.weight' itself"):
        ft.TrainState.create(Holding(), ft.sgd(0.1), loss_fn)


def test_a_function_holding_a_constant_buffer_or_reading_a_weightless_global_trains() -> None:
    # RoPE's inv_freq held in a closure (a constant, read as it is), and an activation the module
    # holds that a helper reads through a global name (no weights: the same function)
    global _ACT
    _ACT = nn.GELU()

    class Rope(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.act = nn.Linear(6, 3), _ACT
            self.register_buffer("inv_freq", torch.linspace(0.5, 1.5, 3), persistent=False)
            inv = self.inv_freq
            self.rotate = lambda h: h * inv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _ACT(self.rotate(self.a(x)))

    torch.manual_seed(0)
    model = Rope()
    reference = copy.deepcopy(model)
    state = ft.TrainState.create(model, ft.sgd(0.1), loss_fn)
    opt = torch.optim.SGD(reference.parameters(), 0.1, fused=True)
    batch = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    for _ in range(3):
        state, _ = ft.train_step(state, batch)
        loss_fn(reference, batch).backward()
        opt.step()
        opt.zero_grad()
    for name, p in reference.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name


_ACT: Any = None


def test_a_nonlocal_a_function_shares_with_the_module_is_read_as_it_is_then() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 3)
            scale = 1.0

            def hook(m: Any, i: Any, o: torch.Tensor) -> torch.Tensor:
                return o * scale * self.a.bias.sum().clamp(min=1.0)

            def set_scale(s: float) -> None:
                nonlocal scale
                scale = s

            self.a.register_forward_hook(hook)
            self.set_scale = set_scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)

    model = Scaled()
    state = ft.TrainState.create(model, ft.sgd(0.1), loss_fn)
    model.set_scale(0.0)
    assert torch.equal(ft.predict(state, torch.ones(1, 6)), torch.zeros(1, 3))


def test_a_gradient_hook_reading_the_modules_weights_is_refused_naming_it() -> None:
    # (a step runs the gradient hooks after the forward, on a module holding no weights; the
    # original's weights, which never train, are no longer read in their place)
    state = ft.TrainState.create(ClosingOverSelf("gradient-hook"), ft.adamw(1e-2), loss_fn)
    batch = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    with pytest.raises(ConfigError, match="gradient hook .*reads one of the module's own"):
        ft.train_step(state, batch)


_READ: Any = None


def test_a_function_reading_the_module_through_a_global_name_is_refused_naming_it() -> None:
    global _READ
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    _READ = model  # (a notebook's global)
    model[0].register_forward_hook(lambda m, i, o: o * _READ[1].weight.sum())
    with pytest.raises(ConfigError, match="through the global name '_READ'"):
        ft.TrainState.create(model, ft.sgd(0.1), loss_fn)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_torch_old_weight_and_spectral_norm_export_the_trained_module(norm: str) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        wrap = getattr(torch.nn.utils, norm)
        return nn.Sequential(wrap(nn.Linear(6, 6)), nn.Tanh(), nn.Linear(6, 3))

    model, reference = build(), build()
    state = ft.TrainState.create(model, ft.adamw(1e-2), loss_fn)
    opt = torch.optim.AdamW(reference.parameters(), 1e-2, fused=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        batch = (torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen))
        state, _ = ft.train_step(state, batch)
        loss_fn(reference, batch).backward()
        opt.step()
        opt.zero_grad()
    exported = state.export_module()
    x = torch.randn(4, 6, generator=gen)
    reference.eval()
    with torch.no_grad():
        assert torch.equal(exported(x), reference(x))
    for name, t in reference.state_dict().items():
        assert torch.equal(exported.state_dict()[name], t), name
    copy.deepcopy(exported)  # (a module a user may copy, as any other)


def test_a_deep_copy_of_a_container_holding_a_state_copies_the_rest_too() -> None:
    # (the structure's copy kept its objects alive under another memo's id: a later object of
    # the container found a stale entry at a reused address)
    import dataclasses

    @dataclasses.dataclass(slots=True)
    class Record:
        step: int

    state = ft.TrainState.create(ClosingOverSelf("forward-hook"), ft.sgd(0.1), loss_fn)
    for _ in range(20):
        copied = copy.deepcopy({"state": state, "history": [Record(i) for i in range(30)]})
        assert [r.step for r in copied["history"]] == list(range(30))


_REGISTRY: dict[str, Any] = {}


class _Holder:
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.module.gate(x))


class ReachingTheOriginal(nn.Module):
    """Functions the copy cannot rebind, each reaching the module's `gate` (a Linear, or a
    BatchNorm in train mode, whose forward writes its running statistics)."""

    def __init__(self, how: str, gate: str = "linear") -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.gate = nn.Linear(6, 4) if gate == "linear" else nn.Sequential(nn.BatchNorm1d(6))
        self.b = nn.Linear(4, 3)
        if how == "deque":
            self.fns = collections.deque([lambda x: torch.sigmoid(self.gate(x))[:, :4]])
        elif how == "deep-container":
            self.fns = [[[[[[lambda x: torch.sigmoid(self.gate(x))[:, :4]]]]]]]
        elif how == "helper-method-type":
            self.fn = types.MethodType(_Holder.gate, _Holder(self))
        elif how == "weak-method":
            self.helper = _Holder(self)
            self.fn = weakref.WeakMethod(self.helper.gate)
        elif how == "local-class":

            class Gate:
                def __call__(inner, x: torch.Tensor) -> torch.Tensor:  # noqa: N805
                    return torch.sigmoid(self.gate(x))[:, :4]

            self.fn = Gate()
        elif how == "global-dict":
            _REGISTRY["model"] = self
        self.how = how

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        if self.how in ("deque", "deep-container"):
            fn = self.fns
            while not callable(fn):
                fn = fn[0]
            return fn(x)
        if self.how == "weak-method":
            return self.fn()(x)[:, :4]
        if self.how == "global-dict":
            return torch.sigmoid(_REGISTRY["model"].gate(x))[:, :4]
        out = self.fn(x)
        return out[:, :4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * self.gated(x))


@pytest.mark.parametrize("how", ["helper-method-type", "weak-method"])
@pytest.mark.parametrize("gate", ["linear", "batchnorm"])
def test_a_method_of_a_helper_object_the_module_holds_trains_as_torch(how: str, gate: str) -> None:
    # (the helper is copied with the module: its method reads the copy)
    torch.manual_seed(0)
    model, reference = ReachingTheOriginal(how, gate), ReachingTheOriginal(how, gate)
    reference.load_state_dict(model.state_dict())
    state = ft.TrainState.create(model, ft.sgd(0.1), loss_fn)
    opt = torch.optim.SGD(reference.parameters(), 0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        batch = (torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen))
        state, _ = ft.train_step(state, batch)
        loss_fn(reference, batch).backward()
        opt.step()
        opt.zero_grad()
    assert_trees_equal(
        {**state.params, **state.buffers},
        {**dict(reference.named_parameters()), **dict(reference.named_buffers())},
    )


@pytest.mark.parametrize("how", ["deque", "deep-container", "local-class", "global-dict"])
@pytest.mark.parametrize("gate", ["linear", "batchnorm"])
def test_a_function_reaching_the_module_where_the_copy_cannot_is_refused_at_the_first_step(
    how: str, gate: str
) -> None:
    # (torch trains the gate, and a BatchNorm there moves its statistics: here the function
    # would read, or write, the module given to create, which no step trains)
    torch.manual_seed(0)
    model = ReachingTheOriginal(how, gate)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    state = ft.TrainState.create(model, ft.sgd(0.1), loss_fn)
    given = state.tree()
    kept = {k: {n: t.clone() for n, t in v.items()} for k, v in given.items() if k == "params"}
    batch = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    what = "reads" if gate == "linear" else "writes"
    with pytest.raises(ConfigError, match=f"forward {what} the tensor 'gate.*of the module given"):
        ft.train_step(state, batch, donate=True)
    # neither the user's module nor the state was written
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k
    assert_trees_equal(state.params, kept["params"])


def test_the_module_given_to_create_run_beside_the_state_as_a_teacher_trains_as_torch() -> None:
    # (self-distillation from the initial weights: the module given, in eval mode and without
    # gradients, is a teacher that never moves, as a deep copy of it is in torch's loop)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    student = copy.deepcopy(teacher)

    def distill(model: nn.Module, batch: Any) -> torch.Tensor:
        x, _ = batch
        with torch.no_grad():
            target = teacher.eval()(x).softmax(-1)
        return nn.functional.cross_entropy(model(x), target)

    state = ft.TrainState.create(teacher, ft.sgd(0.1), distill)
    opt = torch.optim.SGD(student.parameters(), 0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        batch = (torch.randn(5, 6, generator=gen), None)
        state, _ = ft.train_step(state, batch)
        distill(student, batch).backward()
        opt.step()
        opt.zero_grad()
    for name, p in student.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name


@pytest.mark.parametrize("how", ["deque", "local-class", "global-dict"])
def test_predict_on_loaded_weights_reading_the_module_given_to_create_is_refused(
    how: str, tmp_path: Any
) -> None:
    # (no step ran: the weights a checkpoint brings would be read where the module's are)
    torch.manual_seed(0)
    trained = ft.TrainState.create(ReachingTheOriginal(how), ft.sgd(0.1), loss_fn)
    trained = trained.replace(params={k: v + 1.0 for k, v in trained.params.items()})
    ft.save(trained, tmp_path / "ckpt")
    model = ReachingTheOriginal(how)
    state = ft.load(tmp_path / "ckpt", like=ft.TrainState.create(model, ft.sgd(0.1), loss_fn))
    with pytest.raises(ConfigError, match="predict's forward reads the tensor 'gate.weight'"):
        ft.predict(state, torch.randn(2, 6))
    with pytest.raises(ConfigError, match="predict's first call"):
        ft.predict(state, torch.randn(2, 6))  # (refused again: nothing marked it checked)


def test_predict_reading_only_the_states_tensors_gives_the_modules_output() -> None:
    model = ClosingOverSelf("forward-hook")
    state = ft.TrainState.create(model, ft.sgd(0.1), loss_fn)
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x)
    for _ in range(2):  # (the first call under the check, the next bare)
        assert torch.equal(ft.predict(state, x), expected)


def test_an_evaluation_before_the_first_step_leaves_the_read_check_to_that_step() -> None:
    # (an evaluation has no graph to show the read: the step after it is still refused, where
    # torch trains the gate and the state's would never move)
    torch.manual_seed(0)
    state = ft.TrainState.create(ReachingTheOriginal("deque"), ft.sgd(0.1), loss_fn)
    batch = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    for _ in range(2):  # (the second evaluation runs bare)
        ft.eval_step(state, batch)
    with pytest.raises(ConfigError, match="forward reads the tensor 'gate.weight' of the module"):
        ft.train_step(state, batch)


def test_predict_reading_a_constant_buffer_a_function_holds_gives_torchs_output() -> None:
    # (RoPE's inv_freq held in a closure: the step reads it as it is, and so does predict)
    class Rope(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 3)
            self.register_buffer("inv_freq", torch.linspace(0.5, 1.5, 3), persistent=False)
            inv = self.inv_freq
            self.rotate = lambda h: h * inv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rotate(self.a(x))

    torch.manual_seed(0)
    model = Rope()
    reference = copy.deepcopy(model)
    state = ft.TrainState.create(model, ft.sgd(0.1), loss_fn)
    opt = torch.optim.SGD(reference.parameters(), 0.1, fused=True)
    batch = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    for _ in range(2):
        state, _ = ft.train_step(state, batch)
        loss_fn(reference, batch).backward()
        opt.step()
        opt.zero_grad()
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = reference.eval()(x)
    assert torch.equal(ft.predict(state, x), expected)


def test_a_state_made_from_an_exported_module_checks_its_first_forward_anew() -> None:
    # (the export held the marks of the checks its state's structure had passed: a state made
    # from it skipped the first forward's checks)
    model = ReachingTheOriginal("helper-method-type")
    state = ft.TrainState.create(model, ft.sgd(0.1), loss_fn)
    batch = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    state, _ = ft.train_step(state, batch)
    exported = state.export_module()
    assert not [k for k in vars(exported) if k.startswith("_functrain_")]
    again = ft.TrainState.create(exported, ft.sgd(0.1), loss_fn)
    assert not [
        k for k in vars(again.module) if k.startswith(("_functrain_watched", "_functrain_r"))
    ]
    exported.fns = collections.deque([lambda x: torch.sigmoid(exported.gate(x))[:, :4]])
    exported.how = "deque"
    fresh = ft.TrainState.create(exported, ft.sgd(0.1), loss_fn)
    with pytest.raises(ConfigError, match="forward reads the tensor 'gate.weight'"):
        ft.train_step(fresh, batch)


def test_a_differentiable_states_first_step_reading_the_module_given_to_create_is_refused() -> None:
    state = ft.TrainState.create(
        ReachingTheOriginal("deque"), ft.sgd(0.1), loss_fn, differentiable=True
    )
    batch = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    with pytest.raises(ConfigError, match="forward reads the tensor 'gate.weight'"):
        ft.train_step(state, batch)
    # (one that reads only its own trains, a graph through its step)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    plain = ft.TrainState.create(
        ClosingOverSelf("forward-hook"), ft.sgd(0.1), loss_fn, differentiable=True
    )
    stepped, _ = ft.train_step(plain.with_hyperparameters(lr=lr), (torch.randn(5, 6), batch[1]))
    assert stepped.params["a.weight"].grad_fn is not None


def test_a_differentiable_states_first_step_checks_its_loss_after_a_predict() -> None:
    """A loss function that runs the module given to create for one layer: torch's loop trains
    that layer; the state's step refuses it, a `predict` before it or not (whose check is of the
    forward in eval mode, not of what the loss function reads)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

    def reaching(model: Any, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(model[2](torch.tanh(net[0](x))), y)

    state = ft.TrainState.create(net, ft.sgd(0.1), reaching, differentiable=True)
    batch = (torch.randn(8, 3), torch.randn(8, 1))
    ft.predict(state, batch[0])
    with pytest.raises(ConfigError, match="reads the tensor '0.weight'"):
        ft.train_step(state, batch)


def test_meta_weights_that_are_the_modules_own_parameters_are_the_states() -> None:
    """MAML whose meta-weights are the parameters of the module given to create (stepped by a
    torch optimizer over ``net.parameters()``): the inner state's weights are those tensors, and
    the meta-gradient through its step is the hand-written ``torch.func`` loop's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))

    def mse(model: Any, batch: Any) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    support, query = [(torch.randn(10, 1), torch.randn(10, 1)) for _ in range(2)]
    start = {k: p.detach().clone().requires_grad_(True) for k, p in net.named_parameters()}

    def run(weights: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return mse(lambda x: torch.func.functional_call(net, weights, (x,)), batch)

    grads = torch.autograd.grad(run(start, support), list(start.values()), create_graph=True)
    adapted = {k: p - 0.01 * g for (k, p), g in zip(start.items(), grads, strict=True)}
    expected = torch.autograd.grad(run(adapted, query), list(start.values()))

    inner = ft.TrainState.create(net, ft.sgd(0.01), mse, differentiable=True)
    stepped, _ = ft.train_step(inner.replace(params=dict(net.named_parameters())), support)
    got = torch.autograd.grad(ft.eval_step(stepped, query)["loss"], list(net.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_differentiable_step_of_weights_made_by_a_graph_checks_what_its_loss_reads() -> None:
    """Inner weights computed from meta-weights (a graph behind each): a loss function running
    the module given to create for one layer is refused at the first step, as with leaf weights
    (torch's loop would train that layer)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

    def reaching(model: Any, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(model[2](torch.tanh(net[0](x))), y)

    state = ft.TrainState.create(net, ft.sgd(0.1), reaching, differentiable=True)
    meta = {k: v.detach().clone().requires_grad_(True) for k, v in state.params.items()}
    made = state.replace(params={k: v * 1.5 for k, v in meta.items()})
    with pytest.raises(ConfigError, match="reads the tensor '0.weight'"):
        ft.train_step(made, (torch.randn(8, 3), torch.randn(8, 1)))
