"""Sampling: the top-k and nucleus filters, greedy limits, seeded reproducibility, EMA weights, the
callback."""

from __future__ import annotations

import collections
import io
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

import functrain as ft
from functrain.errors import ConfigError
from functrain.generation import (
    SampleText,
    generate,
    sample_logits,
    top_k_filter,
    top_p_filter,
)

VOCAB = 7


def shifted_embedding(shift: int, scale: float = 3.0) -> torch.Tensor:
    """Weights of an `Embedding(VOCAB, VOCAB)` whose most likely next id after i is i + shift."""
    return scale * torch.eye(VOCAB).roll(shift, dims=1)


def lm_loss(model: Any, batch: tuple[torch.Tensor]) -> torch.Tensor:
    (x,) = batch
    return torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def make_state(shift: int = 1, **kwargs: Any) -> ft.TrainState:
    emb = torch.nn.Embedding(VOCAB, VOCAB)
    with torch.no_grad():
        emb.weight.copy_(shifted_embedding(shift))
    return ft.TrainState.create(emb, ft.sgd(0.1), lm_loss, **kwargs)


def random_logits(seed: int, shape: tuple[int, ...] = (16, 50)) -> torch.Tensor:
    return 3 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 3, 50])
def test_top_k_keeps_exactly_k_largest(k: int) -> None:
    logits = random_logits(k)
    kept = top_k_filter(logits, k).isfinite()
    assert kept.sum(-1).tolist() == [k] * 16
    # every kept logit is at least every dropped one
    assert (
        logits.masked_fill(~kept, float("inf")).amin(-1)
        >= logits.masked_fill(kept, float("-inf")).amax(-1)
    ).all()


def test_top_k_keeps_exactly_k_among_ties() -> None:
    assert top_k_filter(torch.zeros(10), 4).isfinite().sum() == 4


def test_top_k_above_vocabulary_keeps_everything() -> None:
    logits = random_logits(0, (5,))
    assert torch.equal(top_k_filter(logits, 100), logits)


@pytest.mark.parametrize(
    "p, expected", [(0.45, [0]), (0.75, [0, 1]), (0.81, [0, 1, 2]), (1.0, [0, 1, 2, 3])]
)
def test_top_p_keeps_smallest_prefix_reaching_p(p: float, expected: list[int]) -> None:
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()[
        [1, 3, 0, 2]
    ]  # probabilities 0.5, 0.3, 0.15, 0.05
    assert top_p_filter(logits, p).isfinite().nonzero().flatten().tolist() == expected


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_top_p_kept_set_is_minimal_and_reaches_p(p: float) -> None:
    logits = random_logits(int(p * 100))
    probs = logits.softmax(-1)
    kept = top_p_filter(logits, p).isfinite()
    mass = (probs * kept).sum(-1)
    smallest_kept = probs.masked_fill(~kept, float("inf")).amin(-1)
    largest_dropped = probs.masked_fill(kept, float("-inf")).amax(-1)
    assert (mass >= p - 1e-6).all()  # reaches p
    assert (mass - smallest_kept < p).all()  # without its least likely token it would not
    assert (smallest_kept >= largest_dropped).all()  # and it is made of the most likely tokens


def test_top_p_always_keeps_the_most_likely_token() -> None:
    logits = torch.tensor([5.0, 0.0, 0.0])
    assert top_p_filter(logits, 1e-9).isfinite().tolist() == [True, False, False]


def test_temperature_zero_is_argmax() -> None:
    logits = random_logits(1)
    assert torch.equal(sample_logits(logits, temperature=0, generator=None), logits.argmax(-1))


def test_temperature_towards_zero_equals_greedy() -> None:
    logits = random_logits(2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert torch.equal(
            sample_logits(logits, temperature=1e-3, generator=gen), logits.argmax(-1)
        )


def test_float64_logits_are_filtered_and_sampled_in_float64() -> None:
    # two logits equal in float32: top-1 in float64 keeps the second
    logits = torch.tensor([[1.0, 1.0 + 1e-12, -5.0]] * 4, dtype=torch.float64)
    kept = logits.topk(1, dim=-1).indices
    masked = torch.full_like(logits, float("-inf")).scatter(-1, kept, logits.gather(-1, kept))
    probs = (masked / 0.7).softmax(-1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0))[:, 0]
    gen = torch.Generator().manual_seed(0)
    got = sample_logits(logits, temperature=0.7, top_k=1, generator=gen)
    assert got.tolist() == expected.tolist() == [1, 1, 1, 1]


