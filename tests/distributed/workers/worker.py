"""Run by tests/distributed/test_distributed.py under `torch.distributed.run`: one scenario, or
several in turn, per launch.

Usage: python -m torch.distributed.run --nproc_per_node=N worker.py SCENARIO OUT_DIR [ARGS...]
Each rank writes its results with functrain.save (no pickle) under OUT_DIR/rank<r>. Several
scenarios, ``SCENARIO[:ARG...]+SCENARIO[:ARG...]...``, run one after another on the same ranks (a
launch costs seconds of process start), each writing under OUT_DIR/SCENARIO/rank<r>.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import TensorDataset

import functrain as ft
from functrain.core.gradient import SITTING
from tests.models import cross_entropy_loss_fn as loss_fn

torch.set_num_threads(1)


def mlp(seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))


def batches(n: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [
        (torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g))
        for _ in range(n)
    ]


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(96, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def shard(batch, rank: int, world: int):
    n = batch[0].shape[0] // world
    return tuple(t[rank * n : (rank + 1) * n] for t in batch)


def rank_batches(rank: int, world: int, n: int = 20):
    """This rank's part of `batches(n)`, the last rank's first sample NaN at step 5 (one rank
    only)."""
    for i, b in enumerate(batches(n)):
        x, y = shard(b, rank, world)
        if i == 5 and rank == world - 1:
            x = x.clone()
            x[0, 0] = float("nan")
        yield x, y


class RankStream:
    """Rank `rank`'s own stream: batches of 4 samples of its half of `dataset()`, 6 a pass; every
    batch read is recorded in `reads` by its start. Its state names the rank, so a state loaded
    on another rank fails."""

    def __init__(self, rank: int, reads: list[int]) -> None:
        self.rank, self.reads, self.next = rank, reads, 0
        x, y = dataset().tensors
        self.x, self.y = x[rank * 48 : (rank + 1) * 48], y[rank * 48 : (rank + 1) * 48]

    def __iter__(self):
        while self.next < 24:
            i = self.next
            self.next += 4
            self.reads.append(i)
            yield self.x[i : i + 4], self.y[i : i + 4]
        self.next = 0

    def state_dict(self):
        return {"rank": self.rank, "next": self.next}

    def load_state_dict(self, state):
        assert state["rank"] == self.rank, (
            f"rank {self.rank} given rank {state['rank']}'s data state"
        )
        self.next = state["next"]


def stream_fit(rank: int, directory: Path, max_steps: int, reads: list[int], resume: bool = False):
    state = ft.TrainState.create(mlp(), ft.adamw(1e-2), loss_fn)
    return ft.fit(
        state,
        RankStream(rank, reads),
        max_steps=max_steps,
        checkpoint_dir=directory,
        save_every=3,
        resume=resume,
        progress=False,
        verbosity="silent",
    )


class Noisy(torch.utils.data.Dataset):
    """`dataset()`'s rows, each read with noise from torch's global generator; reads recorded by
    index."""

    def __init__(self, reads: list[int]) -> None:
        self.x, self.y = dataset().tensors
        self.reads = reads

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.reads.append(i)
        return self.x[i] + 0.1 * torch.randn(self.x.shape[1]), self.y[i]


def loader_fit(
    rank: int, world: int, directory: Path, max_steps: int, reads: list[int], resume: bool = False
):
    """A DataLoader with a DistributedSampler per rank (48 of the 96 rows each, 6 batches of 8)."""
    data = Noisy(reads)
    sampler = torch.utils.data.DistributedSampler(
        data, num_replicas=world, rank=rank, shuffle=True, seed=3
    )
    state = ft.TrainState.create(mlp(), ft.adamw(1e-2), loss_fn)
    return ft.fit(
        state,
        torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler),
        max_steps=max_steps,
        checkpoint_dir=directory,
        save_every=3,
        resume=resume,
        progress=False,
        verbosity="silent",
    )


class Augmented(torch.utils.data.Dataset):
    """`dataset()`'s rows, each read with noise from torch's, Python's and numpy's generators;
    every read recorded as ``[index, torch's draw, random's, numpy's]``."""

    def __init__(self) -> None:
        self.x, self.y = dataset().tensors
        self.reads: list[list[float]] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        import random

        import numpy as np

        draws = [torch.rand(()).item(), random.random(), float(np.random.rand())]
        self.reads.append([float(i), *draws])
        return self.x[i] + 0.1 * sum(draws), self.y[i]


def augmented_fit(
    checkpoints: Path, stop_at: int, resume: bool, loader: bool = False
) -> torch.Tensor:
    """`fit` over `Augmented` in global batches of 16 (with `loader`, a `DataLoader` of 8 a rank
    over a `DistributedSampler`), two epochs, stopped after `stop_at` batches (0: not stopped);
    this rank's reads."""

    class Stop(ft.Callback):
        def on_batch_end(self, run):
            if run.batches == stop_at:
                run.request_stop("interrupted")

    data = Augmented()
    if loader:
        rank, world = ft.distributed.rank_and_world()
        split = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, seed=5)
        given: Any = {"train_data": torch.utils.data.DataLoader(data, batch_size=8, sampler=split)}
    else:
        given = {"train_data": data, "batch_size": 16}
    ft.fit(
        ft.TrainState.create(mlp(), ft.adamw(1e-2), loss_fn),
        **given,
        max_epochs=2,
        checkpoint_dir=checkpoints,
        save_every=4,
        callbacks=[Stop()] if stop_at else [],
        resume=resume,
        progress=False,
        verbosity="silent",
    )
    return torch.tensor(data.reads, dtype=torch.float64).reshape(-1, 4)


