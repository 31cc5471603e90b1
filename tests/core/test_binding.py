"""The module on a state's tensors: `call_with` gives torch.func.functional_call's results, and the
model in loss_fn behaves as the module (attributes, submodules, methods), the module left as it
was."""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import functrain as ft
from functrain.core.binding import call_with


def _fresh(module: nn.Module) -> dict[str, torch.Tensor]:
    """Other tensors for every named parameter and buffer (deduplicated, as a TrainState holds
    them)."""
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return {
        k: (torch.randn_like(v) if v.is_floating_point() else v.clone()) for k, v in named.items()
    }


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in {
            **dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False)),
        }.items()
    }


def _assert_untouched(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = _snapshot(module)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before), "the module's own tensors must be restored"


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight  # tied: one tensor, two slots

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(3, 3)
        self.again = self.block  # one submodule under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.again(self.block(x))


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(3, 5)),
        (
            lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten()),
            torch.randn(2, 1, 5, 5),
        ),
        (Tied, torch.tensor([[1, 2, 3]])),
        (Shared, torch.randn(2, 3)),
        (lambda: torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 2)), torch.randn(4, 3)),
    ],
    ids=["mlp", "batchnorm", "tied", "shared", "parametrized"],
)
def test_same_as_functional_call_and_module_restored(make, x):
    torch.manual_seed(0)
    module = make()
    reference = copy.deepcopy(
        module
    )  # functional_call does not restore a shared submodule's own tensors
    tensors = _fresh(module)
    ours_buffers = {k: v.clone() for k, v in tensors.items()}
    theirs_buffers = {k: v.clone() for k, v in tensors.items()}
    before = _snapshot(module)
    for _ in range(2):  # the second call runs from the cached plan
        ours = call_with(module, ours_buffers, (x,), {})
        theirs = torch.func.functional_call(reference, theirs_buffers, (x,))
        assert torch.equal(ours, theirs)
    # buffers written by the forward (BatchNorm statistics) land in the given tensors, as with
    # functional_call
    for k in tensors:
        assert torch.equal(ours_buffers[k], theirs_buffers[k]), k
    _assert_untouched(module, before)


def test_restored_when_the_forward_raises():
    module = nn.Linear(3, 2)
    before = _snapshot(module)
    with pytest.raises(RuntimeError):
        call_with(module, _fresh(module), (torch.randn(2, 5),), {})  # wrong input width
    _assert_untouched(module, before)


def test_gradients_flow_to_the_given_tensors():
    module = nn.Linear(3, 1)
    tensors = {k: v.detach().clone().requires_grad_(True) for k, v in module.named_parameters()}
    call_with(module, tensors, (torch.ones(2, 3),), {}).sum().backward()
    assert torch.equal(tensors["weight"].grad, torch.full((1, 3), 2.0))
    assert module.weight.grad is None


def test_a_structure_change_after_the_first_call_is_planned_anew():
    module = nn.Sequential(nn.Linear(3, 3))
    call_with(module, _fresh(module), (torch.randn(1, 3),), {})
    module[0] = nn.Linear(3, 3)  # same names, new submodule: the old plan's slots are stale
    tensors = _fresh(module)
    x = torch.randn(2, 3)
    assert torch.equal(
        call_with(module, tensors, (x,), {}), torch.func.functional_call(module, tensors, (x,))
    )


def test_other_names_fall_back_to_functional_call():
    module = nn.Linear(3, 2)
    partial = {"weight": torch.zeros(2, 3)}  # the bias stays the module's own
    x = torch.randn(1, 3)
    assert torch.equal(call_with(module, partial, (x,), {}), module.bias.detach().expand(1, 2))


# ------------------------------------------------ the model in loss_fn behaves as the module


