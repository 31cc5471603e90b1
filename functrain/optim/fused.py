"""Adam and AdamW through torch's fused kernels (``torch._fused_adam_`` / ``torch._fused_adamw_``).

One kernel pass reads the parameters, gradients and both moments and writes the new ones, instead
of the eight passes of the foreach implementation. The kernel works in place, so the step copies the
parameters and moments first and runs it on the copies: the state it was given is never written.
The results match ``torch.optim.Adam/AdamW(fused=True)`` bit for bit (the same kernel on the same
scalars); they differ from the foreach implementation in the last bits, because the kernel rounds
differently.

The transform is gated (`Transform.gated`): given ``keep=``, it passes ``found_inf = ~keep`` to
the kernel, which then leaves the copies untouched, so a skipped step costs no `torch.where` pass.

In a donated step (`functrain.optim.transform.may_write_in_place`) the kernel runs on the given
parameters and moments themselves, as torch.optim runs it: no copies, and a skipped step (the
kernel's ``found_inf``) leaves them as they were, so nothing needs restoring.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, NamedTuple

import torch

from functrain.errors import ConfigError
from functrain.optim.transform import NewParams, Transform, counter, flat_updates, may_write_in_place
from functrain.optim.primitives import Mask, Schedule, _zeros, resolve_mask
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
    weight_decay: float,
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
            weight_decay=weight_decay if decay else 0.0,
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
