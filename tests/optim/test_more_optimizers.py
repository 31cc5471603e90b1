"""Equivalence: nadam, adamax, adadelta, asgd, rprop, adafactor and muon follow torch.optim bit for
bit.

Both sides read the same 200 gradients (of scales from 1e-4 to 1e2) for parameters of a few shapes,
a 0-d one included (Muon: matrices only); torch runs its default implementation on the CPU (the
single-tensor one), and where the foreach one rounds the same, that too. Parameters and optimizer
states are compared after the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft
from functrain.optim.rules.adadelta import AdadeltaState
from functrain.optim.rules.adafactor import AdafactorState
from functrain.optim.rules.adam import AdamaxState, NadamState
from functrain.optim.rules.asgd import AsgdState
from functrain.optim.rules.formula import RuleState
from functrain.optim.rules.muon import ScaleByMuonState
from functrain.optim.rules.rprop import RpropState
from tests.comparisons import assert_trees_equal
from tests.models import loss_fn
from tests.optim.test_optimizers import find, is_weight, split_groups

STEPS = 200
SHAPES = {"w1": (12, 6), "b1": (12,), "w2": (3, 12), "conv": (2, 3, 4), "s": ()}
MATRICES = {"w1": (12, 6), "w2": (3, 12), "tall": (9, 2)}


def make_params(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def make_grads(shapes: dict[str, tuple[int, ...]]) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    scales = 10.0 ** (torch.rand(STEPS, generator=gen, dtype=torch.float64) * 6 - 4)
    return [
        {name: torch.randn(shape, generator=gen) * float(s) for name, shape in shapes.items()}
        for s in scales
    ]


GRADS = {"all": make_grads(SHAPES), "matrices": make_grads(MATRICES)}


def run_functrain(tx: ft.Transform, shapes: dict) -> tuple[dict[str, torch.Tensor], Any]:
    params = make_params(shapes)
    state = tx.init(params)
    for grads in GRADS["matrices" if shapes is MATRICES else "all"]:
        updates, state = tx.update(grads, state, params)
        params = ft.apply_updates(params, updates)
    return params, state


def run_torch(
    make_opt: Callable,
    shapes: dict,
    before_step: Callable[[torch.optim.Optimizer, int], None] | None = None,
) -> tuple[dict, torch.optim.Optimizer]:
    params = make_params(shapes)
    opt = make_opt(params)
    for k, grads in enumerate(GRADS["matrices" if shapes is MATRICES else "all"]):
        for name, p in params.items():
            p.grad = grads[name].clone()
        if before_step is not None:
            before_step(opt, k)
        opt.step()
    return params, opt


def per_param(key: str) -> Callable[[torch.optim.Optimizer, dict], list[torch.Tensor]]:
    return lambda opt, params: [opt.state[p][key] for p in params.values()]


NADAM = [
    (NadamState, "mu", per_param("exp_avg")),
    (NadamState, "nu", per_param("exp_avg_sq")),
    (NadamState, "mu_product", per_param("mu_product")),
]
ADAMAX = [
    (AdamaxState, "mu", per_param("exp_avg")),
    (AdamaxState, "nu", per_param("exp_inf")),
]
ADADELTA = [
    (AdadeltaState, "square_avg", per_param("square_avg")),
    (AdadeltaState, "acc_delta", per_param("acc_delta")),
]
ASGD = [
    (AsgdState, "ax", per_param("ax")),
    (AsgdState, "eta", per_param("eta")),
    (AsgdState, "mu", per_param("mu")),
]
RPROP = [
    (RpropState, "prev", per_param("prev")),
    (RpropState, "step_size", per_param("step_size")),
]
MUON = [(ScaleByMuonState, "momentum_buffer", per_param("momentum_buffer"))]


def adafactor_rows(opt: torch.optim.Optimizer, params: dict) -> list[torch.Tensor]:
    """torch's row factors, a vector's whole variance in their place."""
    return [opt.state[p]["row_var" if p.ndim > 1 else "variance"] for p in params.values()]


def adafactor_cols(opt: torch.optim.Optimizer, params: dict) -> list[torch.Tensor]:
    """torch's column factors; a vector has none (the state's column is empty)."""
    return [opt.state[p]["col_var"] if p.ndim > 1 else torch.zeros(0) for p in params.values()]


ADAFACTOR = [(AdafactorState, "row", adafactor_rows), (AdafactorState, "col", adafactor_cols)]

optim = torch.optim
# name: (functrain transform, torch optimizer from a dict of params, state comparisons, shapes,
#        whether torch's foreach implementation rounds the same)
CASES: dict[str, tuple] = {
    "nadam_defaults": (ft.nadam(), lambda p: optim.NAdam(p.values()), NADAM, SHAPES, False),
    "nadam_l2_maximize": (
        ft.nadam(
            lr=1e-2,
            betas=(0.8, 0.99),
            eps=1e-6,
            weight_decay=0.05,
            momentum_decay=1e-2,
            maximize=True,
        ),
        lambda p: optim.NAdam(
            p.values(),
            lr=1e-2,
            betas=(0.8, 0.99),
            eps=1e-6,
            weight_decay=0.05,
            momentum_decay=1e-2,
            maximize=True,
        ),
        NADAM,
        SHAPES,
        False,
    ),
    "nadamw_maximize": (
        ft.nadam(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
        lambda p: optim.NAdam(
            p.values(), lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, maximize=True
        ),
        NADAM,
        SHAPES,
        False,
    ),
    "nadamw_mask_spares_biases": (
        ft.nadam(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, mask=is_weight),
        lambda p: optim.NAdam(split_groups(p, 0.1), lr=1e-2, decoupled_weight_decay=True),
        NADAM,
        SHAPES,
        False,
    ),
    "adamax_defaults": (ft.adamax(), lambda p: optim.Adamax(p.values()), ADAMAX, SHAPES, True),
    "adamax_l2_maximize": (
        ft.adamax(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, maximize=True),
        lambda p: optim.Adamax(
            p.values(), lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, maximize=True
        ),
        ADAMAX,
        SHAPES,
        True,
    ),
    "adadelta_defaults": (
        ft.adadelta(),
        lambda p: optim.Adadelta(p.values()),
        ADADELTA,
        SHAPES,
        True,
    ),
    "adadelta_l2_maximize": (
        ft.adadelta(lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.05, maximize=True),
        lambda p: optim.Adadelta(
            p.values(), lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.05, maximize=True
        ),
        ADADELTA,
        SHAPES,
        True,
    ),
    "asgd_defaults": (ft.asgd(), lambda p: optim.ASGD(p.values()), ASGD, SHAPES, False),
    "asgd_averaging_l2_maximize": (
        ft.asgd(lr=2e-2, lambd=1e-3, alpha=0.6, t0=50, weight_decay=0.05, maximize=True),
        lambda p: optim.ASGD(
            p.values(), lr=2e-2, lambd=1e-3, alpha=0.6, t0=50, weight_decay=0.05, maximize=True
        ),
        ASGD,
        SHAPES,
        False,
    ),
    "rprop_defaults": (ft.rprop(), lambda p: optim.Rprop(p.values()), RPROP, SHAPES, True),
    "rprop_maximize": (
        ft.rprop(lr=1e-3, etas=(0.3, 1.5), step_sizes=(1e-5, 0.1), maximize=True),
        lambda p: optim.Rprop(
            p.values(), lr=1e-3, etas=(0.3, 1.5), step_sizes=(1e-5, 0.1), maximize=True
        ),
        RPROP,
        SHAPES,
        True,
    ),
    "adafactor_defaults": (
        ft.adafactor(),
        lambda p: optim.Adafactor(p.values()),
        ADAFACTOR,
        SHAPES,
        False,
    ),
    "adafactor_decay_maximize": (
        ft.adafactor(
            lr=1e-3, beta2_decay=-0.6, eps=(1e-20, 1e-2), d=2.0, weight_decay=0.05, maximize=True
        ),
        lambda p: optim.Adafactor(
            p.values(),
            lr=1e-3,
            beta2_decay=-0.6,
            eps=(1e-20, 1e-2),
            d=2.0,
            weight_decay=0.05,
            maximize=True,
        ),
        ADAFACTOR,
        SHAPES,
        False,
    ),
    "muon_defaults": (ft.muon(), lambda p: optim.Muon(p.values()), MUON, MATRICES, False),
    "muon_arguments": (
        ft.muon(
            lr=2e-2,
            weight_decay=0.05,
            momentum=0.9,
            nesterov=False,
            ns_coefficients=(3.0, -3.2, 1.2),
            eps=1e-6,
            ns_steps=3,
            adjust_lr_fn="match_rms_adamw",
        ),
        lambda p: optim.Muon(
            p.values(),
            lr=2e-2,
            weight_decay=0.05,
            momentum=0.9,
            nesterov=False,
            ns_coefficients=(3.0, -3.2, 1.2),
            eps=1e-6,
            ns_steps=3,
            adjust_lr_fn="match_rms_adamw",
        ),
        MUON,
        MATRICES,
        False,
    ),
    "muon_original_no_decay": (
        ft.muon(lr=2e-2, weight_decay=0.0, adjust_lr_fn="original"),
        lambda p: optim.Muon(p.values(), lr=2e-2, weight_decay=0.0, adjust_lr_fn="original"),
        MUON,
        MATRICES,
        False,
    ),
}


def assert_matches(
    case: tuple,
    make_opt: Callable | None = None,
    before_step: Callable | None = None,
    tx: ft.Transform | None = None,
) -> Any:
    default_tx, default_opt, fields, shapes, _ = case
    ours, state = run_functrain(tx or default_tx, shapes)
    theirs, opt = run_torch(make_opt or default_opt, shapes, before_step)
    assert_trees_equal(list(ours.values()), list(theirs.values()), "params")
    assert not torch.equal(ours["w1"], make_params(shapes)["w1"])  # they moved
    for cls, field, read in fields:
        node = find(state, cls)
        value = node.slots[field] if isinstance(node, RuleState) else getattr(node, field)
        got = (
            [t for leaf in value for t in (leaf if isinstance(leaf, tuple) else (leaf,))]
            if isinstance(value, tuple)
            else [value]
        )
        assert_trees_equal(got, read(opt, theirs), f"{cls.__name__}.{field}")
    return state


@pytest.mark.parametrize("name", list(CASES))
def test_preset_matches_torch_default_implementation_bitwise(name: str) -> None:
    assert_matches(CASES[name])


def _foreach(make_opt: Callable, foreach: bool = True) -> Callable:
    def make(params: dict) -> torch.optim.Optimizer:
        opt = make_opt(params)
        for group in opt.param_groups:
            group["foreach"] = foreach
        return opt

    return make


@pytest.mark.parametrize(
    "name", [n for n, case in CASES.items() if case[4] and not n.endswith("defaults")]
)
def test_preset_matches_torch_foreach_implementation_bitwise(name: str) -> None:
    assert_matches(CASES[name], make_opt=_foreach(CASES[name][1]))


@pytest.mark.parametrize(
    "name", ["nadamw_maximize", "asgd_averaging_l2_maximize", "adafactor_decay_maximize"]
)
def test_nadam_asgd_adafactor_follow_the_single_tensor_implementation_not_the_foreach_one(
    name: str,
) -> None:
    # documented in docs/guides/transforms.md: these follow the single-tensor implementation
    # (torch's CPU default) bit for bit; torch's foreach one rounds otherwise in places, which
    # places depending on the CPU's kernels (on some none differ in these runs), so it is held to
    # a tolerance only
    case = CASES[name]
    ours, _ = run_functrain(case[0], case[3])
    single, _ = run_torch(_foreach(case[1], foreach=False), case[3])
    foreach, _ = run_torch(_foreach(case[1]), case[3])
    for n in ours:
        assert torch.equal(ours[n], single[n]), n
        torch.testing.assert_close(ours[n], foreach[n], rtol=1e-3, atol=1e-4)


@ft.schedules.tensor_steps
def decaying(step: torch.Tensor) -> torch.Tensor:
    return 2e-2 * torch.pow(torch.full_like(step, 0.99, dtype=torch.float64), step)


def set_lr(opt: torch.optim.Optimizer, k: int) -> None:
    for group in opt.param_groups:
        group["lr"] = float(decaying(torch.tensor(k)))


SCHEDULED = {
    "nadam": (
        ft.nadam(lr=decaying, weight_decay=0.1, decoupled_weight_decay=True),
        "nadamw_maximize",
        lambda p: optim.NAdam(p.values(), weight_decay=0.1, decoupled_weight_decay=True),
    ),
    "adamax": (ft.adamax(lr=decaying), "adamax_defaults", None),
    "adadelta": (ft.adadelta(lr=decaying), "adadelta_defaults", None),
    "asgd": (ft.asgd(lr=decaying, t0=50), "asgd_defaults", lambda p: optim.ASGD(p.values(), t0=50)),
    "rprop": (ft.rprop(lr=decaying), "rprop_defaults", None),
    "adafactor": (
        ft.adafactor(lr=decaying, weight_decay=0.1),
        "adafactor_defaults",
        lambda p: optim.Adafactor(p.values(), weight_decay=0.1),
    ),
    "muon": (ft.muon(lr=decaying), "muon_defaults", None),
}


@pytest.mark.parametrize("name", list(SCHEDULED))
def test_schedule_matches_torch_with_the_group_lr_set_before_each_step(name: str) -> None:
    # torch reads its group's lr at each step (Rprop: only the first); the schedule gives the same
    # values
    tx, base, make_opt = SCHEDULED[name]
    assert_matches(CASES[base], make_opt=make_opt, before_step=set_lr, tx=tx)


@pytest.mark.parametrize("name", ["nadam_defaults", "asgd_defaults", "muon_defaults"])
def test_tensor_lr_is_read_once_as_the_float_it_holds(name: str) -> None:
    # torch computes its step sizes from a tensor lr in the tensor's dtype (float32), so torch with
    # lr=tensor(x) and with lr=float(tensor(x)) differ in the last bits; functrain follows the float
    factory = {"nadam": ft.nadam, "asgd": ft.asgd, "muon": ft.muon}[name.split("_")[0]]
    torch_class = {"nadam": optim.NAdam, "asgd": optim.ASGD, "muon": optim.Muon}[name.split("_")[0]]
    lr = torch.tensor(0.015)
    assert_matches(
        CASES[name], make_opt=lambda p: torch_class(p.values(), lr=float(lr)), tx=factory(lr=lr)
    )
    shapes = CASES[name][3]
    ours, _ = run_functrain(factory(lr=lr), shapes)
    theirs, _ = run_torch(lambda p: torch_class(p.values(), lr=lr), shapes)
    for n in shapes:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-5, atol=1e-6)


def test_muon_gives_other_parameters_to_others_as_torch_users_pair_muon_and_adamw() -> None:
    tx = ft.muon(lr=2e-2, others=ft.adamw(lr=1e-3, weight_decay=0.01, fused=False))

    def make(params: dict) -> Any:
        matrices = [p for p in params.values() if p.ndim == 2]
        rest = [p for p in params.values() if p.ndim != 2]
        return optim.Muon(matrices, lr=2e-2), optim.AdamW(
            rest, lr=1e-3, weight_decay=0.01, foreach=True
        )

    ours, state = run_functrain(tx, SHAPES)
    params = make_params(SHAPES)
    muon_opt, adamw_opt = make(params)
    for grads in GRADS["all"]:
        for name, p in params.items():
            p.grad = grads[name].clone()
        muon_opt.step()
        adamw_opt.step()
    assert_trees_equal(list(ours.values()), list(params.values()), "params")
    assert isinstance(state, ft.optim.wrappers.PartitionState)


def test_muon_without_others_refuses_parameters_that_are_not_matrices() -> None:
    with pytest.raises(
        ft.ConfigError,
        match=r"2-D parameters only .*b1 \(12,\), conv \(2, 3, 4\), s \(\).*others=ft.adamw",
    ):
        ft.muon().init(make_params(SHAPES))


def test_asgd_averages_the_parameters_from_t0_on() -> None:
    # step t averages at rate 1 / max(1, t - 1 - t0): the parameters themselves up to step t0 + 2
    tx = ft.asgd(lr=0.1, t0=3)
    params = {"w": torch.tensor([1.0])}
    state = tx.init(params)
    for step in range(6):
        updates, state = tx.update({"w": torch.tensor([1.0])}, state, params)
        params = ft.apply_updates(params, updates)
        ax = find(state, AsgdState).slots["ax"][0]
        assert torch.equal(ax, params["w"]) == (step + 1 <= 5), step


def test_rprop_reads_a_schedule_only_at_step_0() -> None:
    late = ft.rprop(
        lr=ft.schedules.tensor_steps(lambda step: torch.where(step == 0, 0.01, 5.0).double())
    )
    plain = ft.rprop(lr=0.01)
    a, _ = run_functrain(late, SHAPES)
    b, _ = run_functrain(plain, SHAPES)
    assert_trees_equal(list(a.values()), list(b.values()), "params")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: ft.nadam(betas=(0.9, 1.0)),
            r"betas\[1\] must lie in \[0, 1\), got betas\[1\]=1.0",
        ),
        (lambda: ft.adamax(lr=-1.0), r"lr must be >= 0, got lr=-1.0"),
        (
            lambda: ft.nadam(lr=torch.tensor([0.1, 0.2])),
            r"lr as a tensor must hold one floating-point value, got shape \(2,\)",
        ),
        (lambda: ft.adadelta(rho=1.5), r"rho must lie in \[0, 1\], got rho=1.5"),
        (lambda: ft.asgd(lambd=-1.0), r"lambd must be >= 0, got lambd=-1.0"),
        (
            lambda: ft.rprop(etas=(1.5, 1.2)),
            r"etas must satisfy 0 < etaminus < 1 < etaplus, got etas=\(1.5, 1.2\)",
        ),
        (
            lambda: ft.rprop(step_sizes=(1.0, 0.1)),
            r"step_sizes must be \(min, max\) with min <= max",
        ),
        (lambda: ft.adafactor(beta2_decay=0.5), r"beta2_decay must be <= 0, got beta2_decay=0.5"),
        (lambda: ft.adafactor(d=0.5), r"d must be >= 1, got d=0.5"),
        (
            lambda: ft.muon(adjust_lr_fn="rms"),
            r"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got adjust_lr_fn='rms'",
        ),
        (lambda: ft.muon(ns_steps=100), r"ns_steps must be an int in \[0, 100\), got ns_steps=100"),
        (
            lambda: ft.nadam(momentum_decay=-1.0),
            r"momentum_decay must be >= 0, got momentum_decay=-1.0",
        ),
    ],
)
def test_hyperparameters_out_of_range_are_config_errors_naming_them(
    make: Callable, message: str
) -> None:
    with pytest.raises(ft.ConfigError, match=message):
        make()


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (torch.zeros(0, 4), r"w: a weight with no elements \(shape \(0, 4\)\)"),
        (torch.zeros(2, 0, 3), r"w: a weight with no elements \(shape \(2, 0, 3\)\)"),
        (torch.zeros(4, dtype=torch.complex64), r"w: a complex weight \(torch.complex64\)"),
    ],
    ids=["empty_matrix", "empty_3d", "complex"],
)
def test_adafactor_refuses_at_create_the_weights_torchs_adafactor_cannot_train(
    weight: torch.Tensor, message: str
) -> None:
    torch_weight = torch.nn.Parameter(weight.clone())
    torch_weight.grad = torch.zeros_like(weight)
    with pytest.raises((ZeroDivisionError, RuntimeError)):  # torch's, at its first step
        torch.optim.Adafactor([torch_weight], lr=0.01).step()
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(weight)
    with pytest.raises(ft.ConfigError, match=message):
        ft.TrainState.create(model, ft.adafactor(0.01), lambda m, b: m.w.abs().sum())


def test_names_record_every_argument_for_checkpoints() -> None:
    assert (
        ft.adamax(lr=1e-2).name
        == "adamax(lr=0.01, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0, maximize=False, "
        "mask=None)"
    )
    assert ft.muon(others=ft.sgd(lr=0.1)).name.endswith(
        "others=sgd(lr=0.1, momentum=0.0, nesterov=False, dampening=0.0, weight_decay=0.0, "
        "mask=None, fused=True))"
    )


def test_final_steps_expose_the_learning_rate_metric() -> None:
    tx = ft.nadam(lr=decaying)
    params = make_params(SHAPES)
    _, state = tx.update(GRADS["all"][0], tx.init(params), params)
    assert torch.equal(ft.transform_metrics(state)["lr"], decaying(torch.tensor(0)))


def test_partition_needs_a_transform_for_every_label() -> None:
    tx = ft.partition(lambda name, p: "matrix" if p.ndim == 2 else "vector", matrix=ft.sgd(lr=0.1))
    with pytest.raises(
        ft.ConfigError, match=r"every label must be one of \['matrix'\], got b1: 'vector'"
    ):
        tx.init(make_params(SHAPES))


def test_partition_takes_a_tree_of_labels_and_keeps_paths_for_inner_masks() -> None:
    params = {"w": torch.ones(2), "b": torch.ones(2)}
    seen: list[str] = []

    def decay_w(name: str, p: torch.Tensor) -> bool:
        seen.append(name)
        return name == "w"

    tx = ft.partition(
        {"w": "a", "b": "b"}, a=ft.sgd(lr=1.0, weight_decay=0.5, mask=decay_w), b=ft.sgd(lr=0.5)
    )
    u, _ = tx.update({"w": torch.ones(2), "b": torch.ones(2)}, tx.init(params), params)
    new = ft.apply_updates(params, u)
    assert torch.equal(new["w"], torch.full((2,), -0.5)) and torch.equal(
        new["b"], torch.full((2,), 0.5)
    )
    assert seen == ["w"]


PRESETS = [ft.nadam, ft.adamax, ft.adadelta, ft.asgd, ft.rprop, ft.adafactor, ft.muon]


@pytest.mark.parametrize("factory", PRESETS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("lr", "message"),
    [
        (float("inf"), r"lr must be a finite number >= 0, got lr=inf"),
        (-0.1, r"lr must be >= 0, got lr=-0.1"),
        (True, r"lr must be a finite number >= 0, got lr=True"),
        (
            lambda step: step * float("nan"),
            r"lr must be >= 0 and finite at every step, but the schedule gives nan at step 0",
        ),
        (1e39, r"lr must be at most 3.4028234663852886e\+38, the largest float32 .*got lr=1e\+39"),
        (
            torch.tensor([0.1]).to_sparse(),
            r"lr as a tensor must be dense, got a tensor of layout torch.sparse_coo",
        ),
        (
            torch.empty((), device="meta"),
            r"lr as a tensor must hold a value, got a tensor of shape \(\) on the meta device",
        ),
    ],
)
def test_every_new_preset_rejects_a_learning_rate_that_is_not_a_finite_number(
    factory: Callable, lr: Any, message: str
) -> None:
    with pytest.raises(ft.ConfigError, match=message):
        factory(lr)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ft.muon(lr=0.02, others=ft.adamw(1e-3)),
        lambda: ft.adafactor(weight_decay=0.1),
        lambda: ft.asgd(t0=1),
    ],
    ids=["muon_partition", "adafactor", "asgd"],
)
def test_a_checkpoint_resumes_the_same_run(make: Callable, tmp_path: Any) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    batch = (torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(16, 2))
    state = ft.TrainState.create(model, make(), loss_fn)
    for _ in range(3):
        state, _ = ft.train_step(state, batch)
    ft.save(state, tmp_path / "ck")
    back = ft.load(tmp_path / "ck", ft.TrainState.create(model, make(), loss_fn))
    ft.assert_states_equal(ft.train_step(back, batch)[0], ft.train_step(state, batch)[0])


def test_a_skipped_step_leaves_the_parameters_and_every_group_state_untouched() -> None:
    tx = ft.skip_nonfinite(ft.muon(lr=0.02, others=ft.nadam(lr=1e-2)))
    params = make_params(SHAPES)
    state = tx.init(params)
    updates, state = tx.update(GRADS["all"][0], state, params)
    params = ft.apply_updates(params, updates)
    bad = {name: g.clone() for name, g in GRADS["all"][1].items()}
    bad["b1"][0] = float("nan")
    updates, skipped = tx.update(bad, state, params)
    for a, b in zip(
        torch.utils._pytree.tree_leaves(skipped.inner),
        torch.utils._pytree.tree_leaves(state.inner),
        strict=True,
    ):
        assert torch.equal(a, b)
    after = ft.apply_updates(params, updates)
    assert all(torch.equal(after[n], params[n]) for n in params)
    assert int(skipped.total_skipped) == 1


def _bit_for_bit_with_torch(
    tx: ft.Transform,
    make_opt: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    dtype: torch.dtype,
    steps: int,
) -> torch.Tensor:
    """`tx` and torch's optimizer on one 33x64 weight in `dtype`, from the same gradients, their
    weights' bit patterns equal after every step (NaNs compared as what they are); returns
    torch's weight."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(33, 64, generator=gen).to(dtype)
    weight = torch.nn.Parameter(start.clone())
    opt = make_opt([weight])
    params = {"w": start.clone()}
    state = tx.init(params)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[start.element_size()]
    for step in range(steps):
        grad = torch.randn(start.shape, generator=gen).to(dtype)
        weight.grad = grad.clone()
        opt.step()
        updates, state = tx.update({"w": grad}, state, params)
        params = ft.apply_updates(params, updates)
        assert torch.equal(params["w"].view(bits), weight.data.view(bits)), step
    return weight.data


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_nadam_with_weight_decay_gives_torchs_bits_nans_included(
    dtype: torch.dtype, decoupled: bool
) -> None:
    """Half-precision weights under NAdam with weight decay, 30 steps, compared bit for bit: in
    float16 the second moment of a small gradient rounds to 0 and ``eps`` = 1e-8 to 0 too, so
    torch's own update is NaN there (0 / 0): the NaNs are torch's, at the same elements (an
    equality of values, which NaN never meets, would call these runs different)."""
    weight = _bit_for_bit_with_torch(
        ft.nadam(1e-2, weight_decay=0.01, decoupled_weight_decay=decoupled),
        lambda p: optim.NAdam(p, lr=1e-2, weight_decay=0.01, decoupled_weight_decay=decoupled),
        dtype,
        30,
    )
    if dtype == torch.float16 and not decoupled:
        assert weight.isnan().any()  # (the case the test is about)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01], ids=["plain", "decay"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_radam_gives_torchs_foreach_bits(
    dtype: torch.dtype, weight_decay: float
) -> None:
    """RAdam follows torch's foreach implementation: its step sizes are Python floats there, which
    its kernels compute with in float32, and its in-place foreach product by a number rounds a
    float16 tensor otherwise than the out-of-place one: both kept, 100 steps bit for bit."""
    _bit_for_bit_with_torch(
        ft.radam(1e-2, weight_decay=weight_decay),
        lambda p: optim.RAdam(p, lr=1e-2, weight_decay=weight_decay, foreach=True),
        dtype,
        100,
    )


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str
)
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: ft.adam(1e-2, fused=False), lambda p: optim.Adam(p, 1e-2, foreach=False)),
        (lambda: ft.adamw(1e-2, fused=False), lambda p: optim.AdamW(p, 1e-2, foreach=False)),
        (
            lambda: ft.adam(1e-2, fused=False, amsgrad=True),
            lambda p: optim.Adam(p, 1e-2, foreach=False, amsgrad=True),
        ),
    ],
    ids=["adam", "adamw", "amsgrad"],
)
def test_the_adam_chain_gives_torchs_single_tensor_bits_in_every_dtype(
    ours: Callable, theirs: Callable, dtype: torch.dtype
) -> None:
    """`adam(fused=False)`'s denominator divides by torch.optim's ``bias_correction2 ** 0.5`` as a
    Python number (C's pow, not sqrt: float64 tells them apart; a number, not a scalar rounded to
    a half-precision dtype first: float16 and bfloat16 do), 300 steps bit for bit."""
    _bit_for_bit_with_torch(ours(), theirs, dtype, 300)