MODES = (None, "optimizer", "full")


class Features(nn.Module):
    """BatchNorm, dropout, a frozen bias, tied weights, a 0-d parameter and a row count no world
    size divides."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(
            6, 15, bias=False
        )  # a bias before BatchNorm has a zero gradient: Adam would amplify its rounding
        self.bn = nn.BatchNorm1d(15)
        self.drop = nn.Dropout(0.2)
        self.a = nn.Linear(15, 15)
        self.b = nn.Linear(15, 15)
        self.b.weight = self.a.weight  # tied
        self.a.bias.requires_grad_(False)  # frozen
        self.out = nn.Linear(15, 3)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.inp(x))))
        return self.out(torch.relu(self.b(torch.relu(self.a(h))))) / self.temperature


def gathered_tree(state) -> dict:
    """What a sharded state holds, gathered whole on every rank (plain tensors, comparable across
    modes)."""
    module = state.export_module()
    out = {f"params/{k}": v.detach().clone() for k, v in module.state_dict().items()}
    if state.ema_state is not None:
        out |= {
            f"ema/{k}": v.detach().clone()
            for k, v in state.export_module(use_ema=True).state_dict().items()
        }
    return out


def sharded_runs(rank: int, world: int) -> dict:
    """Each mode x optimizer for 20 steps on this rank's part of the batches, a NaN on the last rank
    at step 5."""
    out = {}
    for mode in MODES:
        for name, opt in (("adamw", ft.adamw(1e-2)), ("sgd", ft.sgd(0.05, momentum=0.9))):
            state = ft.TrainState.create(mlp(seed=rank), opt, loss_fn, sharding=mode)
            skipped = []
            for batch in rank_batches(rank, world):
                state, m = ft.train_step(state, batch, donate=mode is not None)
                skipped.append(m["skipped"])
            out[f"{name}/{mode}"] = {"tree": gathered_tree(state), "skipped": torch.stack(skipped)}
    return out


def feature_runs(rank: int, world: int) -> dict:
    """Accumulation, clipping, EMA, bf16, fp16 on the Features model in each mode, plus
    eval_step."""
    cases = {
        "accumulate-clip-ema": dict(accumulate_steps=2, clip_grad_norm=0.05, ema_decay=0.9),
        "bf16": dict(precision="bf16", clip_grad_norm=1.0),
        "fp16": dict(precision="fp16", ema_decay=0.8),
        # clipping a float64 model: its norm in float64, as clip_grad_norm_ takes it
        "float64-clip": dict(clip_grad_norm=0.05),
    }
    out = {}
    for case, options in cases.items():
        dtype = torch.float64 if case.startswith("float64") else torch.float32
        for mode in MODES:
            # SGD in half precision: Adam's normalization would blow rounding differences of
            # near-zero gradients up to lr (and would hide the clipping's scale in float64)
            optimizer = (
                ft.adamw(1e-2)
                if "precision" not in options and dtype == torch.float32
                else ft.sgd(0.05, momentum=0.9)
            )
            state = ft.TrainState.create(
                Features().to(dtype), optimizer, loss_fn, sharding=mode, seed=5, **options
            )
            for x, y in batches(6):
                state, _ = ft.train_step(state, shard((x.to(dtype), y), rank, world))
            x, y = batches(1)[0]
            evaluated = ft.eval_step(state, (x.to(dtype), y), use_ema=state.ema_state is not None)
            out[f"{case}/{mode}"] = {
                "tree": gathered_tree(state)
                | {"buffers/" + k: v for k, v in state.buffers.items()},
                "eval": evaluated["loss"],
            }
    return out


class Deep(nn.Module):
    """A projection used through a transposed view, then four equal layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Parameter(torch.randn(16, 6) / 4)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        h = x @ self.proj.T
        for layer in self.layers:
            h = torch.relu(layer(h))
        return h[:, :3]