class Lightning(nn.Module):
    """A LightningModule-style module: its training step uses submodules, a method, a setting."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(5, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        self.weight_decay = 1e-2  # a hyperparameter read as self.weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.encoder(x)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        logits = self.head(self.features(x))
        penalty = sum(p.pow(2).sum() for p in self.parameters())
        loss = nn.functional.cross_entropy(logits, y) + self.weight_decay * penalty
        return loss, {"acc": (logits.argmax(-1) == y).float().mean()}


def _lightning(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Lightning()


def _training_step(model: Any, batch: Any) -> Any:
    return model.training_step(batch, 0)


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)


def _torch_step(module: nn.Module, batch: Any, lr: float) -> tuple[nn.Module, torch.Tensor]:
    """The same training step by hand: the method on the module itself, torch.optim's SGD."""
    module = copy.deepcopy(module).train()
    opt = torch.optim.SGD(module.parameters(), lr=lr, foreach=False)
    loss, _ = module.training_step(batch, 0)
    loss.backward()
    opt.step()
    return module, loss.detach()


def test_a_training_step_method_using_submodules_methods_and_settings_ports_as_it_is():
    module, batch = _lightning(), _batch()
    state = ft.TrainState.create(module, ft.sgd(0.1, fused=False), _training_step)
    new, metrics = ft.train_step(state, batch)
    expected, expected_loss = _torch_step(module, batch, 0.1)
    assert torch.equal(metrics["loss"], expected_loss)
    for name, p in expected.named_parameters():
        torch.testing.assert_close(new.params[name], p.detach(), rtol=1e-6, atol=1e-7)
    for name, b in expected.named_buffers():
        assert torch.equal(new.buffers[name], b), name


def test_the_compiled_step_runs_the_module_method_like_the_eager_step():
    batch = _batch()
    state = ft.TrainState.create(_lightning(), ft.adamw(1e-2), _training_step)
    step = ft.compile_step(backend="aot_eager")
    eager, compiled = ft.train_step(state, batch), step(state, batch)
    torch.testing.assert_close(compiled[1], eager[1])
    for field in ("params", "buffers"):
        torch.testing.assert_close(getattr(compiled[0], field), getattr(eager[0], field))


def test_each_stacked_member_runs_the_module_method_on_its_own_weights():
    batch = _batch()
    states = [
        ft.TrainState.create(_lightning(seed), ft.adamw(1e-2), _training_step, seed=seed)
        for seed in range(2)
    ]
    stacked, metrics = ft.train_step(ft.stack(states), batch)
    for k, (member, state) in enumerate(zip(ft.unstack(stacked), states)):
        alone, alone_metrics = ft.train_step(state, batch)
        torch.testing.assert_close(metrics["loss"][k], alone_metrics["loss"])
        torch.testing.assert_close(member.params, alone.params, rtol=1e-5, atol=1e-6)


def test_attributes_and_submodules_of_the_model_are_the_states_tensors():
    seen: dict[str, Any] = {}

    def loss_recording_the_model(model: Any, batch: Any) -> torch.Tensor:
        seen.update(
            weight=model.encoder.weight,
            head=model.head,
            decay=model.weight_decay,
            repr=repr(model),
            buffer=model.norm.running_mean,
        )
        return model(batch[0]).sum()

    state = ft.TrainState.create(_lightning(), ft.sgd(0.1), loss_recording_the_model)
    ft.eval_step(state, _batch())
    assert seen["weight"] is state.params["encoder.weight"]
    assert isinstance(seen["head"], nn.Linear) and seen["decay"] == 1e-2
    assert seen["repr"] == "BoundModel(Lightning on a state's tensors)"
    assert torch.equal(seen["buffer"], state.buffers["norm.running_mean"])


def test_a_container_module_is_indexed_measured_and_iterated_as_itself():
    def loss_checking_the_container(model: Any, batch: torch.Tensor) -> torch.Tensor:
        assert len(model) == 2 and [type(m) for m in model] == [nn.Linear, nn.Linear]
        return model[1](model[0](batch)).sum()

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    state = ft.TrainState.create(module, ft.sgd(0.1), loss_checking_the_container)
    x = torch.randn(2, 3)
    assert torch.equal(ft.eval_step(state, x)["loss"], module(x).sum().detach())


