"""Properties of schedules: they stay within their documented bounds, monotone where they say so.

Bounds are checked up to a few ulps of the end points (the documented "up to the last bit");
monotony is checked exactly, on sorted steps, for hyperparameters and steps chosen by hypothesis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as L

from functrain import schedules as S

# the example count comes from the project profile (conftest.py): "ci" keeps this file fast
SETTINGS = settings(deadline=None)

values = st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False)
positive = st.floats(1e-6, 10.0, allow_nan=False, allow_infinity=False)
horizons = st.integers(1, 5_000)
begins = st.integers(0, 1_000)
sorted_steps = st.lists(st.integers(0, 20_000), min_size=2, max_size=12).map(sorted)


def within(found: Sequence[float], low: float, high: float, rel: float = 0.0) -> bool:
    slack = 4 * math.ulp(max(abs(low), abs(high) if math.isfinite(high) else 0.0)) + (
        rel * high if rel else 0.0
    )
    return all(low - slack <= v <= high + slack for v in found)


def non_increasing(found: Sequence[float]) -> bool:
    return all(a >= b for a, b in zip(found, found[1:]))


def non_decreasing(found: Sequence[float]) -> bool:
    return all(a <= b for a, b in zip(found, found[1:]))


def monotone_towards(found: Sequence[float], start: float, end: float) -> bool:
    return non_increasing(found) if end <= start else non_decreasing(found)


@SETTINGS
@given(values, values, horizons, begins, sorted_steps)
def test_linear_stays_between_its_ends_and_is_monotone(init, end, steps, begin, at):
    found = [S.linear(init, end, steps, begin)(t) for t in at]
    assert within(found, min(init, end), max(init, end))
    assert monotone_towards(found, init, end)


@SETTINGS
@given(values, horizons, st.floats(0.0, 1.0), st.floats(0.1, 5.0), sorted_steps)
def test_cosine_decay_stays_in_bounds_and_never_increases(init, steps, alpha, exponent, at):
    found = [S.cosine_decay(init, steps, alpha, exponent)(t) for t in at]
    assert within(found, alpha * init, init)
    assert non_increasing(found)


@SETTINGS
@given(
    values,
    st.one_of(st.floats(0.0, 0.999), st.floats(1.001, 3.0)),
    st.integers(1, 500),
    st.booleans(),
    st.one_of(st.none(), values),
    begins,
    sorted_steps,
)
def test_exponential_decay_stays_in_bounds_and_is_monotone(
    init, rate, steps, staircase, end, begin, at
):
    decaying = rate < 1
    if end is not None:
        end = min(end, init) if decaying else max(end, init)
    found = [S.exponential_decay(init, rate, steps, staircase, end, begin)(t) for t in at]
    if decaying:
        assert within(found, end or 0.0, init)
        assert non_increasing(found)
    else:
        assert within(found, init, end if end is not None else math.inf)
        assert non_decreasing(found)


@SETTINGS
@given(
    values, st.dictionaries(st.integers(0, 20_000), st.floats(0.0, 3.0), max_size=6), sorted_steps
)
def test_multistep_stays_between_its_pieces(init, boundaries_and_scales, at):
    pieces = [init]
    for boundary in sorted(boundaries_and_scales):
        pieces.append(pieces[-1] * boundaries_and_scales[boundary])
    found = [S.multistep(init, boundaries_and_scales)(t) for t in at]
    assert within(found, min(pieces), max(pieces))


@SETTINGS
@given(
    values, st.dictionaries(st.integers(0, 20_000), st.floats(0.0, 1.0), max_size=6), sorted_steps
)
def test_multistep_with_scales_at_most_one_never_increases(init, boundaries_and_scales, at):
    assert non_increasing([S.multistep(init, boundaries_and_scales)(t) for t in at])


@SETTINGS
@given(values, values, st.floats(0.1, 5.0), horizons, begins, sorted_steps)
def test_polynomial_stays_between_its_ends_and_is_monotone(init, end, power, steps, begin, at):
    found = [S.polynomial(init, end, power, steps, begin)(t) for t in at]
    assert within(found, min(init, end), max(init, end))
    assert monotone_towards(found, init, end)


@SETTINGS
@given(values, values, values, st.integers(0, 2_000), horizons, sorted_steps)
def test_warmup_cosine_rises_to_its_peak_then_falls(a, b, c, warmup, decay, at):
    init, end, peak = sorted([a, b, c])[0], sorted([a, b, c])[1], max(a, b, c)
    s = S.warmup_cosine(peak, warmup, warmup + decay, init_value=init, end_value=end)
    found = [s(t) for t in at]
    assert within(found, min(init, end), peak)
    assert non_decreasing([s(t) for t in at if t <= warmup])
    assert non_increasing([s(t) for t in at if t >= warmup])


@SETTINGS
@given(
    horizons,
    values,
    st.floats(0.01, 0.99),
    st.floats(1.0, 100.0),
    st.floats(1.0, 1e4),
    st.sampled_from(["cos", "linear"]),
    sorted_steps,
)
def test_one_cycle_stays_in_bounds_rising_then_falling(
    steps, peak, pct_start, div, final_div, anneal, at
):
    assume(pct_start * steps != 1)
    s = S.one_cycle(steps, peak, pct_start, div, final_div, anneal)
    assert within([s(t) for t in at], peak / div / final_div, peak)
    peak_step = pct_start * steps - 1
    assert non_decreasing([s(t) for t in at if t <= peak_step])
    assert non_increasing([s(t) for t in at if t > peak_step])


@SETTINGS
@given(positive, st.floats(0.0, 1.0), st.integers(1, 1_000), sorted_steps)
def test_torch_cosine_annealing_falls_then_rises_within_eta_min_and_lr(lr, eta_fraction, T_max, at):
    eta_min = eta_fraction * lr
    s = S.from_torch(L.CosineAnnealingLR, lr=lr, T_max=T_max, eta_min=eta_min)
    # past the first trough torch's recursion restarts from a constant that carries the rounding of
    # pi * step / T_max, so its peaks (and from_torch's) may pass lr slightly, as documented
    assert within([s(t) for t in at], eta_min, lr, rel=5e-16 * at[-1] + 5e-17 * T_max**2)
    assert non_increasing([s(t) for t in at if t <= T_max])
    assert non_decreasing([s(t) for t in at if T_max <= t <= 2 * T_max])


@SETTINGS
@given(values, values, horizons, st.integers(0, 5_000), st.integers(0, 20_000))
def test_join_is_the_active_piece_at_the_local_step(a, b, steps, boundary, t):
    first, second = S.constant(a), S.linear(a, b, steps)
    expected = first(t) if t < boundary else second(t - boundary)
    assert S.join([first, second], [boundary])(t) == expected


@SETTINGS
@given(values, horizons, st.floats(0.0, 1.0), st.floats(0.0, 0.999), st.integers(0, 20_000))
def test_int_and_tensor_steps_agree(init, steps, alpha, rate, t):
    for s in (
        S.cosine_decay(init, steps, alpha),
        S.exponential_decay(init, rate, steps),
        S.one_cycle(steps + 1, init),
    ):
        assert s(torch.tensor(t)).item() == s(t)