def per_use_runs(rank: int, world: int) -> dict:
    """ "full" gathers each weight where it is used: how many are whole after the forward, the
    gathers of a step, the results."""
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.multiprocessing.reductions import StorageWeakRef

    from functrain.distributed import sharding

    gathered, alive = [], []
    real = sharding.for_compute

    def recording(t):  # the memory of every weight gathered whole, watched without holding it
        whole = real(t)
        if whole.shape == (16, 16):
            gathered.append(StorageWeakRef(whole.untyped_storage()))
        return whole

    def counting_loss(model, batch):
        gathered.clear()
        loss = loss_fn(model, batch)
        alive.append(
            sum(not ref.expired() for ref in gathered)
        )  # whole weights still in memory after the forward
        return loss

    sharding.for_compute = recording
    out = {}
    for mode in (None, "full", "full-kept"):
        state = ft.TrainState.create(
            Deep(),
            ft.adamw(1e-2),
            counting_loss,
            sharding=mode and "full",
            reshard_after_forward=mode != "full-kept",
        )
        for b in batches(5):
            with CommDebugMode() as comm:
                state, _ = ft.train_step(state, shard(b, rank, world))
        out[f"per_use/{mode}/alive"] = torch.tensor(alive[-1])  # of the last step's forward
        out[f"per_use/{mode}"] = {
            "tree": gathered_tree(state),
            "eval": ft.eval_step(state, batches(1)[0])["loss"],
        }
        counts = {str(k).rsplit(".", 1)[-1]: v for k, v in comm.get_comm_counts().items()}
        out[f"per_use/{mode}/gathers"] = torch.tensor(counts.get("all_gather_into_tensor", 0))
    sharding.for_compute = real
    return out


def state_tree(state) -> list[torch.Tensor]:
    """Every tensor a state holds, sharded leaves gathered whole (a collective)."""
    parts = (state.params, state.buffers, state.opt_state, state.ema_state, state.rng, state.step)
    return [
        t
        for t in torch.utils._pytree.tree_leaves([ft.distributed.gather_tree(x) for x in parts])
        if isinstance(t, torch.Tensor)
    ]


def compiled_runs(rank: int, world: int) -> dict:
    """compile_step on sharded states (aot_eager): the runs of `sharded_runs` (adamw) and of
    `feature_runs` ("accumulate-clip-ema", and "fp16" fully sharded), the first call pure (checked),
    the rest donated."""
    out = {}
    for mode in ("optimizer", "full"):
        step = ft.compile_step(backend="aot_eager")
        state = ft.TrainState.create(mlp(seed=rank), ft.adamw(1e-2), loss_fn, sharding=mode)
        before, rng = state_tree(state), torch.get_rng_state()
        skipped = []
        for i, batch in enumerate(rank_batches(rank, world)):
            given = state
            state, m = step(given, batch, donate=i > 0)
            if i == 0:  # pure: the state it was given and the caller's RNG are left as they were
                same = all(
                    torch.equal(a, b) for a, b in zip(before, state_tree(given), strict=True)
                )
                out[f"compiled-pure/{mode}"] = torch.tensor(
                    same and torch.equal(rng, torch.get_rng_state())
                )
            skipped.append(m["skipped"])
        try:  # the last state given up
            step(given, batch)
            out[f"compiled-donated/{mode}"] = "no error"
        except ft.DonatedStateError as e:
            out[f"compiled-donated/{mode}"] = str(e)
        out[f"compiled-adamw/{mode}"] = {
            "tree": gathered_tree(state),
            "skipped": torch.stack(skipped),
        }
        options = dict(accumulate_steps=2, clip_grad_norm=0.05, ema_decay=0.9)
        state = ft.TrainState.create(
            Features(), ft.adamw(1e-2), loss_fn, sharding=mode, seed=5, **options
        )
        for b in batches(6):
            state, _ = step(state, shard(b, rank, world), donate=True)
        out[f"compiled-features/{mode}"] = {
            "tree": gathered_tree(state) | {"buffers/" + k: v for k, v in state.buffers.items()}
        }
    # fp16 under autocast, its loss scale and a sharded EMA: feature_runs' "fp16" case, "full"
    state = ft.TrainState.create(
        Features(),
        ft.sgd(0.05, momentum=0.9),
        loss_fn,
        sharding="full",
        seed=5,
        precision="fp16",
        ema_decay=0.8,
    )
    for b in batches(6):
        state, _ = step(state, shard(b, rank, world), donate=True)
    out["compiled-fp16/full"] = {
        "tree": gathered_tree(state) | {"buffers/" + k: v for k, v in state.buffers.items()}
    }
    from torch._dynamo.utils import counters

    # one graph per model and mode (the loss, its backward through AOTAutograd), none broken
    out["compiled-graphs"] = torch.tensor(
        [counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())]
    )
    return out