def test_the_module_is_left_as_it_was_also_when_the_loss_raises():
    def raising_loss(model: Any, batch: Any) -> torch.Tensor:
        model.features(batch[0])
        raise RuntimeError("boom")

    state = ft.TrainState.create(_lightning(), ft.sgd(0.1), raising_loss)
    before = _snapshot(state.module)
    with pytest.raises(ft.BatchError, match="RuntimeError: boom"):
        ft.train_step(state, _batch())
    _assert_untouched(state.module, before)
    assert all(t.is_meta for t in before.values())


def test_assigning_a_buffer_on_the_model_names_the_method_that_rebinds_it() -> None:
    class Centered(nn.Module):  # DINO's loss: a center moved from the teacher's outputs
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.register_buffer("center", torch.zeros(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) - self.center

        def update_center(self, out: torch.Tensor) -> None:
            self.center = 0.9 * self.center + 0.1 * out.detach().mean(0)

    def assigning(model: Any, x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        model.center = 0.9 * model.center + 0.1 * out.detach().mean(0)
        return out.square().mean()

    def calling(model: Any, x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        model.update_center(out)
        return out.square().mean()

    torch.manual_seed(0)
    module, x = Centered(), torch.randn(8, 4)
    state = ft.TrainState.create(module, ft.sgd(0.1), assigning)
    with pytest.raises(ft.ConfigError, match=r"'center' is a buffer: rebind it in a method"):
        ft.train_step(state, x)
    new, _ = ft.train_step(state.replace(loss_fn=calling), x)  # the way the message names
    reference = copy.deepcopy(module)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    out = reference(x)
    reference.update_center(out)
    out.square().mean().backward()
    optimizer.step()
    assert torch.equal(new.buffers["center"], reference.center)
    assert all(torch.equal(new.params[k], p) for k, p in reference.named_parameters())


def test_assigning_on_the_model_or_using_it_after_the_call_is_refused():
    kept: list[Any] = []

    def assigning(model: Any, batch: Any) -> torch.Tensor:
        model.cache = batch
        return model(batch[0]).sum()

    def keeping(model: Any, batch: Any) -> torch.Tensor:
        kept.append(model)
        return model(batch[0]).sum()

    state = ft.TrainState.create(_lightning(), ft.sgd(0.1), assigning)
    with pytest.raises(ft.ConfigError, match="cannot assign 'cache' on the model given to loss_fn"):
        ft.train_step(state, _batch())
    ft.train_step(state.replace(loss_fn=keeping), _batch())
    with pytest.raises(ft.ConfigError, match=r"a call on the model given to loss_fn after loss_fn"):
        kept[0](_batch()[0])
    with pytest.raises(ft.ConfigError, match="reading 'encoder' on the model given to loss_fn"):
        kept[0].encoder  # noqa: B018


def test_a_loss_that_closes_over_the_created_module_says_to_use_the_model_it_is_given():
    module = _lightning()
    state = ft.TrainState.create(module.eval(), ft.sgd(0.1), lambda m, b: module(b[0]).sum())
    with pytest.raises(ft.LossError, match="closes over the module given to TrainState.create"):
        ft.train_step(state, _batch())


# the probes torch's tracer and everyday Python make of an object they are handed: dynamo asks
# `if fn and callable(fn)` of every callable it meets, and builds the objects whose construction
# it traces with `object.__new__` before their `__init__` has run
_PROBES: dict[str, Any] = {
    "truth": bool,
    "callable": callable,
    "repr": repr,
    "dir": lambda m: "__call__" in dir(m),
    "wrapped": lambda m: hasattr(m, "__wrapped__"),
    "self": lambda m: getattr(m, "__self__", None),
    "dynamo inline": lambda m: getattr(m, "_torchdynamo_inline", None),
    "internal": lambda m: hasattr(m, "_functrain_internal"),
    "copy": lambda m: type(copy.copy(m)).__name__,
}


def _plain() -> nn.Module:
    return nn.Linear(3, 1)


def _container() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))


def _models_in_every_state(make: Any) -> dict[str, Any]:
    """The model loss_fn receives, inside the call and after it, and one made without __init__."""
    seen: dict[str, Any] = {}

    def loss_keeping_the_model(model: Any, batch: torch.Tensor) -> torch.Tensor:
        seen["open"] = {name: probe(model) for name, probe in _PROBES.items()}
        seen["model"] = model
        return model(batch).sum()

    state = ft.TrainState.create(make(), ft.sgd(0.1), loss_keeping_the_model)
    ft.train_step(state, torch.ones(2, 3))
    model = seen["model"]
    return {
        "open": seen["open"],
        "closed": {name: probe(model) for name, probe in _PROBES.items()},
        "made without __init__": {
            name: probe(object.__new__(type(model))) for name, probe in _PROBES.items()
        },
    }


@pytest.mark.parametrize("make", [_plain, _container], ids=["plain", "container"])
def test_the_model_answers_every_probe_open_closed_and_made_without_init(make: Any) -> None:
    answers = _models_in_every_state(make)
    name = type(make()).__name__
    for where, expected_repr in (
        ("open", f"BoundModel({name} on a state's tensors)"),
        ("closed", f"BoundModel({name} on a state's tensors)"),
        ("made without __init__", "BoundModel(no module)"),
    ):
        got = answers[where]
        assert got["truth"] is True and got["callable"] is True, where
        assert got["repr"] == expected_repr and got["dir"] is True, where
        assert got["wrapped"] is False and got["internal"] is False, where
        assert got["self"] is None and got["dynamo inline"] is None, where
        assert got["copy"] == "BoundModel", where


def test_the_truth_and_length_of_the_model_are_the_modules() -> None:
    seen: dict[str, Any] = {}

    def loss_asking(model: Any, batch: torch.Tensor) -> torch.Tensor:
        seen["branch"] = "true" if model else "false"  # a new user's `if model:` in loss_fn
        return model(batch).sum()

    ft.train_step(ft.TrainState.create(_plain(), ft.sgd(0.1), loss_asking), torch.ones(2, 3))
    assert seen["branch"] == "true"
    with pytest.raises(TypeError, match="object of type 'Linear' has no len"):
        len(_models_in_every_state_model(_plain))  # as len() of the module itself
    container = _models_in_every_state_model(_container)
    assert bool(container) and len(container) == 2  # structure only: it answers once closed
    empty = ft.BoundModel(nn.Sequential())
    assert not empty and len(empty) == 0


def _models_in_every_state_model(make: Any) -> Any:
    seen: dict[str, Any] = {}

    def loss_keeping_the_model(model: Any, batch: torch.Tensor) -> torch.Tensor:
        seen["model"] = model
        return model(batch).sum()

    state = ft.TrainState.create(make(), ft.sgd(0.1), loss_keeping_the_model)
    ft.eval_step(state, torch.ones(2, 3))
    return seen["model"]


def test_a_model_made_without_a_module_refuses_use_with_the_fix() -> None:
    unbound = object.__new__(ft.BoundModel)
    with pytest.raises(AttributeError, match="model given to loss_fn .no module. has no attribute"):
        unbound.weight  # noqa: B018
    for use, match in (
        (lambda: unbound(torch.ones(1, 3)), "a call on a BoundModel made without a module"),
        (lambda: unbound[0], "indexing on a BoundModel made without a module"),
        (lambda: len(unbound), r"len\(\) on a BoundModel made without a module"),
        (lambda: list(unbound), "iterating on a BoundModel made without a module"),
    ):
        with pytest.raises(ft.ConfigError, match=match):
            use()


def test_a_closed_model_refuses_its_weights_and_deep_copies_and_pickles_with_the_fix() -> None:
    import pickle

    model = _models_in_every_state_model(_plain)
    with pytest.raises(ft.ConfigError, match="reading 'weight' on the model given to loss_fn"):
        model.weight  # noqa: B018
    with pytest.raises(ft.ConfigError, match=r"deepcopy .* state.export_module\(\)"):
        copy.deepcopy(model)
    with pytest.raises(ft.ConfigError, match=r"cannot pickle .* \(functrain.save"):
        pickle.dumps(model)
    with pytest.raises(ft.ConfigError, match="cannot delete 'bias'"):
        del model.bias
    shallow = copy.copy(model)
    with pytest.raises(ft.ConfigError, match="after loss_fn returned"):
        shallow(torch.ones(1, 3))  # the same view: closed as the model it copies


class Running(nn.Module):
    """A running statistic recomputed out of place: ``self.running`` rebound in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("running", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.running = 0.9 * self.running + 0.1 * x.mean(0)
        return self.lin(x - self.running)


def test_a_buffer_rebound_in_forward_lands_in_the_given_tensor_as_functional_call_keeps_it():
    torch.manual_seed(0)
    module, x = Running(), torch.randn(4, 3)
    before = _snapshot(module)
    tensors = _fresh(module)
    reference = {k: v.clone() for k, v in tensors.items()}
    given = tensors["running"]
    out = call_with(module, tensors, (x,), {})
    expected = torch.func.functional_call(module, reference, (x,))
    assert torch.equal(out, expected)
    assert tensors["running"] is given  # the value carried into the tensor given, not rebound
    assert torch.equal(given, reference["running"])
    assert not torch.equal(given, torch.zeros(3))
    _assert_untouched(module, before)


class Rebinding(nn.Module):
    """A forward that rebinds what a step cannot carry: `how` says what."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("h", torch.zeros(2, 3))
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.lin(x) + self.h)
        if self.how == "parameter":
            self.lin.weight = nn.Parameter(self.lin.weight.detach() * 0.5)
        elif self.how == "attached":
            self.h = y
        elif self.how == "shape":
            self.h = y[:1].detach()
        elif self.how == "dtype":
            self.h = y.detach().double()
        else:
            self.h = None
        return y.sum()