def test_sampling_never_picks_a_filtered_token() -> None:
    logits = random_logits(3, (4000, 10))
    gen = torch.Generator().manual_seed(0)
    draws = sample_logits(logits, temperature=1.0, top_k=2, top_p=0.9, generator=gen)
    allowed = top_p_filter(top_k_filter(logits, 2), 0.9).isfinite()
    assert allowed.gather(-1, draws.unsqueeze(-1)).all()
    assert not allowed.all(-1).all()  # the filters did drop something


def test_generate_greedy_follows_the_most_likely_chain() -> None:
    assert generate(make_state(shift=2), [0], 5, temperature=0).tolist() == [0, 2, 4, 6, 1, 3]


class Decoder(torch.nn.Module):
    """A model whose forward is not the logits: generation calls its `decode` method."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, VOCAB, _weight=shifted_embedding(3))

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.decode(ids)}

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


def test_forward_may_call_a_method_of_the_model_on_the_states_weights() -> None:
    state = ft.TrainState.create(Decoder(), ft.sgd(0.1), lambda m, b: m(b)["logits"].sum())
    out = generate(state, [0], 3, temperature=0, forward=lambda model, ids: model.decode(ids))
    assert out.tolist() == [0, 3, 6, 2]


def test_generate_keeps_batch_shape() -> None:
    out = generate(make_state(), torch.tensor([[0, 1], [3, 4]]), 3, temperature=0)
    assert out.tolist() == [[0, 1, 2, 3, 4], [3, 4, 5, 6, 0]]


def test_same_seed_gives_same_tokens_and_other_seed_differs() -> None:
    state = make_state()
    kwargs: dict[str, Any] = {"temperature": 1.5, "top_k": 5, "top_p": 0.95}
    a = generate(state, [0], 60, seed=1, **kwargs)
    b = generate(state, [0], 60, seed=1, **kwargs)
    c = generate(state, [0], 60, seed=2, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generate_leaves_global_rng_and_state_untouched() -> None:
    state = make_state()
    weights = state.params["weight"].clone()
    before = torch.get_rng_state()
    generate(state, [0], 20, temperature=1.0, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(state.params["weight"], weights)


def test_a_forward_drawing_in_eval_mode_draws_from_the_states_generator() -> None:
    class Noisy(torch.nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            out = super().forward(ids)
            return out + 10 * torch.randn_like(out)  # drawn in eval mode too

    torch.manual_seed(0)
    module = Noisy(VOCAB, VOCAB)
    state = ft.TrainState.create(module, ft.sgd(0.1), lm_loss)
    # torch's loop: the global generator at the state's, the model in eval mode
    caller = torch.get_rng_state()
    torch.set_rng_state(state.rng)
    ids, gen = torch.tensor([[0]]), torch.Generator().manual_seed(4)
    module.eval()
    with torch.no_grad():
        for _ in range(12):
            probs = module(ids)[:, -1, :].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=-1)
    module.train()
    torch.set_rng_state(caller)
    assert torch.equal(generate(state, [[0]], 12, seed=4), ids)
    assert torch.equal(generate(state, [[0]], 12, seed=4), ids)
    assert torch.equal(torch.get_rng_state(), caller)


def test_generate_restores_training_flag_and_runs_in_eval_mode() -> None:
    seen: list[bool] = []

    class Probe(torch.nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            seen.append(self.training)
            return super().forward(ids)

    module = Probe(VOCAB, VOCAB)
    state = ft.TrainState.create(module, ft.sgd(0.1), lm_loss)
    assert module.training
    generate(state, [0], 2, temperature=0)
    assert seen == [False, False] and module.training


def test_a_forward_reading_the_given_modules_weights_is_refused() -> None:
    class Held(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, VOCAB)
            # a function the state's copy cannot rebind: it reads this module's weight
            self.fns = collections.deque([lambda ids: self.emb(ids)])

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fns[0](ids)

    state = ft.TrainState.create(Held(), ft.sgd(0.1), lm_loss)
    state = state.replace(params={"emb.weight": shifted_embedding(1)})
    with pytest.raises(ConfigError, match="generate's forward reads the tensor 'emb.weight'"):
        generate(state, [0], 3, temperature=0)
    with pytest.raises(ConfigError, match="generate's forward reads the tensor 'emb.weight'"):
        generate(state, [0], 3, temperature=0)


def test_use_ema_runs_the_ema_weights() -> None:
    # EMA starts at the initial weights (i -> i + 1); the raw weights are replaced by i -> i + 3
    state = make_state(shift=1, ema_decay=0.9)
    state = state.replace(params={"weight": shifted_embedding(3)})
    assert generate(state, [0], 3, temperature=0, use_ema=True).tolist() == [0, 1, 2, 3]
    assert generate(state, [0], 3, temperature=0).tolist() == [0, 3, 6, 2]


def test_context_size_crops_the_window() -> None:
    widths: list[int] = []

    def forward(model: Any, ids: torch.Tensor) -> torch.Tensor:
        widths.append(ids.shape[1])
        return model(ids)

    generate(make_state(), [0, 1, 2], 4, temperature=0, context_size=2, forward=forward)
    assert widths == [2, 2, 2, 2]


class LearnedPositions(torch.nn.Module):
    """Logits from a token and a learned position: a context of `block` ids, as nanoGPT's wpe."""

    def __init__(self, block: int = 4) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(5, 5)
        self.wpe = torch.nn.Embedding(block, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))