def sharded_extras(out: Path, rank: int, world: int) -> None:
    """fit, generate, export on rank 0 alone, and the error of what sharding refuses."""
    results, errors = {}, {}
    for mode in MODES:
        state = ft.TrainState.create(mlp(), ft.adamw(1e-2), loss_fn, sharding=mode, ema_decay=0.9)
        result = ft.fit(
            state,
            dataset(),
            eval_data=dataset(),
            batch_size=16,
            max_epochs=1,
            log_every=2,
            progress=False,
            verbosity="silent",
        )
        results[f"fit/{mode}"] = {
            "tree": gathered_tree(result.state),
            "val": torch.tensor(result.history.column("val_loss")),
        }
        lm = ft.TrainState.create(
            nn.Sequential(nn.Embedding(5, 8), nn.Linear(8, 5)),
            ft.sgd(0.1),
            lambda m, b: m(b).mean(),
            sharding=mode,
        )
        lm, _ = ft.train_step(lm, torch.tensor([[1, 2, 3]]))
        results[f"generate/{mode}"] = ft.generate(
            lm, [1, 2], 6, seed=rank
        )  # the same seed on every rank in the test's eyes: compared per rank
        before = [
            ft.distributed.gather_tree(x) for x in (state.params, state.opt_state, state.ema_state)
        ]
        ft.train_step(
            state, shard(batches(1)[0], rank, world)
        )  # pure: the state it was given is left as it was
        after = [
            ft.distributed.gather_tree(x) for x in (state.params, state.opt_state, state.ema_state)
        ]
        results[f"pure/{mode}"] = torch.tensor(
            all(
                torch.equal(a, b)
                for a, b in zip(
                    torch.utils._pytree.tree_leaves(before),
                    torch.utils._pytree.tree_leaves(after),
                    strict=True,
                )
            )
        )
        stats = ft.TrainState.create(
            Features(), ft.adamw(1e-2), loss_fn, sharding=mode, grad_stats="layer", grad_norm=True
        )
        stats, m = ft.train_step(stats, shard(batches(1)[0], rank, world))
        results[f"grad_stats/{mode}"] = {k: v for k, v in m.items() if "/" in k or k == "grad_norm"}
        only = state.export_module(rank0_only=True)
        results[f"rank0_only/{mode}"] = torch.tensor(
            only is None if rank else isinstance(only, nn.Module)
        )
    for name, attempt in {
        "muon": lambda: ft.TrainState.create(
            mlp(), ft.muon(0.02, others=ft.adamw(1e-3)), loss_fn, sharding="optimizer"
        ),
    }.items():
        try:
            attempt()
            errors[name] = "no error"
        except ft.ConfigError as e:
            errors[name] = str(e)
    mine = out / f"rank{rank}"
    ft.save(results, mine)
    for name, text in errors.items():
        (mine / f"{name}.txt").write_text(text)


class TiedNet(nn.Module):
    """Built on the meta device by the "meta" scenario: a tied weight, BatchNorm buffers, a frozen
    bias, 15 rows (uneven on 2 ranks)."""

    def __init__(self, width: int = 15) -> None:
        super().__init__()
        self.inp = nn.Linear(6, width)
        self.inp.bias.requires_grad_(False)  # frozen
        self.bn = nn.BatchNorm1d(width)
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.b.weight = self.a.weight  # tied after construction, as models tie an output embedding
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(torch.relu(self.bn(self.inp(x))))))))


class WholeCounter:
    """An `init` that records the most whole weights alive at once while submodules are initialized.

    At each submodule it finds every live tensor (the garbage collector tracks them all) that is
    not a meta or sharded one and has the shape of one of `shapes` (the 2-D trainable weights of
    the model) or a storage of one's bytes (a view that keeps a whole alive), and counts their
    storages, those alive before the counter was made left out.
    """

    def __init__(self, shapes: set[tuple[int, ...]]) -> None:
        self.shapes, self.most = shapes, 0
        self.sizes = {4 * torch.Size(s).numel() for s in shapes}
        self.before = self.wholes()

    def wholes(self) -> set[int]:
        import gc

        return {
            t.untyped_storage().data_ptr()
            for t in gc.get_objects()
            if isinstance(t, torch.Tensor)
            and not t.is_meta
            and not ft.distributed.is_sharded(t)
            and (tuple(t.shape) in self.shapes or t.untyped_storage().nbytes() in self.sizes)
        }

    def __call__(self, module: nn.Module) -> None:
        self.most = max(self.most, len(self.wholes() - self.before))
        module.reset_parameters()


