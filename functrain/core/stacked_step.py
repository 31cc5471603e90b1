"""The step of a stacked state (`functrain.stack`): K members trained by one call.

(moved from `functrain.core.stacked`; rewritten below)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain.core.body import eval_body, train_body
from functrain.core.scope import device_generator
from functrain.core.state import TrainState
from functrain.core.view import StateView, parts_of, statics_of
from functrain.errors import BatchError
from functrain.optim.base import NO_EXTRAS, Extras
from functrain.optim.batching import STACKED
from functrain.optim.sweep import enter_member, leave_member
from functrain.tree import tree_flatten, tree_unflatten

__all__ = ["PerMember", "member_function", "vmapped", "stacked_train_step", "stacked_eval_step"]


class PerMember(NamedTuple):
    """A batch for a stacked state that gives each member its own data.

    Every tensor of `batch` has a leading member dimension of size K (the state's members): member
    ``k`` trains on ``batch`` with each tensor indexed ``[k]`` (bagging, bootstrap samples, K data
    orders). A batch given without this wrapper is shared by all members.

    Example:
        >>> import torch, functrain as ft
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> def make(k):
        ...     torch.manual_seed(k)
        ...     return ft.TrainState.create(torch.nn.Linear(3, 1), ft.sgd(0.1), loss_fn, seed=k)
        >>> ens = ft.stack([make(k) for k in range(2)])
        >>> xs, ys = torch.randn(2, 8, 3), torch.randn(2, 8, 1)  # member 0's rows, member 1's
        >>> ens, metrics = ft.train_step(ens, ft.PerMember((xs, ys)))
        >>> metrics["loss"].shape
        torch.Size([2])
    """

    batch: Any


_SLOT = object()  # where a tensor goes when a tree is rebuilt from its tensor leaves


def member_function(
    statics: dict[str, Any], parts: tuple, body: Callable[..., Any]
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``body(view, batch, extras)`` as a function of one member's tensors only.

    It is for `torch.func.vmap`, with the member's index entered for sweeps
    (`functrain.optim.sweep`).

    Returns ``(fn, out)``: ``fn(tensors, batch)``, `tensors` the tensor leaves of `parts` in order
    (`_tensors`), rebuilds one member's view of the state from its slices and returns the tensor
    leaves of `body`'s result; ``out["rebuild"](leaves)`` (set by the first call, a trace under
    torch.compile) puts them back into the result's structure: vmap takes and gives tensors only.
    The function depends only on the configuration (statics and tree structure), so a compiled
    form of it serves every state of that configuration.
    """
    leaves, spec = tree_flatten(parts)
    fixed_in = [_SLOT if isinstance(x, torch.Tensor) else x for x in leaves]
    out: dict[str, Any] = {}

    def fn(member: list[torch.Tensor], batch: Any) -> list[torch.Tensor]:
        it = iter(member[:-1])  # the last tensor is the member's index, for sweeps
        view = StateView(
            statics, *tree_unflatten([next(it) if x is _SLOT else x for x in fixed_in], spec)
        )
        # sweeps read the member's index (`functrain.optim.sweep`), and
        # `functrain.optim.batching.under_vmap` the flag while dynamo traces the body
        previous, was_stacked = enter_member(member[-1]), STACKED.active
        STACKED.active = True
        try:
            res_leaves, res_spec = tree_flatten(body(view, batch, NO_EXTRAS))
        finally:
            STACKED.active = was_stacked
            leave_member(previous)
        fixed = [_SLOT if isinstance(x, torch.Tensor) else x for x in res_leaves]

        def rebuild(values: list[torch.Tensor]) -> Any:
            vals = iter(values)
            return tree_unflatten([next(vals) if x is _SLOT else x for x in fixed], res_spec)

        out["rebuild"] = rebuild
        return [x for x in res_leaves if isinstance(x, torch.Tensor)]

    return fn, out


def _tensors(parts: tuple, members: int, device: torch.device) -> list[torch.Tensor]:
    """The tensor leaves of `parts`, then the members' indices (what `member_function`'s takes)."""
    return [
        *(x for x in tree_flatten(parts)[0] if isinstance(x, torch.Tensor)),
        torch.arange(members, device=device),
    ]


def vmapped(fn: Callable[..., Any], per_member: bool = False) -> Callable[..., Any]:
    """`fn` over the members: the state's tensors batched on dimension 0, the batch shared.

    With `per_member` the batch's tensors are batched on dimension 0 too (`PerMember`).
    """
    return torch.func.vmap(fn, in_dims=(0, 0 if per_member else None), randomness="different")


def member_batch(batch: Any, members: int) -> tuple[Any, bool]:
    """``(batch, per_member)``: a `PerMember` batch unwrapped (its shapes checked), else as given.

    Raises:
        BatchError: a tensor of a `PerMember` batch without a leading dimension of `members`.
    """
    if not isinstance(batch, PerMember):
        return batch, False
    leaves = tree_flatten(batch.batch)[0]
    wrong = [
        list(x.shape)
        for x in leaves
        if isinstance(x, torch.Tensor) and (x.ndim == 0 or x.shape[0] != members)
    ]
    if wrong or not any(isinstance(x, torch.Tensor) for x in leaves):
        raise BatchError(
            f"a PerMember batch needs a leading member dimension of {members} (the state's "
            f"members) on every tensor, got shapes {wrong or 'no tensor'}; stack the members' "
            "batches with torch.stack, or pass the batch unwrapped to share it"
        )
    return batch.batch, True


def _draw(generator: torch.Generator, rng: torch.Tensor) -> tuple[int, torch.Tensor]:
    """One value from a member's stream and the stream after it (on the host; no sync on CPU)."""
    generator.set_state(rng.contiguous() if rng.storage_offset() == 0 else rng.clone())
    if generator.device.type == "cpu":
        value = int(torch.randint(0, 2**62, (1,), generator=generator))
    else:
        # a device draw would need a host read: the Philox seed and offset say where the stream is
        value = (generator.initial_seed() * 0x9E3779B97F4A7C15 + generator.get_offset()) % 2**62
        generator.set_offset(generator.get_offset() + 4)
    return value, generator.get_state()


def _step_seed(draws: list[int]) -> int:
    digest = hashlib.blake2b(
        b"".join(d.to_bytes(8, "little") for d in draws), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") % 2**63


class _StackedScope:
    """The generator and module mode around a stacked step (`enter`/`leave` of one state)."""

    def __init__(self, state: TrainState, training: bool, advance: bool) -> None:
        self.module, self.was_training = state.module, state.module.training
        self.generator = device_generator(state.device)
        self.saved = self.generator.get_state()
        draws, rngs = zip(
            *(_draw(self.generator, r) for r in state.rng.clone().unbind(0)), strict=True
        )
        self.next_rng = torch.stack(rngs) if advance else state.rng
        self.generator.manual_seed(_step_seed(list(draws)))
        if self.module.training != training:
            self.module.train(training)

    def close(self) -> None:
        self.generator.set_state(self.saved)
        if self.module.training != self.was_training:
            self.module.train(self.was_training)


def stacked_train_step(
    state: TrainState, batch: Any, compiled: tuple[Callable[..., Any], dict[str, Any]] | None = None
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """`train_step` for a stacked state: the step body under ``vmap`` over the members.

    `compiled`, when given, is ``(run, out)``: a compiled ``vmapped(fn)`` and the `out` of its
    `member_function` (`compile_step` passes them). Called by `train_step` and `compile_step`.
    """
    parts = parts_of(state)
    batch, per_member = member_batch(batch, state.rng.shape[0])
    if compiled is None:
        fn, out = member_function(statics_of(state), parts, train_body)
        run = vmapped(fn, per_member)
    else:
        run, out = compiled
    scope = _StackedScope(state, training=True, advance=True)
    try:
        leaves = run(_tensors(parts, state.rng.shape[0], state.device), batch)
    finally:
        scope.close()
    new, metrics = out["rebuild"](leaves)
    return state.replace(rng=scope.next_rng, **new), metrics


def stacked_eval_step(state: TrainState, batch: Any, use_ema: bool) -> dict[str, torch.Tensor]:
    """`eval_step` for a stacked state: ``[K]`` metrics; the state and caller's RNG unchanged."""

    def body(view: StateView, batch: Any, extras: Extras) -> dict[str, torch.Tensor]:
        return eval_body(view, batch, use_ema)  # no update: the extras go unread

    parts = parts_of(state)
    batch, per_member = member_batch(batch, state.rng.shape[0])
    fn, out = member_function(statics_of(state), parts, body)
    scope = _StackedScope(state, training=False, advance=False)
    try:
        leaves = vmapped(fn, per_member)(_tensors(parts, state.rng.shape[0], state.device), batch)
    finally:
        scope.close()
    return out["rebuild"](leaves)
