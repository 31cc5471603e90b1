"""Adam and AdamW through torch's fused kernels (``torch._fused_adam_`` / ``torch._fused_adamw_``).

One kernel pass reads the parameters, gradients and both moments and writes the new ones, instead
of the eight passes of the foreach implementation. The kernel works in place, so the step copies the
parameters and moments first and runs it on the copies: the state it was given is never written.
The results match ``torch.optim.Adam/AdamW(fused=True)`` bit for bit (the same kernel on the same
scalars); they differ from the foreach implementation in the last bits, because the kernel rounds
differently.

The transform is gated (`Transform.gated`): given ``keep=``, it passes ``found_inf = ~keep`` to
the kernel, which then leaves the copies untouched, so a skipped step costs no `torch.where` pass.

Under `torch.func.vmap` (a stacked state, `functrain.stack`) the kernel runs through the custom op
``functrain::fused_adam``, whose vmap rule calls the kernel once per member on that member's slice of
the stacked tensors, with the member's own step count, learning rate and skip flag: each member's
results are bit for bit those of the member trained alone.

In a donated step (`functrain.optim.transform.may_write_in_place`) the kernel runs on the given
parameters and moments themselves, as torch.optim runs it: no copies, and a skipped step (the
kernel's ``found_inf``) leaves them as they were, so nothing needs restoring.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, NamedTuple

import torch

from functrain.errors import ConfigError
from functrain.optim.batching import under_vmap
from functrain.optim.transform import NewParams, Transform, counter, flat_updates, may_write_in_place
from functrain.optim.primitives import Mask, Schedule, _zeros, resolve_mask
from functrain.optim.sweep import Sweep
from functrain.tree import Tree, tree_leaves

__all__ = ["FusedAdamState", "fused_adam"]


class FusedAdamState(NamedTuple):
    count: torch.Tensor  # 0-d int64: updates applied
    mu: tuple[torch.Tensor, ...]
    nu: tuple[torch.Tensor, ...]
    nu_max: tuple[torch.Tensor, ...]  # empty without amsgrad
    lr: torch.Tensor  # 0-d float64: the learning rate of the last update

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lr": self.lr}


def fused_adam(
    lr: float | Schedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float | Sweep,
    *,
    decoupled: bool,
    amsgrad: bool,
    mask: Mask,
    maximize: bool = False,
) -> Transform:
    """The fused Adam (L2 decay) or AdamW (`decoupled` decay) transform behind ``adam/adamw(fused=True)``.

    Hyperparameters are checked by the presets. A schedule is called with the count of updates
    applied so far, as `scale_by_learning_rate` calls it; a tensor `lr` is read once, here (the
    kernels read a CPU one as the float64 of its value, as this passes it). `maximize` is the
    kernel's own flag, as torch.optim passes it.
    """
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    if isinstance(lr, torch.Tensor):
        lr = float(lr)

    def init_fn(params: Tree) -> FusedAdamState:
        leaves = tree_leaves(params)
        bad = sorted({str(p.dtype) for p in leaves if not p.is_floating_point()})
        if bad:
            raise ConfigError(f"the fused Adam kernels take floating-point parameters, got {', '.join(bad)}; use fused=False")
        count = counter(params)
        first_lr = lr(count) if callable(lr) else lr
        return FusedAdamState(
            count, _zeros(params), _zeros(params), _zeros(params) if amsgrad else (), torch.as_tensor(first_lr, dtype=torch.float64, device=count.device)
        )

    def update_fn(updates: Any, state: FusedAdamState, params: Tree | None = None, keep: torch.Tensor | None = None) -> tuple[NewParams, FusedAdamState]:
        if params is None:
            raise ConfigError("the fused Adam kernels update the parameters themselves; pass params= to update")
        g, spec = flat_updates(updates, params)
        p = tree_leaves(params)
        rate = lr(state.count) if callable(lr) else lr
        rate_t = torch.as_tensor(rate, dtype=torch.float64, device=state.count.device)
        count = state.count + 1 if keep is None else state.count + keep.long()
        found_inf = None if keep is None else (~keep).float()
        hyper = {"lr": _kernel_lr(rate_t) if isinstance(rate, torch.Tensor) else rate, "beta1": b1, "beta2": b2, "eps": eps, "amsgrad": amsgrad, "maximize": maximize, "grad_scale": None, "found_inf": found_inf}
        decays = resolve_mask(mask, params) or (True,) * len(p)
        new_p, mu, nu, nu_max = _by_groups(kernel, p, g, state, count, decays, weight_decay, hyper)
        new_state = FusedAdamState(count, tuple(mu), tuple(nu), tuple(nu_max), rate_t if keep is None else torch.where(keep, rate_t, state.lr))
        return NewParams(new_p, spec), new_state

    return Transform(init_fn, update_fn, gated=True)


def _decays(weight_decay: Any) -> list[float]:
    """The kernel's weight decay: one value, or one per member for a sweep (`functrain.sweep`)."""
    return [float(v) for v in weight_decay.values] if isinstance(weight_decay, Sweep) else [float(weight_decay)]


