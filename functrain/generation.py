"""Sampling from autoregressive models: logit filters, `generate`, a callback printing samples.

`generate` runs the state's module on its raw or EMA weights (bound to them as the loss function's
model is: `functrain.core.binding.bound`), in eval mode and without gradients, one token at a
time. Every sampling draw comes from a `torch.Generator` seeded from the explicit `seed` (a draw
of the forward's own from the state's generator), so the same state, prompt and seed give the same
tokens, and the caller's global RNG is left as it was.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import IO, Any, Protocol

import torch

from functrain.core.binding import BoundModel, bound
from functrain.core.loss import reads_checked
from functrain.core.scope import in_scope
from functrain.core.state import TrainState
from functrain.distributed.sharding import gathered
from functrain.driver.callbacks import Callback, Run, on
from functrain.errors import ConfigError, config_check

__all__ = ["Forward", "SampleText", "generate", "sample_logits", "top_k_filter", "top_p_filter"]


class Forward(Protocol):
    """``forward(model, ids) -> logits``: the logits ``[batch, time, vocab]`` of a window of ids."""

    def __call__(self, model: BoundModel, ids: torch.Tensor) -> torch.Tensor: ...


def _sampling_problems(temperature: Any, top_k: Any, top_p: Any) -> list[str]:
    problems = []
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not temperature >= 0
    ):
        problems.append(
            "temperature must be a number >= 0 (0 is greedy decoding), got "
            f"temperature={temperature!r}"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        problems.append(
            f"top_k must be an int >= 1 or None (no top-k filtering), got top_k={top_k!r}"
        )
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1
    ):
        problems.append(
            f"top_p must lie in (0, 1] or be None (no nucleus filtering), got top_p={top_p!r}"
        )
    return problems


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` largest logits of the last dimension and set the others to ``-inf``.

    Exactly `k` entries survive, ties broken by `torch.topk`; a `k` above the vocabulary size keeps
    everything.

    Args:
        logits: ``[..., vocab]``.
        k: how many candidates to keep, >= 1.

    Returns:
        A new tensor of the shape of `logits`.

    Raises:
        ConfigError: `k` < 1.

    Example:
        >>> top_k_filter(torch.tensor([1.0, 3.0, 2.0, 0.0]), 2)
        tensor([-inf, 3., 2., -inf])
    """
    config_check(_sampling_problems(1.0, k, None), "top_k_filter")
    k = min(k, logits.shape[-1])
    kept = logits.topk(k, dim=-1).indices
    return torch.full_like(logits, float("-inf")).scatter(-1, kept, logits.gather(-1, kept))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches `p`.

    Tokens are taken in decreasing probability until their total is at least `p`; the rest are set
    to ``-inf``. The most likely token is always kept, so at least one candidate survives.

    Args:
        logits: ``[..., vocab]``.
        p: the probability mass to cover, in (0, 1]; 1 keeps every token.

    Returns:
        A new tensor of the shape of `logits`.

    Raises:
        ConfigError: `p` outside (0, 1].

    Example:
        >>> logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
        >>> top_p_filter(logits, 0.7).isfinite()
        tensor([ True,  True, False, False])
    """
    config_check(_sampling_problems(1.0, None, p), "top_p_filter")
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    # a token is needed while the mass of the tokens before it is still short of p
    before = probs.cumsum(dim=-1) - probs
    keep_sorted = before < p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def sample_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Draw one token id per row of `logits`, after temperature, top-k and top-p filtering.

    Half-precision logits are filtered and sampled in float32, float64 ones in float64.

    Args:
        logits: ``[..., vocab]`` unnormalised log-probabilities.
        temperature: divides the logits; 0 is greedy decoding (the argmax, no draw).
        top_k: sample only among the `top_k` most likely tokens (None: all).
        top_p: sample only from the nucleus of mass `top_p` (None: all).
        generator: the generator every draw comes from, on the device of `logits`; it must be
            given (None only with ``temperature=0``), so sampling never touches the global RNG.

    Returns:
        int64 token ids of shape ``logits.shape[:-1]``.

    Raises:
        ConfigError: temperature < 0, top_k < 1, top_p outside (0, 1], or no generator to sample
            with.

    Example:
        >>> logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 9.0]])
        >>> sample_logits(logits, temperature=0, generator=None)
        tensor([1, 2])
        >>> gen = torch.Generator().manual_seed(0)
        >>> sample_logits(logits, temperature=1.0, top_k=1, generator=gen)
        tensor([1, 2])
    """
    problems = _sampling_problems(temperature, top_k, top_p)
    if generator is None and not problems and temperature > 0:
        problems.append(
            "sampling with temperature > 0 needs an explicit generator (e.g. "
            "torch.Generator().manual_seed(0)); pass temperature=0 for greedy decoding"
        )
    config_check(problems, "sample_logits")
    if temperature == 0:
        return logits.argmax(dim=-1)
    # half-precision logits filtered and sampled in float32; float64 ones in their own dtype
    scaled = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if top_k is not None:
        scaled = top_k_filter(scaled, top_k)
    if top_p is not None:
        scaled = top_p_filter(scaled, top_p)
    probs = scaled.softmax(dim=-1)
    draws = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return draws.reshape(logits.shape[:-1])