@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str
)
def test_rmsprop_with_momentum_gives_torchs_single_tensor_bits_in_every_dtype(
    dtype: torch.dtype, centered: bool
) -> None:
    """RMSprop's momentum buffer takes the gradient's quotient in one ``addcdiv``, as torch's
    ``buf.mul_(momentum).addcdiv_(grad, avg)``: in a half dtype a quotient rounded apart first
    differs from the first step on; 100 steps bit for bit with torch's single-tensor loop (its
    default on the CPU)."""
    _bit_for_bit_with_torch(
        ft.rmsprop(1e-2, momentum=0.9, centered=centered),
        lambda p: optim.RMSprop(p, lr=1e-2, momentum=0.9, centered=centered, foreach=False),
        dtype,
        100,
    )


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (
            lambda: ft.nadam(1e-2, weight_decay=0.1, decoupled_weight_decay=True),
            lambda p: optim.NAdam(p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
        ),
        (
            lambda: ft.adafactor(1e-2, weight_decay=0.1),
            lambda p: optim.Adafactor(p, lr=1e-2, weight_decay=0.1, foreach=False),
        ),
        (
            lambda: ft.asgd(1e-2, lambd=0.1, t0=5),
            lambda p: optim.ASGD(p, lr=1e-2, lambd=0.1, t0=5, foreach=False),
        ),
    ],
    ids=["nadam", "adafactor", "asgd"],
)
def test_a_decay_of_the_weights_is_read_in_float64_for_float64_weights(
    ours: Callable, theirs: Callable
) -> None:
    """``p.mul_(1 - lr * wd)`` reads its number in the tensor's opmath: float64 for float64
    weights (it was rounded to float32 first), 50 steps bit for bit."""
    _bit_for_bit_with_torch(ours(), theirs, torch.float64, 50)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_decayed_0_d_half_precision_weight_keeps_its_dtype(dtype: torch.dtype) -> None:
    """A 0-d weight times a float32 0-d factor would become float32 (0-d tensors promote among
    themselves), and the next step's lerp would refuse it."""
    for tx in (
        ft.nadam(1e-2, weight_decay=0.1, decoupled_weight_decay=True),
        ft.adafactor(1e-2, weight_decay=0.1),
    ):
        params = {"scale": torch.ones((), dtype=dtype)}
        state = tx.init(params)
        for _ in range(3):
            updates, state = tx.update({"scale": torch.full((), 0.5, dtype=dtype)}, state, params)
            params = ft.apply_updates(params, updates)
        assert params["scale"].dtype == dtype


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float64, torch.float32),
    ],
    ids=["f32+bf16", "f32+f16", "f64+f32"],
)
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (
            lambda: ft.adamax(0.01, weight_decay=0.1),
            lambda p: optim.Adamax(p, lr=0.01, weight_decay=0.1, foreach=False),
        ),
        (lambda: ft.adam(0.01, fused=False), lambda p: optim.Adam(p, lr=0.01, foreach=False)),
        (lambda: ft.adamw(0.01, fused=False), lambda p: optim.AdamW(p, lr=0.01, foreach=False)),
        (lambda: ft.rmsprop(0.01), lambda p: optim.RMSprop(p, lr=0.01, foreach=False)),
        (lambda: ft.adagrad(0.1, fused=False), lambda p: optim.Adagrad(p, lr=0.1, foreach=False)),
    ],
    ids=["adamax", "adam", "adamw", "rmsprop", "adagrad"],
)
def test_a_quotient_step_gives_torchs_bits_in_a_model_of_several_dtypes(
    ours: Callable, theirs: Callable, dtypes: tuple[torch.dtype, ...]
) -> None:
    """The step ``p + value * num / den`` of weights of several dtypes goes through one
    ``addcdiv`` with the step size as a number, as torch.optim's ``addcdiv_(value=)``: taken
    apart, the quotient rounded in a half dtype first (differing from the first steps)."""
    gen = torch.Generator().manual_seed(0)
    start = {f"w{i}": torch.randn(4, 3, generator=gen).to(d) for i, d in enumerate(dtypes)}
    weights = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    opt, tx = theirs(list(weights.values())), ours()
    params, state = dict(start), tx.init(start)
    for step in range(30):
        grads = {k: torch.randn(4, 3, generator=gen).to(v.dtype) for k, v in start.items()}
        for k, w in weights.items():
            w.grad = grads[k].clone()
        opt.step()
        updates, state = tx.update(grads, state, params)
        params = ft.apply_updates(params, updates)
        for k, w in weights.items():
            assert torch.equal(params[k], w.data), (step, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (
            lambda: ft.sgd(0.01, momentum=0.9, fused=False),
            lambda p: optim.SGD(p, lr=0.01, momentum=0.9, foreach=False),
        ),
        (
            lambda: ft.sgd(0.01, momentum=0.9, dampening=0.1),
            lambda p: optim.SGD(p, lr=0.01, momentum=0.9, dampening=0.1, foreach=False),
        ),
        (
            lambda: ft.rmsprop(0.01, momentum=0.9, centered=True),
            lambda p: optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True, foreach=False),
        ),
    ],
    ids=["sgd", "sgd-dampening", "rmsprop"],
)
def test_a_momentum_buffer_is_laid_out_as_its_channels_last_weight(
    ours: Callable, theirs: Callable, dtype: torch.dtype
) -> None:
    """The momentum buffer takes the weight's layout, as torch's does: a fresh state's buffer is a
    stride-0 zero whose product comes out contiguous, and a half-precision kernel over tensors of
    two layouts takes torch's element-by-element path, which rounds otherwise (it differed from
    the first steps); 20 steps bit for bit."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(3, 2, 3, 3, generator=gen).to(dtype).to(memory_format=torch.channels_last)
    weight = torch.nn.Parameter(start.clone())
    opt, tx = theirs([weight]), ours()
    params = {"w": start.clone()}
    state = tx.init(params)
    for step in range(20):
        grad = (
            torch.randn(3, 2, 3, 3, generator=gen).to(dtype).to(memory_format=torch.channels_last)
        )
        weight.grad = grad.clone()
        opt.step()
        updates, state = tx.update({"w": grad}, state, params)
        params = ft.apply_updates(params, updates)
        assert torch.equal(params["w"], weight.data), step
