"""The parity zoo: each model feature a user may bring, trained beside the hand-written torch loop.

One row per feature of a module that changes how it trains: activation checkpointing, gradient
hooks, module hooks, tensors held in plain attributes, weight and spectral norm (old-style and
parametrized), pruning, quantization-aware training, lazy modules, custom autograd Functions, tied,
frozen and in-place-written weights, buffers written in forward in place or rebound (a running
statistic, the word language model's hidden state carried from batch to batch), compiled
submodules, RNNs, attention. Each row either trains bit for bit like
``torch.optim.AdamW(fused=True)`` with ``loss.backward()`` (the pure step, which must leave its
state unchanged, and the donated step; parameters and buffers; dropout drawn from the same
generator) or is refused with a functrain
error, before the first step where anything can see it coming (a forward that writes the state's
weights is seen at its first step). Sparse embeddings have rows per optimizer, against torch's SGD,
Adagrad and SparseAdam, gradient accumulation has its row as Lightning does it, and the EMA has a
row per convention (torch's `AveragedModel`, with and without ``use_buffers``, and timm's
``ModelEmaV3``), against the loop that averages so. Never silently different.

A row is a builder of the module (seeded), the batches, and what is expected. The next feature a
user brings gets a row here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations, parametrize, prune
from torch.utils.checkpoint import checkpoint

import functrain as ft
from functrain.errors import FunctrainError
from tests.comparisons import assert_trees_equal
from tests.optim import test_averaging as averaging_cases
from tests.optim import test_sparse as sparse_cases

STEPS = 3
LR = 1e-2


def classify(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def vectors(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(6, 8, generator=gen), torch.randint(0, 3, (6,), generator=gen)


def sequences(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(6, 5, 8, generator=gen), torch.randint(0, 3, (6,), generator=gen)


def token_ids(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 20, (6, 5), generator=gen), torch.randint(0, 3, (6,), generator=gen)


class Head(nn.Module):
    """``body`` then a linear head to 3 classes; the body maps ``[*, 8]`` to ``[*, 8]``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Block(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 8)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.l2(self.drop(F.gelu(self.l1(x))))


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.block = Block(0.2)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, self.inp(x), use_reentrant=self.reentrant)


def checkpointed(reentrant: bool) -> nn.Module:
    return Head(Checkpointed(reentrant))


def hf_gpt2(reentrant: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        cfg = transformers.GPT2Config(
            n_layer=2, n_head=2, n_embd=16, vocab_size=20, n_positions=8, resid_pdrop=0.1
        )
        model = transformers.GPT2LMHeadModel(cfg)
        enable = getattr(model, "activation_checkpointing_enable", None)
        kwargs = {"use_reentrant": reentrant}
        enable(kwargs) if enable is not None else model.gradient_checkpointing_enable(kwargs)
        return model

    return build


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch[0], labels=batch[0]).loss


def gradient_hooks() -> nn.Module:
    model = Head(Block())
    mask = torch.ones(16, 1)
    mask[:8] = 0
    model.body.l1.weight.register_hook(lambda g: g * mask)
    model.head.weight.register_hook(lambda g: g.clamp(-0.01, 0.01))
    return model


class Aliased(nn.Module):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.where = where
        if where == "list":
            self.ws = [self.a.weight]
        elif where == "tuple":
            self.ws = (self.a.weight,)
        else:
            self.__dict__["w"] = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w if self.where == "direct" else self.ws[0]
        return torch.tanh(x @ w.t()) + self.a(x)


def module_hooks() -> nn.Module:
    model = Head(Block())
    model.body.l1.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    model.body.l2.register_forward_hook(lambda m, args, out: out * 0.5)
    model.body.l2.register_full_backward_hook(lambda m, gin, gout: (gin[0] * 3,))
    model.head.register_full_backward_pre_hook(lambda m, gout: (gout[0].clamp(-0.05, 0.05),))
    return model


def old_weight_norm() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return Head(nn.utils.weight_norm(nn.Linear(8, 8)))


def old_spectral_norm() -> nn.Module:
    return Head(nn.utils.spectral_norm(nn.Linear(8, 8)))