def _logits_of(model: BoundModel, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)


def _runs_on(forward: Forward, model: BoundModel, window: torch.Tensor) -> bool:
    """Whether `forward` runs on `window` (a forward that failed on a longer one): where it
    fails on these ids too, its failure comes from the ids it was given (an id the embedding
    has no row for), not from their number."""
    try:
        forward(model, window)
    except (IndexError, RuntimeError):
        return False
    return True


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)}"
    return type(value).__name__


def _as_ids(prompt_ids: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    try:
        ids = torch.as_tensor(prompt_ids, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(
            "prompt_ids must be a 1-d [time] or 2-d [batch, time] tensor of int ids (prompts of "
            f"one length: a batch of prompts of different lengths generated one by one), got "
            f"{type(prompt_ids).__name__} ({e})"
        ) from None
    if ids.dtype not in (torch.int64, torch.int32) or ids.ndim not in (1, 2) or ids.shape[-1] == 0:
        raise ConfigError(
            "prompt_ids must be a non-empty 1-d [time] or 2-d [batch, time] tensor of int ids, "
            f"got Tensor{list(ids.shape)} {ids.dtype}; encode the prompt first, e.g. "
            "torch.tensor([stoi[c] for c in text])"
        )
    return ids.long()


def generate(
    state: TrainState,
    prompt_ids: torch.Tensor | Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    use_ema: bool = False,
    context_size: int | None = None,
    forward: Forward | None = None,
) -> torch.Tensor:
    """Continue `prompt_ids` by `max_new_tokens` tokens sampled from the state's model.

    The module runs on the state's raw (or EMA) weights, frozen parameters and buffers, in eval
    mode under `torch.no_grad`; its training flag and tensors are restored afterwards and the state
    is not modified. Draws come from a fresh `torch.Generator` seeded with
    `seed`: the same arguments give the same tokens, and the global RNG is untouched (a forward
    that draws in eval mode, a noise layer, draws from the state's generator, as in `predict`).

    Args:
        state: the `TrainState` whose module maps ids ``[batch, time]`` to logits
            ``[batch, time, vocab]`` (or see `forward`).
        prompt_ids: ``[time]`` or ``[batch, time]`` int ids (a list of ints works too).
        max_new_tokens: how many tokens to append, >= 0.
        temperature / top_k / top_p: as in `sample_logits` (temperature 0 is greedy).
        seed: seeds the generator of the draws.
        use_ema: run the EMA of the weights instead of the raw parameters.
        context_size: feed the model only the last `context_size` ids (a model with a fixed
            context, such as learned positions, needs its own); None feeds the whole sequence.
        forward: ``forward(model, ids) -> logits`` when the module's output is not the logits
            themselves (a tuple, a dict), or to call another method (``model.decode(ids)``);
            `model` is a `BoundModel`, as in the loss function; the default is ``model(ids)``.

    Returns:
        The prompt followed by the new ids: int64, ``[time + max_new_tokens]`` or
        ``[batch, time + max_new_tokens]`` like `prompt_ids`, on the state's device.

    Raises:
        ConfigError: not a `TrainState`, a stacked state, bad sampling arguments or seed, `use_ema`
            without EMA, a bad prompt (prompts of different lengths), or `max_new_tokens` /
            `context_size` out of range (all argument problems at once); a forward whose output
            is not logits ``[batch, time, vocab]`` (pass `forward`); at a
            structure's first call, a forward that reads a tensor of the module given to
            `create`, not the state's, as `functrain.predict` refuses it; a forward that ran
            and then fails (`IndexError`, `RuntimeError`) on a longer window without
            `context_size`, and still runs on the last ids of the length it ran on (a fixed
            context: pass it); where it fails on those too (a generated id its embedding has
            no row for), its own error is raised.

    Example:
        >>> import torch, functrain as ft
        >>> emb = torch.nn.Embedding(5, 5)          # logits of the next id from the current one
        >>> with torch.no_grad():
        ...     _ = emb.weight.copy_(10 * torch.eye(5).roll(1, dims=1))   # i -> i + 1
        >>> state = ft.TrainState.create(emb, ft.sgd(0.1), lambda m, b: m(b).sum())
        >>> generate(state, [0], 3, temperature=0)
        tensor([0, 1, 2, 3])
        >>> same = generate(state, [[0], [2]], 4, temperature=2.0, top_p=0.9, seed=7)
        >>> torch.equal(same, generate(state, [[0], [2]], 4, temperature=2.0, top_p=0.9, seed=7))
        True
    """
    if not isinstance(state, TrainState):
        raise ConfigError(
            f"generate expects a functrain.TrainState, got {type(state).__name__}; build one with "
            "TrainState.create(...)"
        )
    problems = _sampling_problems(temperature, top_k, top_p)
    if state.members:
        problems.append(
            "generate runs one model, and this state holds stacked members: run them one by one, "
            "[ft.generate(s, ...) for s in functrain.unstack(state)]"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        problems.append(f"seed must be an int (a torch.Generator's seed), got seed={seed!r}")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        problems.append(
            f"max_new_tokens must be an int >= 0, got max_new_tokens={max_new_tokens!r}"
        )
    if context_size is not None and (
        isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1
    ):
        problems.append(
            f"context_size must be an int >= 1 or None, got context_size={context_size!r}"
        )
    if use_ema and state.ema_state is None:
        problems.append(
            "use_ema=True needs a state created with ema_decay=...; this state has no EMA"
        )
    config_check(problems, "generate")
    ids = _as_ids(prompt_ids, state.device)
    squeeze = ids.ndim == 1
    ids = ids.unsqueeze(0) if squeeze else ids
    weights, frozen = state.evaluated(use_ema)  # (schedule-free's average)
    assert weights is not None  # use_ema without an EMA was refused above
    # a sharded state's weights gathered whole once (every rank must call), not at every token
    weights = {k: gathered(w) for k, w in weights.items()}
    # a copy of the buffers: eval mode should not write them, but a module may, and the state must
    # not change
    buffers = (state.ema_buffers if use_ema else None) or state.buffers  # the EMA's, if it keeps
    tensors = {**weights, **frozen, **{k: b.clone() for k, b in buffers.items()}}
    forward = forward or _logits_of
    generator = torch.Generator(device=state.device).manual_seed(seed)

    def run(ids: torch.Tensor) -> torch.Tensor:
        ran_on = 0  # the longest window a forward has run on
        with torch.no_grad(), bound(state.module, tensors) as model:
            for _ in range(max_new_tokens):
                window = ids if context_size is None else ids[:, -context_size:]
                # a structure's first call reads none of the tensors of the module it was copied
                # from (checked at its first forward, `reads_checked`)
                try:
                    with reads_checked(state.module, tensors, "generate"):
                        out = forward(model, window)
                except (IndexError, RuntimeError) as error:
                    if (
                        context_size is None
                        and 0 < ran_on < window.shape[1]
                        and _runs_on(forward, model, window[:, -ran_on:])
                    ):
                        # a model with learned positions (or a mask of its block size) reads
                        # no longer window than its context
                        raise ConfigError(
                            f"generate's forward ran on {ran_on} ids and failed on "
                            f"{window.shape[1]} ({type(error).__name__}: {error}): a model with a "
                            "fixed context (learned positions, a causal mask of its block size) "
                            "takes at most that many ids; pass context_size=<its context length> "
                            "(nanoGPT's block_size) to feed it the last context_size ids"
                        ) from error
                    raise
                ran_on = max(ran_on, window.shape[1])
                if not (
                    isinstance(out, torch.Tensor)
                    and out.ndim == 3
                    and out.shape[0] == window.shape[0]
                ):
                    raise ConfigError(
                        "generate needs logits [batch, time, vocab] for the ids "
                        f"{list(window.shape)}, got {_described(out)} from the forward; pass "
                        "forward=lambda model, ids: model(ids).logits (or whatever gives them) "
                        "where the module returns a tuple, a dict or an output object"
                    )
                logits = out[:, -1, :]
                token = sample_logits(
                    logits,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    generator=generator,
                )
                ids = torch.cat([ids, token.unsqueeze(-1)], dim=-1)
        return ids

    # in the state's scope, as `predict` runs: eval mode, and a draw of the forward's own (a noise
    # layer) from the state's generator, the caller's RNG and the module's modes restored after
    ids = in_scope(state, False, lambda: run(ids))
    return ids.squeeze(0) if squeeze else ids


class SampleText(Callback):
    """A callback printing generated text while `fit` trains: at epoch ends, or every N updates.

    Each sample continues the same prompt with the same seed, so successive samples differ only
    because the model changed. The printed texts are also kept in `samples` as ``(step, text)``.

    Args:
        every: print every this many optimizer updates; None prints at the end of every epoch.
        prompt: the text to continue.
        decode: ``decode(list_of_ids) -> str``.
        encode: ``encode(str) -> list_of_ids``.
        max_new_tokens: the length of each sample, in tokens.
        temperature / top_k / top_p / seed / use_ema / context_size / forward: as in `generate`.
        file: where to print (default: standard output, written around any progress bar).

    Raises:
        ConfigError: invalid sampling arguments, `every` < 1 or an empty prompt (all at once).

    Example:
        >>> import io, torch, functrain as ft
        >>> from torch.utils.data import TensorDataset
        >>> chars = "ab"
        >>> ids = torch.tensor([0, 1] * 16).view(8, 4)
        >>> def loss_fn(model, batch):
        ...     (x,) = batch
        ...     logits = model(x[:, :-1])
        ...     return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        >>> sampler = SampleText(
        ...     2,
        ...     "a",
        ...     decode=lambda t: "".join(chars[i] for i in t),
        ...     encode=lambda s: [chars.index(c) for c in s],
        ...     max_new_tokens=5, temperature=0, file=io.StringIO(),
        ... )
        >>> model = torch.nn.Embedding(2, 2, _weight=torch.zeros(2, 2))
        >>> state = ft.TrainState.create(model, ft.adamw(0.5), loss_fn)
        >>> quiet = dict(progress=False, verbosity="silent", callbacks=[sampler])
        >>> _ = ft.fit(state, TensorDataset(ids), batch_size=4, max_epochs=2, **quiet)
        >>> sampler.samples
        [(2, 'ababab'), (4, 'ababab')]
    """

    def __init__(
        self,
        every: int | None,
        prompt: str,
        decode: Callable[[list[int]], str],
        encode: Callable[[str], Sequence[int]],
        *,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        use_ema: bool = False,
        context_size: int | None = None,
        forward: Forward | None = None,
        file: IO[str] | None = None,
    ) -> None:
        problems = _sampling_problems(temperature, top_k, top_p)
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            problems.append(
                f"every must be an int >= 1 (updates) or None (epoch ends), got every={every!r}"
            )
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            problems.append(
                f"max_new_tokens must be an int >= 1, got max_new_tokens={max_new_tokens!r}"
            )
        if not prompt:
            problems.append(
                "prompt must be a non-empty string: the model needs at least one token to continue"
            )
        config_check(problems, "SampleText")
        self.every, self.prompt, self.decode, self.file = every, prompt, decode, file
        self.prompt_ids = list(encode(prompt))
        self.options: dict[str, Any] = {
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "seed": seed,
            "use_ema": use_ema,
            "context_size": context_size,
            "forward": forward,
        }
        self.max_new_tokens = max_new_tokens
        # a forward of the user's is given the state's model: it may keep a weight
        self.users_code = forward is not None
        self.samples: list[tuple[int, str]] = []
        # `on` counts updates (once per update under accumulation) and epochs for us
        self._trigger = on("epoch_end" if every is None else "batch_end", every=every or 1)(
            self._sample
        )

    def _sample(self, run: Run) -> None:
        ids = generate(run.state, self.prompt_ids, self.max_new_tokens, **self.options)
        text = self.decode(ids.tolist())  # one host read per sample, at the sampling interval only
        self.samples.append((run.step, text))
        from tqdm import (
            tqdm,  # not tqdm.auto: its notebook flavour warns without ipywidgets
        )

        tqdm.write(f"--- sample @ step {run.step} ---\n{text}", file=self.file or sys.stdout)

    def on_batch_end(self, run: Run) -> None:
        self._trigger.on_batch_end(run)

    def on_epoch_end(self, run: Run) -> None:
        self._trigger.on_epoch_end(run)

    def __repr__(self) -> str:
        when = "epoch_end" if self.every is None else f"every={self.every}"
        return f"SampleText({when}, prompt={self.prompt!r}, max_new_tokens={self.max_new_tokens})"