class Checkpointed(nn.Module):
    """An MLP whose middle layer runs under activation checkpointing (`reentrant` None: without)."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.reentrant = reentrant

    def middle(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.b(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.reentrant is None:
            return self.c(self.middle(h))
        return self.c(checkpoint(self.middle, h, use_reentrant=self.reentrant))


def checkpointing_runs(rank: int, world: int) -> dict:
    """Activation checkpointing (both forms) in each mode beside the same run without it; a state
    sharded with sharding="full" refuses it (1 where its ConfigError names the way out)."""
    out = {}
    for mode in MODES:
        for reentrant in (False, True):
            states = {
                way: ft.TrainState.create(Checkpointed(way), ft.adamw(1e-2), loss_fn, sharding=mode)
                for way in (reentrant, None)
            }
            try:
                for batch in rank_batches(rank, world, n=4):
                    states = {way: ft.train_step(s, batch)[0] for way, s in states.items()}
            except ft.ConfigError as e:
                refused = mode == "full" and "sharding='optimizer'" in str(e)
                out[f"checkpointing/{mode}/{reentrant}/refused"] = torch.tensor(int(refused))
                continue
            for way, s in states.items():
                out[f"checkpointing/{mode}/{reentrant}/{way}"] = gathered_tree(s)
    return out


def meta_runs(rank: int, world: int) -> dict:
    """TiedNet built on the meta device, sharded "full" and "optimizer", against the same net built
    normally."""
    out = {}
    for mode in ("full", "optimizer"):
        with torch.device("meta"):
            meta = TiedNet()
        counter = WholeCounter({tuple(p.shape) for p in meta.parameters() if p.ndim == 2})
        state = ft.TrainState.create(
            meta, ft.adamw(1e-2), loss_fn, sharding=mode, seed=11, init=counter
        )
        torch.manual_seed(11)
        normal = ft.TrainState.create(TiedNet(), ft.adamw(1e-2), loss_fn, sharding=mode, seed=11)
        out[f"{mode}/initial"] = gathered_tree(state) | {
            "buffers/" + k: v for k, v in state.buffers.items()
        }
        exp_avg = [
            x
            for x in torch.utils._pytree.tree_leaves(state.opt_state)
            if isinstance(x, torch.Tensor) and x.ndim == 2
        ]
        out[f"{mode}/opt_rows"] = torch.tensor(
            [[ft.distributed.sharding.local(x).shape[0], x.shape[0]] for x in exp_avg]
        )
        out[f"{mode}/whole"] = torch.tensor(counter.most)
        for b in batches(5):
            state, _ = ft.train_step(state, shard(b, rank, world))
            normal, _ = ft.train_step(normal, shard(b, rank, world))
        out[f"{mode}/trained"] = gathered_tree(state)
        out[f"{mode}/normal"] = gathered_tree(normal)
    with torch.device("meta"):
        other = TiedNet(width=15 + rank)
    try:
        ft.TrainState.create(other, ft.adamw(1e-2), loss_fn, sharding="full")
        out["mismatch"] = "created"
    except ft.ConfigError as e:
        out["mismatch"] = str(e)
    return out


# the configurations `torch_ddp_runs` trains, each with the torch.optim loop it matches bit for bit:
# name -> (functrain's optimizer and options, torch's optimizer of a module's parameters, the
# torch loop's gradient clipping)
DDP_CONFIGS = {
    "adamw": (lambda: ft.adamw(1e-2), {}, lambda ps: torch.optim.AdamW(ps, 1e-2, fused=True), None),
    "clip": (
        lambda: ft.sgd(0.05, momentum=0.9),
        {"clip_grad_norm": 0.5},
        lambda ps: torch.optim.SGD(ps, 0.05, momentum=0.9, fused=True),
        0.5,
    ),
    "rmsprop": (
        lambda: ft.rmsprop(1e-2),
        {},
        lambda ps: torch.optim.RMSprop(ps, 1e-2, foreach=False),
        None,
    ),
}


def torch_ddp_runs(rank: int, world: int) -> dict:
    """Each of `DDP_CONFIGS` for 8 steps on this rank's part of the batches, donated and pure,
    beside torch's DistributedDataParallel training the same model on the same parts: the weights
    after each step, both sides', and whether the eager step ran its straight line."""
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for name, (tx, options, torch_opt, clip) in DDP_CONFIGS.items():
        for donate in (False, True):
            state = ft.TrainState.create(mlp(), tx(), loss_fn, **options)
            reference = DistributedDataParallel(mlp())
            opt = torch_opt(reference.parameters())
            for i, batch in enumerate(rank_batches(rank, world, 8)):
                state, metrics = ft.train_step(state, batch, donate=donate)
                loss_fn(reference, batch).backward()
                grads = [p.grad for p in reference.parameters()]
                if all(bool(g.isfinite().all()) for g in grads):  # (the NaN step: skipped)
                    if clip is not None:
                        torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
                    opt.step()
                opt.zero_grad(set_to_none=True)
                key = f"{name}/{'donated' if donate else 'pure'}/{i}"
                for k, p in reference.module.named_parameters():
                    out[f"{key}/ours/{k}"] = state.params[k].clone()
                    out[f"{key}/torch/{k}"] = p.detach().clone()
            straight = state.program is not None and state.program.straight is not None
            out[f"{name}/{'donated' if donate else 'pure'}/straight"] = torch.tensor(straight)
            out[f"{name}/{'donated' if donate else 'pure'}/counters"] = torch.stack(
                [state.step, state.epoch_step, state.samples_seen, state.skipped]
            )
            # what the loss metric holds: itself alone, not the bucket it was averaged in
            loss_bytes = metrics["loss"].untyped_storage().nbytes()
            out[f"{name}/{'donated' if donate else 'pure'}/loss_bytes"] = torch.tensor(loss_bytes)
    return out