def parametrized(kind: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        lin = nn.Linear(8, 8)
        if kind == "weight_norm":
            parametrizations.weight_norm(lin)
        elif kind == "spectral_norm":
            parametrizations.spectral_norm(lin)
        elif kind == "orthogonal":
            parametrizations.orthogonal(lin)
        else:
            parametrize.register_parametrization(lin, "weight", Symmetric())
        return Head(lin)

    return build


class Symmetric(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).transpose(-1, -2)


def pruned() -> nn.Module:
    model = Head(Block())
    prune.l1_unstructured(model.body.l1, "weight", amount=0.5)
    prune.random_unstructured(model.head, "weight", amount=0.3)
    return model


class Quantized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torch.ao import quantization as q

        self.quant, self.dequant = q.QuantStub(), q.DeQuantStub()
        self.l1, self.relu, self.l2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.l2(self.relu(self.l1(self.quant(x)))))


def qat() -> nn.Module:
    from torch.ao import quantization as q

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Quantized().train()
        model.qconfig = q.get_default_qat_qconfig("fbgemm")
        return q.prepare_qat(model)


def lazy_run_once() -> nn.Module:
    model = Head(nn.Sequential(nn.LazyLinear(8), nn.ReLU()))
    model(torch.zeros(1, 8))
    return model


class Scale(torch.autograd.Function):
    """A custom Function: forward doubles, backward passes the gradient times 3 (on purpose)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return x * w * 2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        return grad * w * 3, (grad * x * 2).sum(0)


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8))
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Scale.apply(self.lin(x), self.w)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight
        self.head = nn.Linear(20, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.out(torch.tanh(self.mix(self.emb(ids)))).mean(1))


class Counting(nn.Module):
    """Buffers written in forward: a step counter and a running mean of the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        with torch.no_grad():
            self.mean.mul_(0.9).add_(x.mean(0), alpha=0.1)
        return self.lin(x - self.mean)


class RunningMean(nn.Module):
    """A running statistic recomputed out of place: the buffer rebound in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("running", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.running = 0.9 * self.running + 0.1 * x.mean(0)
        return self.lin(x - self.running)


class WordLanguageModel(nn.Module):
    """The PyTorch examples' word language model (an LSTM), its hidden state kept as buffers
    and rebound in forward, detached: truncated backpropagation through time over the batches."""

    def __init__(self, shape: tuple[int, ...] = (2, 6, 8)) -> None:
        super().__init__()
        self.encoder = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 8, 2)
        self.decoder = nn.Linear(8, 20)
        self.register_buffer("h", torch.zeros(shape))
        self.register_buffer("c", torch.zeros(shape))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # an empty buffer: the hidden state starts at zeros, as the LSTM makes it without one
        hidden = (self.h, self.c) if self.h.numel() else None
        out, (h, c) = self.rnn(self.encoder(ids), hidden)
        self.h, self.c = h.detach(), c.detach()
        return self.decoder(out)


def bptt_chunks(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk of 5 time steps of 6 token streams and its next tokens (``[time, batch]``)."""
    ids = torch.randint(0, 20, (6, 6), generator=gen)
    return ids[:-1], ids[1:]


def next_token(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten())


class RebindingParameter(nn.Module):
    """A forward that rebinds a parameter (torch's optimizer would keep updating the old one)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        self.lin.weight = nn.Parameter(self.lin.weight.detach().clamp(-0.3, 0.3))
        return out


def frozen() -> nn.Module:
    model = Head(Block())
    model.body.l1.requires_grad_(False)
    return model


class MoCo(nn.Module):
    """A frozen teacher written in place in forward: an EMA of the student, as MoCo keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Linear(8, 8)
        self.teacher = nn.Linear(8, 8).requires_grad_(False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.student.parameters()):
                t.mul_(0.9).add_(s.detach(), alpha=0.1)
        return self.head(torch.cat([self.student(x), self.teacher(x)], -1))