def test_a_fixed_context_without_context_size_says_to_pass_it() -> None:
    torch.manual_seed(0)
    state = ft.TrainState.create(LearnedPositions(), ft.sgd(0.1), lambda m, b: m(b).sum())
    # torch's own error is "index out of range in self", naming neither the window nor the fix
    with pytest.raises(ConfigError, match=r"ran on 4 ids and failed on 5.*context_size=") as info:
        generate(state, [0, 1], 6, temperature=0)
    assert isinstance(info.value.__cause__, IndexError)
    # with it, the model sees its last 4 ids, as a hand-written loop cropping them
    model = state.export_module()
    ids = torch.tensor([[0, 1]])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids[:, -4:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate(state, [[0, 1]], 6, temperature=0, context_size=4), ids)
    # an error at the first forward is the model's own, unchanged
    with pytest.raises(IndexError):
        generate(state, [0, 1, 2, 3, 4], 1, temperature=0)


class WideHead(torch.nn.Module):
    """Logits over more ids than its embedding has rows for: a generated id it cannot read."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(4, 8)
        self.head = torch.nn.Linear(8, 6)
        with torch.no_grad():
            self.head.bias[5] = 50.0  # the argmax is id 5

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.wte(ids))


def test_a_generated_id_the_model_cannot_read_is_not_blamed_on_a_context() -> None:
    torch.manual_seed(0)
    model = WideHead()
    state = ft.TrainState.create(model, ft.sgd(0.1), lambda m, b: m(b).sum())
    # a hand-written loop fails at the second forward, on the id 5 the first one chose
    ids = torch.tensor([[1, 2]])
    with torch.no_grad():
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        with pytest.raises(IndexError) as torch_error:
            model(ids)
    # the same error, not a fixed context's ConfigError (context_size would change nothing)
    with pytest.raises(IndexError) as info:
        generate(state, [1, 2], 3, temperature=0)
    assert str(info.value) == str(torch_error.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.5}, r"temperature must be a number >= 0.*temperature=-0\.5"),
        ({"top_k": 0}, r"top_k must be an int >= 1.*top_k=0"),
        ({"top_p": 0.0}, r"top_p must lie in \(0, 1\].*top_p=0\.0"),
        ({"top_p": 1.5}, r"top_p must lie in \(0, 1\].*top_p=1\.5"),
    ],
)
def test_bad_sampling_arguments_raise(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        sample_logits(torch.zeros(3), generator=torch.Generator(), **kwargs)
    with pytest.raises(ConfigError, match=match):
        generate(make_state(), [0], 1, **kwargs)


def test_errors_are_listed_together() -> None:
    with pytest.raises(ConfigError, match=r"(?s)temperature.*top_k.*top_p.*max_new_tokens"):
        generate(make_state(), [0], -1, temperature=-1, top_k=0, top_p=2.0)


def test_generate_refuses_what_is_not_one_state() -> None:
    with pytest.raises(ConfigError, match="expects a functrain.TrainState, got Embedding"):
        generate(torch.nn.Embedding(VOCAB, VOCAB), [0], 3)  # type: ignore[arg-type]
    stacked = ft.stack([make_state(1), make_state(2)])
    with pytest.raises(ConfigError, match="functrain.unstack"):
        generate(stacked, [0], 3, temperature=0)


@pytest.mark.parametrize("seed", [1.5, True, "3", None, 2**64])
def test_bad_seed_raises(seed: Any) -> None:
    with pytest.raises(ConfigError, match="seed must be an int"):
        generate(make_state(), [0], 3, seed=seed)


def test_prompts_of_different_lengths_raise() -> None:
    with pytest.raises(ConfigError, match="prompts of different lengths"):
        generate(make_state(), [[0, 1, 2], [3]], 3)


def test_a_forward_returning_no_logits_raises_naming_forward() -> None:
    class Output(torch.nn.Embedding):
        def forward(self, ids: torch.Tensor) -> Any:
            return {"logits": super().forward(ids)}

    state = ft.TrainState.create(Output(VOCAB, VOCAB), ft.sgd(0.1), lm_loss)
    with pytest.raises(ConfigError, match="got dict from the forward; pass forward="):
        generate(state, [0], 3)
    # a forward giving the last position's logits alone is enough
    last = generate(state, [0], 3, temperature=0, forward=lambda m, ids: m(ids)["logits"][:, -1:])
    assert torch.equal(
        last, generate(state, [0], 3, temperature=0, forward=lambda m, ids: m(ids)["logits"])
    )


def test_sampling_without_generator_raises() -> None:
    with pytest.raises(ConfigError, match="needs an explicit generator"):
        sample_logits(torch.zeros(3), temperature=1.0, generator=None)


def test_use_ema_without_ema_raises() -> None:
    with pytest.raises(ConfigError, match="use_ema=True needs a state created with ema_decay"):
        generate(make_state(), [0], 1, use_ema=True)


def test_empty_prompt_raises() -> None:
    with pytest.raises(ConfigError, match=r"prompt_ids must be a non-empty.*Tensor\[0\]"):
        generate(make_state(), torch.tensor([], dtype=torch.long), 1)


def test_sample_text_rejects_bad_every() -> None:
    with pytest.raises(ConfigError, match=r"every must be an int >= 1.*every=0"):
        SampleText(0, "a", decode=str, encode=list)


def _alphabet_data() -> TensorDataset:
    return TensorDataset(torch.arange(8 * 5).view(8, 5) % VOCAB)


@pytest.mark.parametrize("every, steps", [(None, [2, 4, 6]), (3, [3, 6])])
def test_sample_text_prints_at_epoch_ends_or_every_n_updates(
    every: int | None, steps: list[int]
) -> None:
    out = io.StringIO()
    sampler = SampleText(
        every,
        "ab",
        decode=lambda t: "".join("abcdefg"[i] for i in t),
        encode=lambda s: ["abcdefg".index(c) for c in s],
        max_new_tokens=4,
        temperature=0,
        file=out,
    )
    ft.fit(
        make_state(),
        _alphabet_data(),
        batch_size=4,
        max_epochs=3,
        shuffle=False,
        callbacks=[sampler],
        progress=False,
        verbosity="silent",
    )
    assert [step for step, _ in sampler.samples] == steps
    assert all(text.startswith("ab") and len(text) == 6 for _, text in sampler.samples)
    assert out.getvalue().count("--- sample @ step") == len(steps)


def test_weights_a_sample_texts_forward_keeps_during_fit_keep_their_values() -> None:
    # the forward is the user's, given the state's model: fit steps pure while it holds a weight
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(model: Any, ids: torch.Tensor) -> torch.Tensor:
        weight = next(model.parameters())
        kept.append((weight, weight.clone()))
        return model(ids)

    sampler = SampleText(
        1,
        "ab",
        decode=lambda t: "".join("abcdefg"[i] for i in t),
        encode=lambda s: ["abcdefg".index(c) for c in s],
        max_new_tokens=1,
        temperature=0,
        forward=forward,
        file=io.StringIO(),
    )
    ft.fit(
        make_state(),
        _alphabet_data(),
        batch_size=2,
        max_epochs=1,
        callbacks=[sampler],
        progress=False,
        verbosity="silent",
    )
    assert len(kept) == 4
    for weight, copy in kept:
        assert torch.equal(weight, copy)