class Experts(nn.Module):
    """A trunk every batch uses and four experts, each batch routed to some of them (none
    included): an expert no token of a rank's batch reached gets no gradient on that rank."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 3)
        self.experts = nn.ModuleList(nn.Linear(6, 3) for _ in range(4))

    def forward(self, x: torch.Tensor, used: tuple[int, ...]) -> torch.Tensor:
        out = self.trunk(x)
        for e in used:
            out = out + self.experts[e](x)
        return out


def experts_loss(model: Any, batch: Any) -> torch.Tensor:
    x, y, used = batch
    return nn.functional.cross_entropy(model(x, used), y)


def make_experts() -> Experts:
    torch.manual_seed(0)
    return Experts()


# the experts each rank's batch reaches, step by step: at first rank 0 reaches every one and rank
# 1 some (those take the mean with rank 1's zeros), then none reaches experts 1 to 3, then one
# rank alone reaches some, then no expert at all
ROUTES = (
    ((0, 1, 2, 3), (0,)),
    ((0, 1, 2, 3), (1, 3)),
    ((0,), (0,)),
    ((2,), ()),
    ((), ()),
    ((1,), (1, 2)),
    ((0, 1, 2, 3), (0,)),
    ((3,), (3,)),
)

# the optimizers `unused_runs` trains with, each with the torch.optim one it matches bit for bit
UNUSED_CONFIGS = {
    "adamw": (lambda: ft.adamw(1e-2), lambda ps: torch.optim.AdamW(ps, 1e-2, fused=True)),
    "sgd": (
        lambda: ft.sgd(0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
        lambda ps: torch.optim.SGD(ps, 0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    ),
}


def experts_batches(rank: int, start: int) -> list[tuple[torch.Tensor, torch.Tensor, tuple]]:
    """This rank's batches of `ROUTES` from step `start` on (from 2: experts 1 to 3 unused on
    every rank in the first step, before torch holds any state for them)."""
    g = torch.Generator().manual_seed(50 + rank)
    return [
        (torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g), route[rank])
        for route in ROUTES[start:]
    ]


def unused_runs(rank: int, out: Path) -> dict:
    """Each of `UNUSED_CONFIGS` on `experts_batches` (from steps 0 and 2), donated and pure, and
    resumed from a checkpoint after its third step, beside torch's DistributedDataParallel
    (``find_unused_parameters=True``) training the same model with the torch.optim optimizer: the
    weights after each step, both sides', and the optimizer state at the end."""
    from torch.nn.parallel import DistributedDataParallel

    import functrain.core.program as program

    handed = []  # the straight line's steps handed to the body (a rank lacked a gradient)
    given = program.handed_on

    def counted(*args: Any) -> Any:
        handed.append(1)
        return given(*args)

    program.handed_on = counted  # (this scenario's process ends after it)
    result: dict[str, Any] = {}
    for name, (tx, torch_opt) in UNUSED_CONFIGS.items():
        for start in (0, 2):
            data = experts_batches(rank, start)
            reference = DistributedDataParallel(make_experts(), find_unused_parameters=True)
            opt = torch_opt(reference.parameters())
            theirs = []
            for batch in data:
                opt.zero_grad()  # set_to_none=True: an expert no rank reached has no .grad
                experts_loss(reference, batch).backward()
                opt.step()
                theirs.append(
                    {k: p.detach().clone() for k, p in reference.module.named_parameters()}
                )
            for kind in ("pure", "donated", "resumed"):
                key = f"{name}/{start}/{kind}"
                state = ft.TrainState.create(make_experts(), tx(), experts_loss)
                for i, batch in enumerate(data):
                    if kind == "resumed" and i == 3:
                        path = out / f"ckpt{rank}" / key.replace("/", "-")
                        ft.save(state, path)
                        template = ft.TrainState.create(make_experts(), tx(), experts_loss)
                        state = ft.load(path, template)
                    handed.clear()
                    state, _ = ft.train_step(state, batch, donate=kind != "pure")
                    result[f"{key}/{i}/handed"] = torch.tensor(len(handed))
                    # whether this rank's steps are the body's from now on (a weight sat out)
                    result[f"{key}/{i}/body"] = torch.tensor(SITTING in state.module.__dict__)
                    for k, p in theirs[i].items():
                        result[f"{key}/{i}/ours/{k}"] = state.params[k].clone()
                        result[f"{key}/{i}/torch/{k}"] = p
                result[f"{key}/opt_state"] = [
                    t.clone() if isinstance(t, torch.Tensor) else torch.tensor(t)
                    for t in torch.utils._pytree.tree_leaves(state.opt_state)
                ]
    return result


