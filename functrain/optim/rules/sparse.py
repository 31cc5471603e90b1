"""Updates for sparse gradients (``nn.Embedding(sparse=True)``): torch.optim's own, bit for bit.

A sparse embedding's gradient holds the rows a batch looked up (a sparse COO tensor, its rows
repeated as often as they were looked up). torch.optim trains it with SGD, Adagrad and
SparseAdam, each touching only those rows; when any gradient of a group is sparse, SGD and Adagrad
run their single-tensor path for every parameter of it. These transforms
are those updates: `sparse_sgd` and `sparse_adagrad` on every parameter (sparse or dense
gradient), `sparse_adam_update` (`functrain.sparse_adam`) on sparse gradients only (torch's
SparseAdam refuses dense ones; pair it with a dense optimizer for the rest, `functrain.partition`).
`TrainState.create` puts `sparse_sgd` / `sparse_adagrad` in place of ``sgd(...)`` /
``adagrad(...)`` when the module has sparse parameters (`sparse_twin`), and refuses any other
optimizer there with the fix.

Each takes the same ops torch takes (``add(alpha=-lr)`` of the uncoalesced gradient for SGD; the
coalesced gradient's rows for Adagrad and SparseAdam), so the bits are torch's. The rate and the
bias corrections are Python floats, as torch computes them: the step count lives on the CPU and a
schedule's value is read to the host (on a GPU, one sync a step, as torch's Adagrad reads its step).
Gated (`Transform.gated`): where ``keep`` is False the rows' changes are zeros, added (a parameter
or moment plus zero is itself), so a donated step writes the rows in place whatever the flag.
Optimizer states are as torch keeps them: Adagrad's sums and SparseAdam's moments are dense;
SGD's momentum buffer of a sparse gradient is itself sparse: a sparse COO tensor that grows by the
rows of every step (torch never coalesces it), a state leaf of its own kind (it is saved as its
indices and values, `functrain.checkpoint.format`). Its update reads the step's skip flag on the
host: a skipped step leaves the buffer as it was, which no sum with zeros can do for a tensor whose
rows only grow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain.errors import ConfigError, config_check
from functrain.layout import sparse_coo
from functrain.optim.base import NO_EXTRAS, Extras, ExtrasUpdate, LearningRate, Transform
from functrain.optim.checks import check_positive
from functrain.optim.rates import value_at
from functrain.optim.updates import NewParams, flat_updates
from functrain.optim.zeros import light_copy, writable, zeros_like
from functrain.tree import Tree, tree_leaves

__all__ = [
    "SparseAdagradState",
    "SparseAdamState",
    "SparseSgdState",
    "sparse_adagrad",
    "sparse_adam_update",
    "sparse_sgd",
    "sparse_twin",
    "takes_sparse",
    "takes_sparse_too",
    "unused",
    "no_rows",
    "with_sparse_twin",
]


class SparseSgdState(NamedTuple):
    # 0-d int64 on the CPU: updates applied (the schedule's step)
    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    lr: torch.Tensor  # 0-d float64: the learning rate of the last update
    # with momentum, torch's ``momentum_buffer`` of each parameter: dense for a dense gradient,
    # sparse COO (uncoalesced, its rows growing every step) for a sparse one; zeros until made
    momentum: tuple[torch.Tensor, ...] = ()
    # whether each buffer is made (0-d bool on the CPU): torch makes it at the parameter's first
    # step with a gradient, as a copy of that gradient
    made: tuple[torch.Tensor, ...] = ()

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lr": self.lr}


class SparseAdagradState(NamedTuple):
    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    sum_of_squares: tuple[torch.Tensor, ...]
    lr: torch.Tensor
    # each parameter's own step (0-d int64 on the CPU), as torch counts it: only where it had a
    # gradient (a sparse parameter the batch did not use has none)
    steps: tuple[torch.Tensor, ...] = ()

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lr": self.lr}


class SparseAdamState(NamedTuple):
    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    mu: tuple[torch.Tensor, ...]
    nu: tuple[torch.Tensor, ...]
    lr: torch.Tensor
    steps: tuple[torch.Tensor, ...] = ()  # each parameter's own step (`SparseAdagradState`)

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lr": self.lr}


def _host_count() -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64)


def _steps_of(steps: tuple[torch.Tensor, ...], count: torch.Tensor, n: int) -> Any:
    """Each parameter's step: the state's own, or (a state without them) the transform's count."""
    return steps if len(steps) == n else (count,) * n