class MoCoOwn(nn.Module):
    """MoCo's own momentum update of its key encoder (``_momentum_update_key_encoder``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder_q = nn.Linear(8, 8)
        self.encoder_k = nn.Linear(8, 8).requires_grad_(False)
        self.head = nn.Linear(16, 3)
        self.m = 0.9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)
        return self.head(torch.cat([self.encoder_q(x), self.encoder_k(x)], -1))


class BufferTeacher(nn.Module):
    """MoCo's teacher as the refusal of the row before says: buffers, written in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Linear(8, 8)
        self.register_buffer("teacher_w", self.student.weight.detach().clone())
        self.register_buffer("teacher_b", self.student.bias.detach().clone())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.teacher_w.mul_(0.9).add_(self.student.weight.detach(), alpha=0.1)
            self.teacher_b.mul_(0.9).add_(self.student.bias.detach(), alpha=0.1)
        taught = F.linear(x, self.teacher_w, self.teacher_b)
        return self.head(torch.cat([self.student(x), taught], -1))


class SelfScaling(nn.Module):
    """A forward that writes its own trainable weight in place (a max-norm constraint by hand)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.lin.weight.clamp_(-0.3, 0.3)
        return self.head(self.lin(x))


def compiled_submodule() -> nn.Module:
    model = Head(Block())
    model.body = torch.compile(model.body, backend="aot_eager")
    return model


class Recurrent(nn.Module):
    def __init__(self, cell: type) -> None:
        super().__init__()
        self.rnn = cell(8, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x + self.attn(x, x, x)[0]).mean(1))


def batch_norm() -> nn.Module:
    return Head(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()))


def post_accumulate_hook() -> nn.Module:
    model = Head(Block())
    model.head.weight.register_post_accumulate_grad_hook(lambda p: None)
    return model


def lazy_not_run() -> nn.Module:
    return Head(nn.LazyLinear(8))


class Renormed(nn.Module):
    """``nn.Embedding(max_norm=...)`` renormalizes the rows it looks up in place, in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, max_norm=1.0)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))


BITWISE = "bitwise"
# name: (build, batches, loss_fn, expected: BITWISE or the refusal's words)
# a frozen teacher written in forward: refused with the state given as it was
_BEFORE = r"writes the state's tensor '{}.weight' in forward .* before anything was written"