def declared_samples_runs(rank: int) -> dict:
    """Detection batches (`tests.models.detection_batches`, this rank's own) counted by their
    images (``samples=``): each engine's ``samples_seen``, and an evaluation over this rank's
    batches with each batch's loss and images, for the means over both ranks."""
    from tests.models import detection_batches, detection_loss

    batches = detection_batches([2, 5, 3], seed=rank)
    out: dict[str, Any] = {}
    for name, options, donate in (
        ("straight", {}, False),
        ("donated", {}, True),
        ("body", {"grad_stats": "layer"}, False),
    ):
        torch.manual_seed(0)
        state = ft.TrainState.create(
            nn.Linear(3, 2), ft.sgd(0.1), detection_loss, samples=lambda b: len(b[0]), **options
        )
        for batch in batches:
            state, _ = ft.train_step(state, batch, donate=donate)
        out[f"seen/{name}"] = state.samples_seen
    evals = detection_batches([1, 4], seed=10 + rank)
    out["val_loss"] = torch.tensor(ft.evaluate(state, evals)["val_loss"], dtype=torch.float64)
    model = state.export_module().eval()
    with torch.no_grad():
        out["losses"] = torch.stack([detection_loss(model, b).double() for b in evals])
    out["images"] = torch.tensor([len(b[0]) for b in evals])
    return out