def _rate(lr: LearningRate, count: torch.Tensor) -> float:
    """The step's learning rate as the Python float torch's group holds (a schedule's, read)."""
    return float(value_at(lr, count)) if callable(lr) else float(lr)


def _begin(
    updates: Any, params: Tree | None, what: str
) -> tuple[list[torch.Tensor], list[torch.Tensor], Any]:
    if params is None:
        raise ConfigError(f"{what} updates the parameters itself; pass params= to update")
    g, spec = flat_updates(updates, params)
    return g, tree_leaves(params), spec


def _rows(grad: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A sparse tensor of `grad`'s indices and shape holding `values` (torch's ``_make_sparse``)."""
    return sparse_coo(grad._indices(), values, grad.shape, check=False)


def _masked(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """`values` where `keep` holds, zeros elsewhere (added, they change nothing)."""
    return values if keep is None else torch.where(keep, values, torch.zeros_like(values))


def _own(t: torch.Tensor, in_place: bool) -> torch.Tensor:
    """`t` to write into: itself in a donated step (a copy where it has no storage), else a copy
    (a sparse tensor, SGD's momentum of sparse gradients: itself, or its rows copied)."""
    if t.is_sparse:
        return t if in_place else t.clone()
    return writable(t, t) if in_place else t.clone(memory_format=torch.contiguous_format)


def _counted(count: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return count + 1 if keep is None else count + keep.to("cpu")  # a bool adds as 0 or 1


def unused(grad: torch.Tensor) -> bool:
    """Whether `grad` stands for no gradient (`no_rows`).

    torch.optim skips a parameter without a gradient, its step included. A gradient without rows
    is not that: an embedding whose batch looked up only its ``padding_idx`` (or a bag of empty
    bags) gets one, and torch steps it (counts the step, moves SGD's momentum).
    """
    return grad.is_sparse and grad._nnz() == 0 and grad.sparse_dim() == grad.dim()


def no_rows(p: torch.Tensor) -> torch.Tensor:
    """The gradient of a sparse parameter the loss did not use this step, which the updates here
    skip as torch.optim skips a None gradient: a sparse tensor of `p`'s shape without rows, sparse
    in every dimension, unlike an embedding's gradient (sparse in its rows only), also one without
    rows. Added to a gradient, it is that gradient."""
    return sparse_coo(
        torch.zeros((p.dim(), 0), dtype=torch.int64, device=p.device),
        torch.zeros((0,), dtype=p.dtype, device=p.device),
        p.shape,
        check=False,
    )


def _last_lr(rate: float, previous: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    new = torch.tensor(rate, dtype=torch.float64)
    return new if keep is None else torch.where(keep.to("cpu"), new, previous)


def sparse_sgd(
    lr: LearningRate,
    *,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> Transform:
    """``torch.optim.SGD(lr, momentum, dampening, nesterov, maximize)`` (no weight decay) with
    sparse gradients.

    torch's single-tensor update on every parameter: a sparse gradient adds its rows as they come
    (uncoalesced), a dense one as usual. With momentum, each parameter's buffer is made as a copy
    of its first gradient, then ``buf.mul_(momentum).add_(grad, alpha=1 - dampening)``: the
    buffer of a sparse gradient is a sparse tensor holding every step's rows, as torch's.

    Example:
        >>> _ = torch.manual_seed(0)  # weights where w - 0.5 - 0.5 == w - 1.0, whatever ran before
        >>> emb = torch.nn.Embedding(4, 2, sparse=True)
        >>> emb(torch.tensor([1, 1])).sum().backward()
        >>> tx = sparse_sgd(0.5)
        >>> p = {"w": emb.weight.detach()}
        >>> u, _ = tx.update({"w": emb.weight.grad}, tx.init(p), p)
        >>> bool(torch.equal(u.values[0][1], p["w"][1] - 1.0))  # the row looked up twice
        True
        >>> tx = sparse_sgd(0.5, momentum=0.9)
        >>> _, s = tx.update({"w": emb.weight.grad}, tx.init(p), p)
        >>> s.momentum[0].is_sparse, s.momentum[0]._nnz()  # the buffer: the gradient's two rows
        (True, 2)
    """
    if not 0.0 <= momentum:
        config_check([f"momentum must be >= 0, got momentum={momentum!r}"], "sgd")

    def init_fn(params: Tree) -> SparseSgdState:
        count = _host_count()
        rate = torch.tensor(_rate(lr, count), dtype=torch.float64)
        if not momentum:
            return SparseSgdState(count, rate)
        leaves = tree_leaves(params)
        return SparseSgdState(
            count,
            rate,
            tuple(zeros_like(p) for p in leaves),
            tuple(torch.zeros((), dtype=torch.bool) for _ in leaves),
        )

    def update_fn(
        updates: Any,
        state: SparseSgdState,
        params: Tree | None = None,
        keep: torch.Tensor | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[NewParams, SparseSgdState]:
        g, p, spec = _begin(updates, params, "sparse SGD")
        rate = _rate(lr, state.count)
        in_place = extras.may_write() if any(x.is_sparse for x in g) else False
        if momentum:
            new, buffers, made = _with_momentum(g, p, state, rate, keep, in_place)
            return NewParams(new, spec), SparseSgdState(
                _counted(state.count, keep), _last_lr(rate, state.lr, keep), buffers, made
            )
        new = []
        for grad, param in zip(g, p, strict=True):
            grad = -grad if maximize else grad
            if grad.is_sparse:
                step = grad if keep is None else _rows(grad, _masked(grad._values(), keep))
                new.append(_own(param, in_place).add_(step, alpha=-rate))
            else:
                moved = torch.add(param, grad, alpha=-rate)
                new.append(moved if keep is None else torch.where(keep, moved, param))
        return NewParams(new, spec), SparseSgdState(
            _counted(state.count, keep), _last_lr(rate, state.lr, keep)
        )

    def _with_momentum(
        g: list[torch.Tensor],
        p: list[torch.Tensor],
        state: SparseSgdState,
        rate: float,
        keep: torch.Tensor | None,
        in_place: bool,
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """torch's momentum update of each parameter (`sparse_sgd`), where the step is kept."""
        if keep is not None and not bool(keep.to("cpu")):  # skipped: everything as it was
            return (
                [_kept(x, in_place) for x in p],
                tuple(_kept(b, in_place) for b in state.momentum),
                state.made,
            )
        new, buffers, made = [], [], []
        for grad, param, buf, has in zip(g, p, state.momentum, state.made, strict=True):
            if unused(grad):  # torch skips a parameter without a gradient, its buffer too
                new.append(_kept(param, in_place))
                buffers.append(_kept(buf, in_place))
                made.append(has)
                continue
            grad = -grad if maximize else grad
            if bool(has):
                buf = _own(buf, in_place).mul_(momentum).add_(grad, alpha=1 - dampening)
            else:
                buf = grad.detach().clone()
            step = grad.add(buf, alpha=momentum) if nesterov else buf
            new.append(_own(param, in_place).add_(step, alpha=-rate))
            buffers.append(buf)
            made.append(torch.ones((), dtype=torch.bool))
        return new, tuple(buffers), tuple(made)

    return Transform(init_fn, ExtrasUpdate(update_fn, sparse=True), "sparse_sgd", gated=True)


def _kept(t: torch.Tensor, in_place: bool) -> torch.Tensor:
    """`t` as the new state keeps it unchanged: itself in a donated step, else a copy (a pure
    step's result shares no tensor with its input, which a later donated step could write)."""
    return t if in_place else light_copy(t)


def sparse_adagrad(
    lr: LearningRate,
    eps: float = 1e-10,
    *,
    lr_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    maximize: bool = False,
) -> Transform:
    """``torch.optim.Adagrad(...)`` (no weight decay) with sparse gradients, as torch runs it.

    Its single-tensor update on every parameter: for a sparse gradient, coalesced, the sums of
    squares grow at its rows and the rows move by ``values / (sqrt(sum) + eps)``; a dense gradient
    takes the dense update. The sums are dense, as torch keeps them.

    Example:
        >>> tx = sparse_adagrad(0.1)
        >>> p = {"w": torch.ones(3, 2)}
        >>> g = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]).to_sparse(1)  # row 0
        >>> u, s = tx.update({"w": g}, tx.init(p), p)
        >>> u.values[0][:, 0], s.sum_of_squares[0][:, 0]
        (tensor([0.9000, 1.0000, 1.0000]), tensor([1., 0., 0.]))
    """
    problems: list[str] = []
    check_positive(problems, "eps", eps, allow_zero=True)
    check_positive(problems, "lr_decay", lr_decay, allow_zero=True)
    check_positive(
        problems, "initial_accumulator_value", initial_accumulator_value, allow_zero=True
    )
    config_check(problems, "adagrad")

    def init_fn(params: Tree) -> SparseAdagradState:
        count = _host_count()
        sums = tuple(
            torch.full_like(p, initial_accumulator_value, memory_format=torch.preserve_format)
            for p in tree_leaves(params)
        )
        return SparseAdagradState(
            count,
            sums,
            torch.tensor(_rate(lr, count), dtype=torch.float64),
            tuple(_host_count() for _ in sums),
        )

    def update_fn(
        updates: Any,
        state: SparseAdagradState,
        params: Tree | None = None,
        keep: torch.Tensor | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[NewParams, SparseAdagradState]:
        g, p, spec = _begin(updates, params, "sparse Adagrad")
        rate = _rate(lr, state.count)
        in_place = extras.may_write() if any(x.is_sparse for x in g) else False
        steps = _steps_of(state.steps, state.count, len(p))
        new_p, new_sums, new_steps = [], [], []
        for grad, param, total, taken in zip(g, p, state.sum_of_squares, steps, strict=True):
            if unused(grad):  # torch skips a parameter without a gradient, its step too
                new_p.append(_kept(param, in_place))
                new_sums.append(_kept(total, in_place))
                new_steps.append(taken)
                continue
            new_steps.append(_counted(taken, keep))
            step = int(taken) + 1  # torch's per-parameter step, read as a float
            clr = rate / (1 + (float(step) - 1) * lr_decay)
            grad = -grad if maximize else grad
            if grad.is_sparse:
                grad = grad.coalesce()
                values = grad._values()
                total = _own(total, in_place).add_(_rows(grad, _masked(values.pow(2), keep)))
                std = total.sparse_mask(grad)._values().sqrt_().add_(eps)
                moved = _own(param, in_place).add_(
                    _rows(grad, _masked(values / std, keep)), alpha=-clr
                )
                new_p.append(moved)
                new_sums.append(total)
                continue
            summed = total.addcmul(grad, grad, value=1)
            moved = param.addcdiv(grad, summed.sqrt().add_(eps), value=-clr)
            if keep is not None:
                summed, moved = torch.where(keep, summed, total), torch.where(keep, moved, param)
            new_p.append(moved)
            new_sums.append(summed)
        return NewParams(new_p, spec), SparseAdagradState(
            _counted(state.count, keep),
            tuple(new_sums),
            _last_lr(rate, state.lr, keep),
            tuple(new_steps),
        )

    return Transform(init_fn, ExtrasUpdate(update_fn, sparse=True), "sparse_adagrad", gated=True)


def sparse_adam_update(
    lr: LearningRate, b1: float, b2: float, eps: float, *, maximize: bool = False
) -> Transform:
    """The transform behind `functrain.sparse_adam` (``torch.optim.SparseAdam``), which checks
    the learning rate; the other hyperparameters are checked here, under their names."""
    problems: list[str] = []
    check_positive(problems, "eps", eps)
    for name, beta in (("b1", b1), ("b2", b2)):
        if not 0.0 <= beta < 1.0:
            problems.append(f"{name} must be in [0, 1), got {name}={beta!r}")
    config_check(problems, "sparse_adam")

    def init_fn(params: Tree) -> SparseAdamState:
        count = _host_count()
        leaves = tree_leaves(params)
        zeros = tuple(torch.zeros_like(p, memory_format=torch.preserve_format) for p in leaves)
        twins = tuple(torch.zeros_like(p, memory_format=torch.preserve_format) for p in leaves)
        return SparseAdamState(
            count,
            zeros,
            twins,
            torch.tensor(_rate(lr, count), dtype=torch.float64),
            tuple(_host_count() for _ in leaves),
        )

    def update_fn(
        updates: Any,
        state: SparseAdamState,
        params: Tree | None = None,
        keep: torch.Tensor | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[NewParams, SparseAdamState]:
        g, p, spec = _begin(updates, params, "SparseAdam")
        dense = [i for i, x in enumerate(g) if not x.is_sparse]  # (an unused one: no rows)
        if dense:
            raise ConfigError(
                f"sparse_adam takes sparse gradients only, as torch's SparseAdam does, and got "
                f"{len(dense)} dense one(s); give it the sparse embeddings only and the rest of "
                "the model a dense optimizer: functrain.partition(lambda name, p: 'rows' if "
                "name.startswith('<the embedding>.') else 'dense', "
                "rows=functrain.sparse_adam(...), dense=functrain.adam(...))"
            )
        rate = _rate(lr, state.count)
        in_place = extras.may_write()
        steps = _steps_of(state.steps, state.count, len(p))
        new_p, new_mu, new_nu, new_steps = [], [], [], []
        for grad, param, mu, nu, taken in zip(g, p, state.mu, state.nu, steps, strict=True):
            if unused(grad):  # torch skips a parameter without a gradient, its step too
                new_p.append(_kept(param, in_place))
                new_mu.append(_kept(mu, in_place))
                new_nu.append(_kept(nu, in_place))
                new_steps.append(taken)
                continue
            new_steps.append(_counted(taken, keep))
            step = int(taken) + 1
            step_size = rate * math.sqrt(1 - b2**step) / (1 - b1**step)
            grad = (-grad if maximize else grad).coalesce()
            values = grad._values()
            old_mu = mu.sparse_mask(grad)._values()
            mu_step = values.sub(old_mu).mul_(1 - b1)
            mu = _own(mu, in_place).add_(_rows(grad, _masked(mu_step, keep)))
            old_nu = nu.sparse_mask(grad)._values()
            nu_step = values.pow(2).sub_(old_nu).mul_(1 - b2)
            nu = _own(nu, in_place).add_(_rows(grad, _masked(nu_step, keep)))
            numer = mu_step.add_(old_mu)
            denom = nu_step.add_(old_nu).sqrt_().add_(eps)
            moved = _own(param, in_place).add_(
                _rows(grad, _masked(-step_size * numer.div_(denom), keep))
            )
            new_p.append(moved)
            new_mu.append(mu)
            new_nu.append(nu)
        return NewParams(new_p, spec), SparseAdamState(
            _counted(state.count, keep),
            tuple(new_mu),
            tuple(new_nu),
            _last_lr(rate, state.lr, keep),
            tuple(new_steps),
        )

    return Transform(init_fn, ExtrasUpdate(update_fn, sparse=True), "sparse_adam", gated=True)


def takes_sparse_too(tx: Transform) -> Transform:
    """`tx`, its update declaring that it takes sparse gradients (`takes_sparse`)."""
    return tx._replace(update=_declared(tx).but(sparse=True))


def with_sparse_twin(tx: Transform, twin: Callable[[], Transform] | str) -> Transform:
    """`tx`, its update declaring how its configuration trains sparse gradients.

    `twin`: a builder of the transform that runs the same configuration as torch.optim does when
    gradients are sparse (`TrainState.create` puts it in place of `tx` for a module with sparse
    parameters), or why there is none (the words of create's refusal).
    """
    return tx._replace(update=_declared(tx).but(sparse_twin=twin))


def _declared(tx: Transform) -> ExtrasUpdate:
    """`tx`'s update, an `ExtrasUpdate` (every transform of functrain's presets has one)."""
    if not isinstance(tx.update, ExtrasUpdate):
        raise TypeError(f"{tx.name}'s update declares nothing (not an ExtrasUpdate)")
    return tx.update


def takes_sparse(tx: Transform) -> bool:
    """Whether `tx` updates sparse gradients itself (the transforms of this module)."""
    update = getattr(tx, "update", None)
    return isinstance(update, ExtrasUpdate) and update.sparse


def sparse_twin(tx: Transform) -> Callable[[], Transform] | str | None:
    """How `tx` trains sparse gradients: a builder of its sparse form, why not, or None."""
    update = getattr(tx, "update", None)
    return update.sparse_twin if isinstance(update, ExtrasUpdate) else None