@pytest.mark.parametrize(
    "how, words",
    [
        ("parameter", r"rebinds the parameter 'lin\.weight' \(to Parameter\): torch's optimizer"),
        ("attached", r"buffer 'h' to a tensor attached to the autograd graph.*h\.detach\(\)"),
        ("shape", r"buffer 'h' to a tensor of shape \[1, 3\] torch.float32 on cpu, where the "),
        ("dtype", r"buffer 'h' to a tensor of shape \[2, 3\] torch.float64 on cpu, where the "),
        ("none", r"the buffer 'h' to NoneType, where a tensor is expected"),
    ],
)
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_rebinding_a_step_cannot_carry_is_refused_with_the_state_as_it_was(
    how: str, words: str, donate: bool
) -> None:
    torch.manual_seed(0)
    state = ft.TrainState.create(Rebinding(how), ft.adamw(0.1), lambda m, x: m(x))
    before = state.clone()
    with pytest.raises(ft.ConfigError, match=words):
        ft.train_step(state, torch.randn(2, 3), donate=donate)
    assert ft.diff_states(before, state) == []
    # the structure is as it was: the same state trains a forward that rebinds nothing
    assert dict(state.module.named_buffers()).keys() == {"h"}
    assert set(dict(state.module.named_parameters())) == {"lin.weight", "lin.bias"}