def main() -> None:
    ft.distributed.init_from_env()
    rank, world = ft.distributed.rank_and_world()
    specs, out = sys.argv[1].split("+"), Path(sys.argv[2])
    if len(specs) == 1:
        whole = run(specs[0], out, sys.argv[3:], rank, world)
    else:  # several scenarios in turn on the same ranks, each in its own directory
        for spec in specs:
            scenario, *args = spec.split(":")
            whole = run(scenario, out / scenario, args, rank, world)
    if whole and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run(scenario: str, out: Path, args: list[str], rank: int, world: int) -> bool:
    """One scenario on this rank, its results under `out`; whether the group is still whole."""
    mine = out / f"rank{rank}"
    if scenario == "steps":
        # rank 1 starts from other weights: create() must broadcast rank 0's
        state = ft.TrainState.create(mlp(seed=rank), ft.adamw(1e-2), loss_fn)
        metrics = []
        for batch in rank_batches(rank, world):
            state, m = ft.train_step(state, batch)
            metrics.append(m)
        ft.save({"params": state.params, "metrics": metrics}, mine)
    elif scenario == "fit":
        stop_at = int(args[0])

        class Stop(ft.Callback):
            def on_batch_end(self, run):
                if stop_at and run.batches == stop_at:
                    run.request_stop("interrupted")

        state = ft.TrainState.create(mlp(), ft.adamw(1e-2), loss_fn)
        result = ft.fit(
            state,
            dataset(),
            eval_data=dataset(),
            batch_size=16,
            max_epochs=3,
            log_every=2,
            checkpoint_dir=out / "ckpt",
            save_every=4,
            log_file=out / "log.jsonl",
            callbacks=[Stop()],
            resume=bool(int(args[1])),
            progress=False,
            verbosity="silent",
        )
        ft.save(
            {"params": result.state.params, "val": torch.tensor(result.history.column("val_loss"))},
            mine,
        )
    elif scenario in ("augmented", "augmented-loader"):
        # usage: augmented[-loader] OUT_DIR STOP_AT RESUME CHECKPOINT_DIR
        stop_at, resume, checkpoints = int(args[0]), bool(int(args[1])), Path(args[2])
        reads = augmented_fit(checkpoints, stop_at, resume, loader=scenario == "augmented-loader")
        ft.save({"reads": reads}, mine)
    elif scenario == "stream":
        # each rank streams its own half; stopped after 4 updates, then resumed in this process
        straight = stream_fit(rank, out / "straight", 10, [])
        stream_fit(rank, out / "ckpt", 4, [])
        reads: list[int] = []
        resumed = stream_fit(rank, out / "ckpt", 10, reads, resume=True)
        saved = resumed.state.driver["source"]["ranks"]
        ft.save(
            {
                "straight": straight.state.params,
                "resumed": resumed.state.params,
                "reads": reads,
                "saved": saved,
            },
            mine,
        )
    elif scenario == "loader":
        # each rank loads its DistributedSampler's part with noise; stopped after 9 updates, then
        # resumed
        straight = loader_fit(rank, world, out / "straight", 14, [])
        loader_fit(rank, world, out / "ckpt", 9, [])
        reads: list[int] = []
        resumed = loader_fit(rank, world, out / "ckpt", 14, reads, resume=True)
        saved = resumed.state.driver["source"]["ranks"]
        ft.save(
            {
                "straight": straight.state.params,
                "resumed": resumed.state.params,
                "reads": len(reads),
                "saved": saved,
            },
            mine,
        )
    elif scenario == "sharded":
        # one launch for everything (a process start costs seconds): the rest on 2 ranks only
        ft.save(
            {
                **sharded_runs(rank, world),
                **(
                    feature_runs(rank, world)
                    | per_use_runs(rank, world)
                    | compiled_runs(rank, world)
                    | checkpointing_runs(rank, world)
                    if world == 2
                    else {}
                ),
            },
            mine,
        )
        if world == 2:
            sharded_extras(out / "extras", rank, world)
    elif scenario == "samples":
        ft.save(declared_samples_runs(rank), mine)
    elif scenario == "torch_ddp":
        ft.save(torch_ddp_runs(rank, world), mine)
    elif scenario == "unused":
        ft.save(unused_runs(rank, out), mine)
    elif scenario == "meta":
        ft.save(meta_runs(rank, world), mine)
    elif scenario == "mismatch":
        try:
            ft.TrainState.create(mlp(width=16 + rank), ft.adamw(1e-2), loss_fn)
        except ft.ConfigError as e:
            mine.mkdir(parents=True)
            (mine / "error.txt").write_text(str(e))
        try:  # a DDP habit: a seed per rank (a checkpoint would hold rank 0's stream alone)
            ft.TrainState.create(mlp(), ft.adamw(1e-2), loss_fn, seed=rank)
        except ft.ConfigError as e:
            (mine / "seed.txt").write_text(str(e))
        # each rank freezes another layer of the same shapes: the same tensors, trained apart
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        model[2 if rank == 0 else 0].requires_grad_(False)
        try:
            ft.TrainState.create(model, ft.sgd(0.1), loss_fn)
        except ft.ConfigError as e:
            (mine / "frozen.txt").write_text(str(e))
    elif scenario == "peer_fails":
        # rank 1's loss raises on its third batch, after which its process ends
        calls = []

        def failing(model, batch):
            calls.append(1)
            if rank == 1 and len(calls) == 3:
                raise ValueError("a bad batch on rank 1")
            return loss_fn(model, batch)

        state = ft.TrainState.create(mlp(), ft.adamw(1e-2), failing)
        try:
            ft.fit(
                state, dataset(), batch_size=16, max_epochs=2, progress=False, verbosity="silent"
            )
        except Exception as e:
            mine.mkdir(parents=True)
            (mine / "error.txt").write_text(f"{type(e).__name__}: {e}")
        return False  # the group lost a rank: no barrier
    elif scenario == "indivisible":
        state = ft.TrainState.create(mlp(), ft.adamw(1e-2), loss_fn)
        try:
            ft.fit(
                state, dataset(), batch_size=15, max_epochs=1, progress=False, verbosity="silent"
            )
        except ft.ConfigError as e:
            mine.mkdir(parents=True)
            (mine / "error.txt").write_text(str(e))
    return True


if __name__ == "__main__":
    main()