def _kernel_lr(rate: torch.Tensor) -> torch.Tensor:
    # the CPU kernels read a tensor learning rate as a double; the device kernels read float32
    return rate if rate.device.type == "cpu" else rate.to(torch.float32)


def _by_groups(kernel: Any, p: list, g: list, state: FusedAdamState, count: torch.Tensor, decays: tuple[bool, ...], weight_decay: float, hyper: dict[str, Any]) -> tuple[list, list, list, list]:
    """One kernel call per (device, dtype, decays or not) group of leaves; new lists in leaf order."""
    groups: dict[tuple[torch.device, torch.dtype, bool], list[int]] = defaultdict(list)
    for i, x in enumerate(p):
        groups[(x.device, x.dtype, decays[i])].append(i)
    out = [list(p), list(state.mu), list(state.nu), list(state.nu_max)]
    step = count.to(torch.float32)  # the kernels read float32 step counts, as torch.optim keeps them
    amsgrad = hyper["amsgrad"]
    for (_, dtype, decay), idx in groups.items():
        results = _run_kernel(
            kernel,
            [p[i] for i in idx],
            [g[i] if g[i].dtype == dtype else g[i].to(dtype) for i in idx],
            [state.mu[i] for i in idx],
            [state.nu[i] for i in idx],
            [state.nu_max[i] for i in idx] if amsgrad else [],
            [step] * len(idx),  # read only: the step number for the bias corrections
            weight_decay=_decays(weight_decay) if decay else [0.0],
            **hyper,
        )
        for target, values in zip(out, results, strict=True):
            for i, v in zip(idx, values):
                target[i] = v
    return out[0], out[1], out[2], out[3]


def _run_kernel(kernel: Any, params: list, grads: list, mu: list, nu: list, nu_max: list, steps: list, **options: Any) -> tuple[list, list, list, list]:
    """New (params, mu, nu, nu_max) from one fused kernel call; the given tensors are not written.

    Eagerly the in-place kernel runs on fresh copies (it reads the gradients only), or on the given
    tensors themselves in a donated step. Under
    ``torch.compile`` the functional form of the op is traced instead: functionalization rejects
    the in-place one on graph intermediates.
    """
    if under_vmap():
        return _stacked_kernel(kernel, params, grads, mu, nu, nu_max, steps, **options)
    options = {**options, "weight_decay": options["weight_decay"][0]}  # one value outside a stacked step
    if torch.compiler.is_compiling():
        functional = torch.ops.aten._fused_adamw if kernel is torch._fused_adamw_ else torch.ops.aten._fused_adam
        new_p, _, new_mu, new_nu, new_max = functional(params, grads, mu, nu, nu_max, steps, **options)
        return list(new_p), list(new_mu), list(new_nu), list(new_max)
    if may_write_in_place():
        kernel(params, grads, mu, nu, nu_max, steps, **options)
        return params, mu, nu, nu_max
    new_p, new_mu, new_nu, new_max = ([x.clone() for x in xs] for xs in (params, mu, nu, nu_max))
    kernel(new_p, grads, new_mu, new_nu, new_max, steps, **options)
    return new_p, new_mu, new_nu, new_max


def _stacked_kernel(kernel: Any, params: list, grads: list, mu: list, nu: list, nu_max: list, steps: list, **options: Any) -> tuple[list, list, list, list]:
    """`_run_kernel` under vmap: the custom op, whose batching rule runs the kernel member by member."""
    lr = options["lr"]
    lr_t = lr if isinstance(lr, torch.Tensor) else torch.tensor(float(lr), dtype=torch.float64)
    out = torch.ops.functrain.fused_adam(
        params, grads, mu, nu, nu_max, steps[0], lr_t, options["found_inf"],
        list(options["weight_decay"]), options["beta1"], options["beta2"], options["eps"], options["amsgrad"], kernel is torch._fused_adamw_,
    )
    return [list(x) for x in out]  # type: ignore[return-value]


_FusedOut = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