ROWS: dict[str, tuple[Callable[[], nn.Module], Any, Any, str]] = {
    "checkpoint-non-reentrant": (lambda: checkpointed(False), vectors, classify, BITWISE),
    "checkpoint-reentrant": (lambda: checkpointed(True), vectors, classify, BITWISE),
    "hf-gradient-checkpointing-non-reentrant": (hf_gpt2(False), token_ids, lm_loss, BITWISE),
    "hf-gradient-checkpointing-reentrant": (hf_gpt2(True), token_ids, lm_loss, BITWISE),
    "parameter-gradient-hooks": (gradient_hooks, vectors, classify, BITWISE),
    "alias-in-list": (lambda: Head(Aliased("list")), vectors, classify, BITWISE),
    "alias-in-tuple": (lambda: Head(Aliased("tuple")), vectors, classify, BITWISE),
    "alias-as-attribute": (lambda: Head(Aliased("direct")), vectors, classify, BITWISE),
    "module-forward-and-backward-hooks": (module_hooks, vectors, classify, BITWISE),
    "weight-norm-old-style": (old_weight_norm, vectors, classify, BITWISE),
    "spectral-norm-old-style": (old_spectral_norm, vectors, classify, BITWISE),
    "weight-norm-parametrized": (parametrized("weight_norm"), vectors, classify, BITWISE),
    "spectral-norm-parametrized": (parametrized("spectral_norm"), vectors, classify, BITWISE),
    "orthogonal-parametrized": (parametrized("orthogonal"), vectors, classify, BITWISE),
    "custom-parametrization": (parametrized("symmetric"), vectors, classify, BITWISE),
    "pruning": (pruned, vectors, classify, BITWISE),
    "quantization-aware-training": (qat, vectors, classify, BITWISE),
    "lazy-module-run-once": (lazy_run_once, vectors, classify, BITWISE),
    "custom-autograd-function": (lambda: Head(Custom()), vectors, classify, BITWISE),
    "tied-weights": (Tied, token_ids, classify, BITWISE),
    "buffers-written-in-forward": (lambda: Head(Counting()), vectors, classify, BITWISE),
    "frozen-parameters": (frozen, vectors, classify, BITWISE),
    "rebound-buffer": (lambda: Head(RunningMean()), vectors, classify, BITWISE),
    "hidden-state": (WordLanguageModel, bptt_chunks, next_token, BITWISE),
    "parameter-rebound-in-forward": (
        lambda: Head(RebindingParameter()),
        vectors,
        classify,
        "rebinds the parameter 'body.lin.weight'",
    ),
    # a hidden state created in the first forward: the state's buffer keeps the shape it was
    # created with (the shape every checkpoint of it has)
    "hidden-state-created-in-forward": (
        lambda: WordLanguageModel(shape=(0,)),
        bptt_chunks,
        next_token,
        r"buffer 'h' to a tensor of shape \[2, 6, 8\] .* where the buffer is \[0\]",
    ),
    # refused at its first step, whose forward wrote a copy: the state given is as it was (the
    # fix, a buffer, trains bit for bit: the row after)
    "frozen-teacher-written-in-forward": (MoCo, vectors, classify, _BEFORE.format("teacher")),
    "moco-momentum-update-by-data": (MoCoOwn, vectors, classify, _BEFORE.format("encoder_k")),
    "teacher-as-buffers-written-in-forward": (BufferTeacher, vectors, classify, BITWISE),
    # a trainable weight written in forward is refused after that forward (a frozen one before:
    # only a structure with frozen weights runs its first forward under the write guard)
    "parameter-written-in-forward": (SelfScaling, vectors, classify, "writes the state's tensor"),
    "compiled-submodule": (compiled_submodule, vectors, classify, BITWISE),
    "lstm": (lambda: Recurrent(nn.LSTM), sequences, classify, BITWISE),
    "gru": (lambda: Recurrent(nn.GRU), sequences, classify, BITWISE),
    "multihead-attention-dropout": (Attention, sequences, classify, BITWISE),
    "batch-norm": (batch_norm, vectors, classify, BITWISE),
    "post-accumulate-grad-hook": (
        post_accumulate_hook,
        vectors,
        classify,
        "register_post_accumulate_grad_hook",
    ),
    "lazy-module-not-run": (lazy_not_run, vectors, classify, "run it once on an example batch"),
    "embedding-max-norm": (Renormed, token_ids, classify, "max_norm"),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ROWS[name][0]()


def batches(name: str) -> list[Any]:
    gen = torch.Generator().manual_seed(1)
    return [ROWS[name][1](gen) for _ in range(STEPS)]


def torch_loop(name: str, rng: torch.Tensor) -> nn.Module:
    """The hand-written loop on a copy of the row's module, drawing from the state's generator."""
    model = build(name).train()
    loss_fn = ROWS[name][2]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], LR, fused=True)
    saved = torch.get_rng_state()
    torch.set_rng_state(rng)
    try:
        for batch in batches(name):
            loss_fn(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.set_rng_state(saved)
    return model


def trained(name: str, donate: bool) -> tuple[ft.TrainState, list[list[str]]]:
    """The row's functrain run, and what each pure step changed in the state it was given."""
    state = ft.TrainState.create(build(name), ft.adamw(LR), ROWS[name][2], seed=0)
    changed = []
    for batch in batches(name):
        before = None if donate else state.clone()
        given = state
        state, _ = ft.train_step(state, batch, donate=donate)
        if before is not None:
            changed.append(ft.diff_states(before, given))
    return state, changed


def module_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {k: v.detach() for k, v in named.items()}


BITWISE_ROWS = [name for name, row in ROWS.items() if row[3] == BITWISE]
REFUSED_ROWS = [name for name, row in ROWS.items() if row[3] != BITWISE]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", BITWISE_ROWS)
def test_a_feature_trains_bit_for_bit_as_under_torch_optim(name: str, donate: bool) -> None:
    state, changed = trained(name, donate)
    assert all(c == [] for c in changed), f"a pure step wrote its input state: {changed}"
    fresh = ft.TrainState.create(build(name), ft.adamw(LR), ROWS[name][2], seed=0)
    ref = module_tensors(torch_loop(name, fresh.rng))
    mine = {**state.params, **state.frozen, **state.buffers}
    assert set(mine) <= set(ref)
    assert_trees_equal({k: ref[k] for k in mine}, mine)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("name", REFUSED_ROWS)
def test_a_feature_that_cannot_train_as_under_torch_is_refused_before_a_step(name: str) -> None:
    words = ROWS[name][3]
    with pytest.raises(FunctrainError, match=words):
        state = ft.TrainState.create(build(name), ft.adamw(LR), ROWS[name][2], seed=0)
        before = state.clone()
        try:
            ft.train_step(state, batches(name)[0])
        finally:  # refused before the step wrote anything (a write in forward intercepted)
            assert ft.diff_states(before, state) == []


def test_every_row_is_checked() -> None:
    assert len(BITWISE_ROWS) + len(REFUSED_ROWS) == len(ROWS) >= 30
    unused = {name for name in ROWS if "-" not in name and name not in ("lstm", "gru", "pruning")}
    assert not unused, unused


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quantization_aware_training_resumes_exactly(tmp_path: Any) -> None:
    # the observers' buffers take their shapes in the first forward: a fresh module's template
    # holds them empty, and loading takes them as saved (as their load_state_dict does)
    state = ft.TrainState.create(build("quantization-aware-training"), ft.adamw(LR), classify)
    data = batches("quantization-aware-training")
    state, _ = ft.train_step(state, data[0])
    path = ft.save(state, tmp_path / "qat")
    like = ft.TrainState.create(build("quantization-aware-training"), ft.adamw(LR), classify)
    resumed = ft.load(path, like=like)
    assert ft.diff_states(state, resumed) == []
    for batch in data[1:]:
        state, _ = ft.train_step(state, batch)
        resumed, _ = ft.train_step(resumed, batch)
    assert_trees_equal(state.tree(), resumed.tree())


def test_eval_step_refuses_a_forward_that_writes_the_weights() -> None:
    state = ft.TrainState.create(build("parameter-written-in-forward"), ft.adamw(LR), classify)
    before = state.clone()
    with pytest.raises(FunctrainError, match="writes the state's tensor 'lin.weight'"):
        ft.eval_step(state, batches("parameter-written-in-forward")[0])
    assert ft.diff_states(before, state) == []


# the ways a forward writes a trainable weight, each intercepted at the first step
WRITES: dict[str, Callable[[torch.Tensor], Any]] = {
    "no_grad-in-place": lambda w: w.mul_(0.5),
    "through-data": lambda w: w.data.clamp_(-0.1, 0.1),
    "through-detach": lambda w: w.detach().zero_(),
    "init": lambda w: nn.init.zeros_(w),
    "out": lambda w: torch.renorm(w, 2, 0, 0.1, out=w),
}


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("how", sorted(WRITES))
def test_a_forward_writing_a_trainable_weight_is_refused_before_anything_is_written(
    how: str, donate: bool
) -> None:
    class Writing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                WRITES[how](self.lin.weight)
            return self.lin(x)

    state = ft.TrainState.create(Writing(), ft.adamw(LR), classify)
    before = state.clone()
    with pytest.raises(FunctrainError, match="writes the state's tensor 'lin.weight'"):
        ft.train_step(state, batches("parameter-written-in-forward")[0], donate=donate)
    assert ft.diff_states(before, state) == []


# sparse embeddings, per optimizer: bit for bit against torch.optim's (tests/optim/test_sparse.py
# runs them on every step kind), or refused at create
SPARSE_REFUSED = {
    "sgd-weight-decay": (lambda: ft.sgd(0.1, weight_decay=0.01), "weight_decay=0"),
    "adamw": (lambda: ft.adamw(1e-3), "cannot take the sparse gradients"),
    "adam": (lambda: ft.adam(1e-3), "cannot take the sparse gradients"),
}


# Lightning's ``Trainer(accumulate_grad_batches=3)``: a window that 1 / 3 does not divide exactly
ACCUMULATE = 3


def lightning_accumulation(model: nn.Module, batches: list[Any], rng: torch.Tensor) -> None:
    """Lightning's automatic optimization with ``accumulate_grad_batches=ACCUMULATE``: each batch's
    loss divided by it before ``backward()``, the optimizer stepped and its gradients zeroed after
    every ACCUMULATE-th batch; dropout drawn from the state's generator."""
    opt = torch.optim.AdamW(model.parameters(), LR, fused=True)
    saved = torch.get_rng_state()
    torch.set_rng_state(rng)
    try:
        for i, batch in enumerate(batches):
            (classify(model, batch) / ACCUMULATE).backward()
            if (i + 1) % ACCUMULATE == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
    finally:
        torch.set_rng_state(saved)


# the models of the accumulation row: dropout, and a reentrant checkpointed block (whose gradients
# come from a plain backward)
ACCUMULATED: dict[str, Callable[[], nn.Module]] = {
    "dropout": lambda: Head(Block(0.2)),
    "checkpoint-reentrant": lambda: checkpointed(True),
}


@pytest.mark.parametrize("model", list(ACCUMULATED))
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_gradient_accumulation_trains_bit_for_bit_as_lightning_divides_the_loss(
    donate: bool, model: str
) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return ACCUMULATED[model]()

    gen = torch.Generator().manual_seed(1)
    data = [vectors(gen) for _ in range(STEPS * ACCUMULATE)]
    state = ft.TrainState.create(
        build(), ft.adamw(LR), classify, seed=0, accumulate_steps=ACCUMULATE
    )
    rng = state.rng
    for batch in data:
        state, _ = ft.train_step(state, batch, donate=donate)
    model = build().train()
    lightning_accumulation(model, data, rng)
    assert int(state.step) == STEPS
    assert_trees_equal(module_tensors(model), {**state.params, **state.buffers})


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("name", list(sparse_cases.OPTIMIZERS))
def test_a_sparse_embedding_trains_bit_for_bit_per_optimizer(name: str) -> None:
    state = ft.TrainState.create(
        sparse_cases.model(True), sparse_cases.OPTIMIZERS[name][0](), sparse_cases.loss_fn
    )
    for batch in sparse_cases.batches():
        state, _ = ft.train_step(state, batch)
    ref = sparse_cases.params_of(sparse_cases.torch_run(name, True))
    assert_trees_equal(ref, dict(state.params))


@pytest.mark.parametrize("name", list(SPARSE_REFUSED))
def test_a_sparse_embedding_is_refused_by_the_optimizers_torch_has_no_sparse_path_in(
    name: str,
) -> None:
    optimizer, words = SPARSE_REFUSED[name]
    with pytest.raises(FunctrainError, match=words):
        ft.TrainState.create(sparse_cases.model(), optimizer(), sparse_cases.loss_fn)


# the EMA as the loops users copy average it (tests/optim/test_averaging.py runs each convention on
# every kind of step with a checkpoint round trip): one row per convention on the BatchNorm row's
# model, the averaged module (buffers included) against the reference's, pure and donated
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", list(averaging_cases.CONVENTIONS))
def test_an_ema_convention_averages_bit_for_bit_as_its_loop(name: str, donate: bool) -> None:
    options, make_averager, takes_step = averaging_cases.CONVENTIONS[name]
    decay = averaging_cases.decay_of(name)
    model = build("batch-norm").train()
    opt = torch.optim.AdamW(model.parameters(), LR, fused=True)
    averager = make_averager(model)
    state = ft.TrainState.create(
        build("batch-norm"), ft.adamw(LR), classify, seed=0, ema_decay=decay, **options
    )
    for step, batch in enumerate(batches("batch-norm"), start=1):
        classify(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if takes_step:
            averager.update(model, step=step)
        else:
            averager.update_parameters(model)
        state, _ = ft.train_step(state, batch, donate=donate)
    averaged = module_tensors(averager.module)
    exported = state.export_module(use_ema=True)
    assert exported is not None
    assert_trees_equal(averaged, module_tensors(exported))
