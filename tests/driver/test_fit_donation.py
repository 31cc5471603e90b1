"""`fit(donate=True)`: the caller gives its state up to the run; by default fit never takes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import functrain as ft
from tests.comparisons import assert_trees_equal
from tests.driver.runs import dataset, make_state, quiet_fit


def test_fit_with_donate_refuses_the_given_state_afterwards() -> None:
    state = make_state()
    quiet_fit(state, dataset(), max_epochs=1, donate=True)
    with pytest.raises(ft.DonatedStateError, match=r"donated to functrain\."):
        ft.train_step(state, (torch.zeros(2, 3), torch.zeros(2, 1)))


def test_fit_with_donate_trains_bit_for_bit_as_without() -> None:
    kept = quiet_fit(make_state(ft.adamw(1e-2), dropout=True), dataset(), max_epochs=2)
    given = quiet_fit(
        make_state(ft.adamw(1e-2), dropout=True), dataset(), max_epochs=2, donate=True
    )
    assert_trees_equal(kept.state.tree(), given.state.tree(), ignore=["driver/history"])


def test_fit_with_donate_resumes_exactly(tmp_path: Path) -> None:
    straight = quiet_fit(make_state(ft.adamw(1e-2), dropout=True), dataset(), max_epochs=2)
    first = dict(checkpoint_dir=tmp_path, save_every=1, donate=True)
    quiet_fit(make_state(ft.adamw(1e-2), dropout=True), dataset(), max_epochs=1, **first)
    resumed = quiet_fit(
        make_state(ft.adamw(1e-2), dropout=True),
        dataset(),
        max_epochs=2,
        checkpoint_dir=tmp_path,
        resume=True,
        donate=True,
    )
    assert_trees_equal(straight.state.tree(), resumed.state.tree(), ignore=["driver/history"])


class _SetsUser(ft.Callback):
    def on_train_begin(self, run: Any) -> None:
        run.user = {"note": torch.tensor(1)}


def test_fit_by_default_leaves_the_given_state_usable_even_after_a_hook_replaced_it() -> None:
    # run.user before the first step makes a state sharing the given one's tensors: not the
    # loop's alone, however few references it has
    state = make_state(ft.adamw(1e-2))
    before = state.clone()
    quiet_fit(state, dataset(), max_epochs=1, callbacks=[_SetsUser()])
    assert_trees_equal(state.tree(), before.tree())
    ft.train_step(state, (torch.zeros(2, 3), torch.zeros(2, 1)))


def test_fit_rejects_a_donate_that_is_not_a_bool() -> None:
    with pytest.raises(ft.ConfigError, match="donate must be True or False"):
        quiet_fit(make_state(), dataset(), max_epochs=1, donate=1)