class HiddenLM(nn.Module):
    """A recurrent LM keeping its hidden state in a buffer from batch to batch: `copied` writes
    it in place from the graph (``self.hidden.copy_(h)``), else it is rebound detached (the word-
    language-model example's ``repackage_hidden``)."""

    def __init__(self, copied: bool) -> None:
        super().__init__()
        self.emb, self.cell, self.out = nn.Embedding(11, 8), nn.RNNCell(8, 8), nn.Linear(8, 11)
        self.register_buffer("hidden", torch.zeros(4, 8))
        self.copied = copied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, outs = self.hidden, []
        for e in self.emb(x).unbind(1):
            h = self.cell(e, h)
            outs.append(h)
        if self.copied:
            self.hidden.copy_(h)
        else:
            self.hidden = h.detach()
        return self.out(torch.stack(outs, 1))


def _lm_loss(m: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten())


def _lm_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 11, (4, 5), generator=g),) * 2 for _ in range(3)]


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # (vmap's cell)
@pytest.mark.parametrize(
    ("engine", "donate"),
    [
        ("eager", False),
        ("eager", True),
        ("stacked", False),
        ("stacked", True),
        ("differentiable", False),  # (a differentiable state is never donated)
        ("compiled", False),
        ("compiled", True),
    ],
)
def test_a_hidden_state_written_into_a_buffer_from_the_graph_is_refused_as_torch_fails(
    engine: str, donate: bool
) -> None:
    # torch's loop fails at its first backward (the graph read the buffer the forward then
    # wrote); the step says so in its own words, naming the buffer and the rebinding that fixes it
    torch.manual_seed(0)
    net = HiddenLM(copied=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _lm_loss(net, _lm_batches()[0]).backward()
    torch.manual_seed(0)
    state = ft.TrainState.create(
        HiddenLM(copied=True), ft.sgd(0.1), _lm_loss, differentiable=engine == "differentiable"
    )
    if engine == "stacked":
        state = ft.stack([state, state.clone()])
    before = state.clone()
    step = ft.compile_step() if engine == "compiled" else ft.train_step
    with pytest.raises(ft.ConfigError, match=r"buffer 'hidden' in place.*self\.hidden = h\.detach"):
        step(state, _lm_batches()[0], donate=donate)
    assert ft.diff_states(before, state) == []
    if engine == "eager" and not donate:
        _rebound_detached_trains_as_torchs_loop()


def _rebound_detached_trains_as_torchs_loop() -> None:
    """The fix the refusal names: bit for bit with torch's loop, the hidden state carried."""
    torch.manual_seed(0)
    net = HiddenLM(copied=False)
    torch.manual_seed(0)
    state = ft.TrainState.create(HiddenLM(copied=False), ft.sgd(0.1), _lm_loss)
    optimizer = torch.optim.SGD(net.parameters(), 0.1)
    for batch in _lm_batches():
        optimizer.zero_grad()
        _lm_loss(net, batch).backward()
        optimizer.step()
        state, _ = ft.train_step(state, batch, donate=True)
    for name, p in net.named_parameters():
        assert torch.equal(state.params[name], p)
    assert torch.equal(state.buffers["hidden"], net.hidden)


class SettingUnheld(nn.Module):
    """A forward that gives a buffer the state holds no tensor for a value, as torch keeps it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("stat", None)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "none":  # a buffer registered as None, set in forward
            self.stat = x.mean(0).detach()
        else:  # a buffer the forward registers
            self.lin.register_buffer("seen", x.mean(0).detach())
        return self.lin(x).sum()


@pytest.mark.parametrize(
    "how, words",
    [
        ("none", r"sets the buffer 'stat' \(registered as None\), for which the state holds no"),
        ("new", r"sets the buffer 'lin\.seen' \(registered in forward\), for which the state"),
    ],
)
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_buffer_the_state_holds_no_tensor_for_set_in_forward_is_refused(
    how: str, words: str, donate: bool
) -> None:
    torch.manual_seed(0)
    model = SettingUnheld(how)
    reference = copy.deepcopy(model)
    reference(torch.randn(2, 3))  # torch's module keeps the value: the state could not
    assert len(dict(reference.named_buffers())) == 1
    state = ft.TrainState.create(model, ft.adamw(0.1), lambda m, x: m(x))
    before = state.clone()
    with pytest.raises(ft.ConfigError, match=words + ".*register it before TrainState.create"):
        ft.train_step(state, torch.randn(2, 3), donate=donate)
    assert ft.diff_states(before, state) == []
    # the structure is as it was, holding no value another state would read
    assert state.module.stat is None and dict(state.module.named_buffers()) == {}
    assert isinstance(state.export_module(), SettingUnheld)


class LazyMask(nn.Module):
    """A causal mask cached on first use in a non-persistent buffer registered as None, as many
    attention modules keep it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)
        self.register_buffer("mask", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if self.mask is None or self.mask.shape[0] < t:
            self.mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        q, k, v = self.qkv(x).chunk(3, -1)
        weights = (q @ k.transpose(1, 2)).masked_fill(self.mask[:t, :t], float("-inf"))
        return self.out(weights.softmax(-1) @ v)


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_non_persistent_cache_set_in_forward_trains_and_exports_as_torch_keeps_it(
    donate: bool,
) -> None:
    # torch's state_dict leaves such a buffer out: the cache stays on the module's structure
    torch.manual_seed(0)
    model = LazyMask()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(reference.parameters(), 1e-2, fused=True)  # ft.adamw's kernel

    def loss_fn(m: nn.Module, b: Any) -> torch.Tensor:
        return F.mse_loss(m(b[0]), b[1])

    state = ft.TrainState.create(model, ft.adamw(1e-2), loss_fn)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = (torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen))
        state, _ = ft.train_step(state, batch, donate=donate)
        optimizer.zero_grad()
        loss_fn(reference, batch).backward()
        optimizer.step()
    for name, p in reference.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.equal(state.export_module()(x), reference(x))


