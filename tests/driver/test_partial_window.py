"""An epoch's last, partial accumulation window, closed as Lightning and Hugging Face close it.

With 8 batches an epoch and ``accumulate_steps=3`` each epoch ends with a window of 2. Lightning's
`Trainer` updates on it with each loss still divided by 3; Hugging Face's `Trainer` divides those
losses by 2 (its ``current_gradient_accumulation_steps``). The references are those loops written
out in torch, as the two trainers run them (``loss / divisor`` then ``backward()``, ``step()`` and
``zero_grad()`` at each window's end and at the epoch's last batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import functrain as ft
from functrain.errors import ConfigError

N, BATCHES, EPOCHS = 3, 8, 3
QUIET: dict[str, Any] = {"progress": False, "verbosity": "silent"}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(5, 4, generator=gen), torch.randn(5, 2, generator=gen)) for _ in range(8)]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


def _loss_fn(model: Any, batch: Any) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def _windows(total: int) -> list[int]:
    """The windows' lengths in an epoch of `total` batches: whole ones, then the partial one."""
    return [N] * (total // N) + ([total % N] if total % N else [])


def _torch_loop(divisor: Callable[[int], int]) -> dict[str, torch.Tensor]:
    """The trainers' loop: each window's losses divided by ``divisor(its length)``."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(EPOCHS):
        batches = iter(_batches())
        for length in _windows(BATCHES):
            for _ in range(length):
                (_loss_fn(model, next(batches)) / divisor(length)).backward()
            optimizer.step()
            optimizer.zero_grad()
    return {k: v.detach() for k, v in model.named_parameters()}


def lightning() -> dict[str, torch.Tensor]:
    return _torch_loop(lambda length: N)


def hugging_face() -> dict[str, torch.Tensor]:
    return _torch_loop(lambda length: length)


def _state(**kw: Any) -> ft.TrainState:
    tx = ft.sgd(0.1, momentum=0.9, fused=False)  # torch.optim.SGD's default implementation
    return ft.TrainState.create(_model(), tx, _loss_fn, accumulate_steps=N, **kw)


def _assert_params(state: ft.TrainState, expected: dict[str, torch.Tensor]) -> None:
    for name, p in expected.items():
        assert torch.equal(state.params[name], p), name


@pytest.mark.parametrize(
    ("partial_window", "reference"), [("over_n", lightning), ("over_length", hugging_face)]
)
def test_fit_closes_the_partial_window_bit_for_bit_as_each_trainer(
    partial_window: str, reference: Callable[[], dict[str, torch.Tensor]]
) -> None:
    result = ft.fit(_state(), _batches(), max_epochs=EPOCHS, partial_window=partial_window, **QUIET)
    assert int(result.state.step) == EPOCHS * 3 and int(result.state.micro_step) == 0
    assert result.state.options.accumulate_steps == N
    _assert_params(result.state, reference())


def test_fit_carries_the_partial_window_into_the_next_epoch_by_default() -> None:
    result = ft.fit(_state(), _batches(), max_epochs=EPOCHS, **QUIET)
    assert int(result.state.step) == EPOCHS * BATCHES // N  # 24 batches, 8 updates
    assert not torch.equal(result.state.params["weight"], lightning()["weight"])


def test_a_run_closing_partial_windows_resumes_bit_for_bit(tmp_path: Any) -> None:
    kw: dict[str, Any] = dict(partial_window="over_length", checkpoint_dir=tmp_path, **QUIET)
    ft.fit(_state(), _batches(), max_steps=4, save_every=1, **kw)  # into epoch 1
    resumed = ft.fit(_state(), _batches(), max_epochs=EPOCHS, save_every=1, resume=True, **kw)
    _assert_params(resumed.state, hugging_face())


@pytest.mark.parametrize("at", [7, 8], ids=["its first batch", "its second batch"])
def test_a_run_interrupted_inside_the_closing_window_resumes_over_its_length(
    tmp_path: Any, at: int
) -> None:
    # a Ctrl-C inside a step saves the state before it: at the partial window's first batch (the
    # window closed) or between its batches; the resume divides that window's losses by its
    # length as the uninterrupted run does, not by N
    calls = [0]

    def interrupted(model: Any, batch: Any) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return _loss_fn(model, batch)

    # the batches of `_batches`, in order, as samples the state's counters position
    data = TensorDataset(*(torch.cat(t) for t in zip(*_batches())))
    kw: dict[str, Any] = dict(
        partial_window="over_length", checkpoint_dir=tmp_path, batch_size=5, shuffle=False, **QUIET
    )
    tx = ft.sgd(0.1, momentum=0.9, fused=False)
    first = ft.TrainState.create(_model(), tx, interrupted, accumulate_steps=N)
    stopped = ft.fit(first, data, max_epochs=EPOCHS, **kw)
    assert stopped.stop_reason == "interrupted" and int(stopped.state.step) == 2
    resumed = ft.fit(_state(), data, max_epochs=EPOCHS, resume=True, **kw)
    _assert_params(resumed.state, hugging_face())


def test_an_own_loop_closes_the_partial_window_as_lightning_with_closing_window() -> None:
    state = _state()
    for _ in range(EPOCHS):
        for i, batch in enumerate(_batches()):
            if i == BATCHES - BATCHES % N:  # the epoch's last, partial window starts
                state = state.closing_window(BATCHES - i)
            state, _ = ft.train_step(state, batch)
    _assert_params(state, lightning())


def test_an_own_loop_closes_it_as_hugging_face_dividing_the_loss_by_the_windows_length() -> None:
    def loss_fn(model: Any, batch: Any) -> torch.Tensor:
        return _loss_fn(model, batch[:2]) / batch[2]  # the length of the batch's window

    tx = ft.sgd(0.1, momentum=0.9, fused=False)
    state = ft.TrainState.create(
        _model(), tx, loss_fn, accumulate_steps=N, accumulate_convention="sum"
    )
    for _ in range(EPOCHS):
        for i, (x, y) in enumerate(_batches()):
            last = BATCHES - BATCHES % N
            if i == last:
                state = state.closing_window(BATCHES - i)
            state, _ = ft.train_step(state, (x, y, N if i < last else BATCHES % N))
    _assert_params(state, hugging_face())


def test_partial_window_is_refused_without_accumulation_or_the_loss_it_divides() -> None:
    plain = ft.TrainState.create(_model(), ft.sgd(0.1), _loss_fn)
    with pytest.raises(ConfigError, match=r"the state has accumulate_steps=1"):
        ft.fit(plain, _batches(), max_epochs=1, partial_window="over_n", **QUIET)
    summed = _state(accumulate_convention="sum")
    with pytest.raises(ConfigError, match=r"accumulate_convention='sum' does not divide the loss"):
        ft.fit(summed, _batches(), max_epochs=1, partial_window="over_length", **QUIET)


def test_closing_window_refuses_more_batches_than_the_window_has_left() -> None:
    state, _ = ft.train_step(_state(), _batches()[0])
    with pytest.raises(
        ConfigError,
        match=r"batches must be an int from 1 to 2 \(the window holds 1 of its accumulate_steps=3 "
        r"micro-batches\), got batches=3",
    ):
        state.closing_window(3)


class _Rows(torch.utils.data.Dataset):
    """The batches' rows as a tokenizer's output would be: the model's keyword arguments."""

    def __init__(self) -> None:
        batches = _batches()
        self.x = torch.cat([b[0] for b in batches])
        self.y = torch.cat([b[1] for b in batches])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class _Tiny(torch.nn.Module):
    """A model in transformers' shape without ``**kwargs``: the Trainer divides its loss."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.linear(x)
        return {"loss": F.mse_loss(out, labels), "logits": out}


def _tiny() -> _Tiny:
    torch.manual_seed(0)
    return _Tiny()


def test_fit_over_length_is_hugging_faces_trainer_bit_for_bit(tmp_path: Any) -> None:
    from dataclasses import fields

    transformers = pytest.importorskip("transformers")
    if "train_sampling_strategy" not in {f.name for f in fields(transformers.TrainingArguments)}:
        pytest.skip("the Trainer's sequential order needs train_sampling_strategy")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=5,
        gradient_accumulation_steps=N,
        num_train_epochs=EPOCHS,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping
        optim="adamw_torch",  # torch.optim.AdamW's default implementation
        weight_decay=0.0,
        train_sampling_strategy="sequential",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    model = _tiny()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows())
    trainer.train()
    tx = ft.adamw(0.1, weight_decay=0.0, fused=False)
    state = ft.TrainState.create(_tiny(), tx, lambda m, b: m(**b)["loss"], accumulate_steps=N)
    result = ft.fit(
        state,
        _Rows(),
        batch_size=5,
        shuffle=False,
        max_epochs=EPOCHS,
        partial_window="over_length",
        **QUIET,
    )
    assert int(result.state.step) == trainer.state.global_step == EPOCHS * 3
    for name, p in model.named_parameters():
        assert torch.equal(result.state.params[name], p.detach()), name


class _Branching(torch.nn.Module):
    """A second layer the batches of an epoch's partial window leave unused."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 2)
        self.b = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        return self.a(x) + self.b(x) if use_b else self.a(x)


def _branch_loss(model: Any, batch: Any) -> torch.Tensor:
    return F.mse_loss(model(batch[0], batch[2]), batch[1])


@pytest.mark.parametrize("partial_window", ["over_n", "over_length"])
def test_a_weight_without_a_gradient_in_the_partial_window_sits_its_update_out(
    partial_window: str,
) -> None:
    # as torch's .grad stays None through the trainers' partial window: no update, no decay
    data = [(x, y, i < BATCHES - BATCHES % N) for i, (x, y) in enumerate(_batches())]
    model = _Branching()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    for _ in range(2):
        batches = iter(data)
        for length in _windows(BATCHES):
            divisor = length if partial_window == "over_length" else N
            for _ in range(length):
                (_branch_loss(model, next(batches)) / divisor).backward()
            optimizer.step()
            optimizer.zero_grad()
    state = ft.TrainState.create(_Branching(), ft.adamw(1e-2), _branch_loss, accumulate_steps=N)
    result = ft.fit(
        state, data, max_epochs=2, shuffle=False, partial_window=partial_window, **QUIET
    )
    for name, p in model.named_parameters():
        assert torch.equal(result.state.params[name], p.detach()), name