@torch.library.custom_op("functrain::fused_adam", mutates_args=())
def _fused_adam_op(
    params: list[torch.Tensor], grads: list[torch.Tensor], mu: list[torch.Tensor], nu: list[torch.Tensor], nu_max: list[torch.Tensor],
    step: torch.Tensor, lr: torch.Tensor, found_inf: torch.Tensor | None,
    weight_decay: list[float], beta1: float, beta2: float, eps: float, amsgrad: bool, decoupled: bool,
) -> _FusedOut:
    """One member's fused Adam(W) update on fresh copies (the op vmap batches member by member).

    `weight_decay` holds one value, or one per member (a sweep) for the batched form.
    """
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    new = [[x.clone() for x in xs] for xs in (params, mu, nu, nu_max)]
    kernel(new[0], grads, new[1], new[2], new[3], [step] * len(params), lr=_kernel_lr(lr), beta1=beta1, beta2=beta2,
           weight_decay=weight_decay[0], eps=eps, amsgrad=amsgrad, maximize=False, grad_scale=None, found_inf=found_inf)
    return new[0], new[1], new[2], new[3]


@_fused_adam_op.register_fake
def _(params, grads, mu, nu, nu_max, step, lr, found_inf, weight_decay, beta1, beta2, eps, amsgrad, decoupled):  # type: ignore[no-untyped-def]
    return [torch.empty_like(x) for x in params], [torch.empty_like(x) for x in mu], [torch.empty_like(x) for x in nu], [torch.empty_like(x) for x in nu_max]


def _dims(dims: Any, n: int) -> list:
    return list(dims) if isinstance(dims, (list, tuple)) else [dims] * n


def _member(x: torch.Tensor | None, dim: int | None, k: int) -> torch.Tensor | None:
    return x if x is None or dim is None else x.select(dim, k)


@_fused_adam_op.register_vmap
def _(info, in_dims, params, grads, mu, nu, nu_max, step, lr, found_inf, weight_decay, beta1, beta2, eps, amsgrad, decoupled):  # type: ignore[no-untyped-def]
    members = info.batch_size
    d_p, d_g, d_mu, d_nu, d_max, d_step, d_lr, d_inf = in_dims[:8]
    tensors = [(xs, _dims(d, len(xs))) for xs, d in ((params, d_p), (mu, d_mu), (nu, d_nu), (nu_max, d_max))]
    g_dims = _dims(d_g, len(grads))
    calls = [
        (
            [_member(g, d, k) for g, d in zip(grads, g_dims)],
            [_member(step, d_step, k)] * len(params),
            {"lr": _kernel_lr(_member(lr, d_lr, k)), "beta1": beta1, "beta2": beta2, "weight_decay": weight_decay[k if len(weight_decay) > 1 else 0],
             "eps": eps, "amsgrad": amsgrad, "maximize": False, "grad_scale": None, "found_inf": _member(found_inf, d_inf, k)},
        )
        for k in range(members)
    ]
    out_dims = tuple([0] * len(xs) for xs, _ in tensors)
    if any(type(x) is not torch.Tensor for x in params):  # traced by torch.compile: fake or functional tensors
        return _traced_members(tensors, calls, decoupled), out_dims
    return _eager_members(tensors, calls, members, decoupled), out_dims


def _eager_members(tensors: list, calls: list, members: int, decoupled: bool) -> tuple:
    """The stacked inputs copied once (member first), then the kernel on each member's slice in place."""
    new = [[x.movedim(d, 0).clone() if d is not None else x.expand(members, *x.shape).clone() for x, d in zip(xs, ds)] for xs, ds in tensors]
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    for k, (grads, steps, options) in enumerate(calls):
        p, m, v, vmax = ([x[k] for x in xs] for xs in new)
        kernel(p, grads, m, v, vmax, steps, **options)
    return tuple(new)


def _traced_members(tensors: list, calls: list, decoupled: bool) -> tuple:
    """The functional op (it has a fake kernel, the in-place one with a tensor lr has none) member by member, stacked."""
    functional = torch.ops.aten._fused_adamw if decoupled else torch.ops.aten._fused_adam
    results = []
    for k, (grads, steps, options) in enumerate(calls):
        p, m, v, vmax = ([_member(x, d, k) for x, d in zip(xs, ds)] for xs, ds in tensors)
        new_p, _, new_m, new_v, new_max = functional(p, grads, m, v, vmax, steps, **options)
        results.append((new_p, new_m, new_v, new_max))
    return tuple([torch.stack([r[i][j] for r in results]) for j in range(len(xs))] for i, (xs, _) in enumerate(tensors))