def test_a_compiled_step_and_a_stacked_state_refuse_a_rebound_buffer_naming_train_step():
    def states() -> list[ft.TrainState]:
        return [
            ft.TrainState.create(Running(), ft.adamw(0.1), lambda m, x: m(x).sum(), seed=s)
            for s in range(2)
        ]

    words = r"rebinds the buffer 'running' .* train it with functrain\.train_step"
    state, x = states()[0], torch.randn(4, 3)
    with pytest.raises(ft.ConfigError, match=words):
        ft.compile_step(backend="aot_eager")(state, x)
    with pytest.raises(ft.ConfigError, match=words):
        ft.train_step(ft.stack(states()), x)


class Centering(nn.Module):
    """DINO's loss: a center of the teacher's outputs, rebound in a method of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(1, 3))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        q = F.softmax((teacher - self.center) / 0.04, dim=-1)
        with torch.no_grad():
            self.center = self.center * 0.9 + teacher.mean(0, keepdim=True) * 0.1
        return torch.sum(-q * F.log_softmax(student / 0.1, dim=-1), dim=-1).mean()


class Distilled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)
        self.centering = Centering()


def test_a_buffer_rebound_on_a_module_outside_the_state_is_refused_and_put_back():
    # DINO keeps DINOLoss beside the student; the step would carry its center nowhere
    outside = Centering()

    def loss_fn(m: nn.Module, b: Any) -> torch.Tensor:
        return outside(m(b + 0.5), m(b).detach())

    torch.manual_seed(0)
    state = ft.TrainState.create(nn.Linear(4, 3), ft.adamw(1e-2), loss_fn)
    with pytest.raises(ft.ConfigError, match=r"Centering\.center .* submodule of the model"):
        ft.train_step(state, torch.randn(8, 4))
    assert torch.equal(outside.center, torch.zeros(1, 3))  # put back as it was
    # the same loss as a submodule: torch's loop, center and weights, bit for bit
    torch.manual_seed(0)
    reference = Distilled()
    state = ft.TrainState.create(
        copy.deepcopy(reference),
        ft.adamw(1e-2),
        lambda m, b: m.centering(m.net(b + 0.5), m.net(b).detach()),
    )
    optimizer = torch.optim.AdamW(reference.parameters(), 1e-2, fused=True)
    for x in torch.randn(3, 8, 4, generator=torch.Generator().manual_seed(1)):
        state, _ = ft.train_step(state, x)
        optimizer.zero_grad()
        reference.centering(reference.net(x + 0.5), reference.net(x).detach()).backward()
        optimizer.step()
    assert torch.equal(state.buffers["centering.center"], reference.centering.center)
    for name, p in reference.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name


def test_a_functional_call_on_a_module_outside_the_state_whose_forward_rebinds_a_buffer_trains():
    # a critic of the user's own, outside the state, run on the weights the batch brings: its
    # spectral norm rebinds u and v (self._u = ...) on the tensors swapped in, and functional_call
    # puts the module's own back, as in torch's loop: nothing is kept, nothing refused
    torch.manual_seed(0)
    critic = nn.Sequential(
        nn.utils.parametrizations.spectral_norm(nn.Linear(2, 4)), nn.Linear(4, 1)
    )
    own = {k: b.clone() for k, b in critic.named_buffers()}

    def loss_fn(g: nn.Module, batch: Any) -> torch.Tensor:
        noise, weights = batch
        return -torch.func.functional_call(critic, weights, (g(noise),)).mean()

    weights = {k: t.detach().clone() for k, t in critic.state_dict().items()}
    generator = nn.Linear(4, 2)
    state = ft.TrainState.create(copy.deepcopy(generator), ft.adam(1e-3), loss_fn)
    noise = torch.randn(8, 4)
    stepped, _ = ft.train_step(state, (noise, {k: t.clone() for k, t in weights.items()}))
    optimizer = torch.optim.Adam(generator.parameters(), 1e-3, fused=True)
    loss_fn(generator, (noise, {k: t.clone() for k, t in weights.items()})).backward()
    optimizer.step()
    for name, p in generator.named_parameters():
        assert torch.equal(stepped.params[name], p.detach()), name
    assert all(torch.equal(b, own[k]) for k, b in critic.named_buffers())


def test_a_buffer_another_thread_rebinds_while_a_step_runs_is_not_the_steps():
    # torch code in another thread (a counter of its own) rebinds its buffer during a step: as in
    # torch, it keeps each value, and the step is not refused for it
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("n", torch.zeros(()))

        def forward(self) -> None:
            self.n = self.n + 1

    counter, inside, done = Counter(), threading.Event(), threading.Event()

    def other() -> None:
        inside.wait()
        counter()
        done.set()

    def loss_fn(m: nn.Module, b: Any) -> torch.Tensor:
        inside.set()
        assert done.wait(30)
        return m(b).pow(2).mean()

    thread = threading.Thread(target=other)
    thread.start()
    torch.manual_seed(0)
    reference = nn.Linear(4, 2)
    state = ft.TrainState.create(copy.deepcopy(reference), ft.sgd(0.1), loss_fn)
    x = torch.randn(8, 4)
    state, _ = ft.train_step(state, x)
    thread.join()
    assert torch.equal(counter.n, torch.tensor(1.0))
    optimizer = torch.optim.SGD(reference.parameters(), 0.1)
    reference(x).pow(2).mean().backward()
    optimizer.step()
    assert all(torch.equal(state.params[k], p) for k, p in reference.named_parameters())


def test_an_evaluation_keeps_a_buffer_rebound_on_a_module_outside_the_state_as_torch_does():
    # a metric module beside the model, counting over the validation batches: torch's evaluation
    # loop keeps each value, and an evaluation carries nothing the state would lose
    class Total(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("total", torch.zeros(()))

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            self.total = self.total + v.detach().sum()
            return v

    ours, theirs = Total(), Total()
    torch.manual_seed(0)
    reference = nn.Linear(4, 1)
    state = ft.TrainState.create(
        copy.deepcopy(reference), ft.sgd(0.1), lambda m, b: ours(m(b[0])).sub(b[1]).pow(2).mean()
    )
    batches = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(3)]
    reference.eval()
    with torch.no_grad():
        for x, y in batches:
            ft.eval_step(state, (x, y))
            theirs(reference(x))
    assert torch.equal(ours.total, theirs.total)
