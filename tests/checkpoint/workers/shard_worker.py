"""Run by tests/checkpoint/test_sharded_checkpoints.py under `torch.distributed.run`: one scenario
per launch.

Usage: python -m torch.distributed.run --nproc_per_node=N shard_worker.py SCENARIO DIR
Trees of hand-built DTensors (torch.chunk's uneven split along dim 0) are saved and loaded; every
check runs on every rank, and a rank whose check fails exits non-zero. What a test reads back (the
errors each rank saw) is written as JSON under DIR.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import functrain as ft
from functrain.checkpoint.sharded import chunk_rows
from tests.models import cross_entropy_loss_fn as loss_fn

torch.set_num_threads(1)


def sharded(full: torch.Tensor, mesh) -> DTensor:
    start, stop = chunk_rows(full.shape[0], mesh.size(), mesh.get_local_rank())
    return DTensor.from_local(
        full[start:stop].clone(),
        mesh,
        [Shard(0)],
        run_check=False,
        shape=full.shape,
        stride=full.stride(),
    )


def full_tree(version: int) -> dict:
    """The global values of the tree every scenario saves (version tells two saves apart)."""
    return {
        "params": {
            "w": torch.arange(30.0).view(10, 3) + version,
            "e": torch.arange(3.0) * (version + 1),
            "h": (torch.arange(14.0).view(7, 2) / 3).to(torch.bfloat16),
        },
        "moments": [torch.linspace(0, 1, 5) * version, torch.zeros(0, 4)],
        "plain": torch.full((4,), float(version)),
        "replicated": torch.ones(2) * version,
        "count": torch.tensor(version),
        "note": f"v{version}",
    }


def as_sharded(tree: dict, mesh, plain_params: bool = False) -> dict:
    """Params and moments sharded (params plain with `plain_params`), "replicated" a replicated
    DTensor."""
    shard = lambda t: sharded(t, mesh)  # noqa: E731
    return {
        "params": {k: v.clone() if plain_params else shard(v) for k, v in tree["params"].items()},
        "moments": [shard(t) for t in tree["moments"]],
        "plain": tree["plain"].clone(),
        "replicated": DTensor.from_local(
            tree["replicated"].clone(), mesh, [Replicate()], run_check=False
        ),
        "count": tree["count"].clone(),
        "note": tree["note"],
    }


def model_state(mesh, step: int) -> ft.TrainState:
    """A TrainState whose parameters are sharded by hand (the step's own sharding aside), at
    `step`."""
    torch.manual_seed(0)
    state = ft.TrainState.create(
        torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)),
        ft.sgd(0.1),
        lambda m, b: m(b).sum(),
    )
    params = {k: sharded(v + step, mesh) for k, v in state.params.items()}
    return state.replace(params=params, step=torch.tensor(step), epoch_step=torch.tensor(step))


def check_managed(out, mesh, rank: int, report: dict) -> None:
    """CheckpointManager(sharded=True), async: rotation, best, latest, restore; one writer per
    directory."""
    directory = out / "managed"
    with ft.CheckpointManager(
        directory, keep_last=2, best_metric="loss", async_save=True, sharded=True
    ) as manager:
        for step, loss in zip((1, 2, 3, 4), (3.0, 1.0, 2.0, 4.0)):
            manager.save(model_state(mesh, step), metrics={"loss": loss})
        report["second_writer"] = outcome(lambda: ft.CheckpointManager(directory, sharded=True))
    reader = ft.CheckpointManager(directory, readonly=True, best_metric="loss")
    report["kept"] = [p.name for p in reader.all()]
    report["best"], report["latest"] = reader.best().name, reader.latest().name
    template = model_state(mesh, 0)
    check_equal(reader.restore_latest(like=template).params, model_state(mesh, 4).params)
    check_equal(ft.load(reader.best(), like=template).params, model_state(mesh, 2).params)


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(96, 6, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def fit(
    directory: Path, sharding: str | None, stop_at: int = 0, resume: bool = False
) -> ft.FitResult:
    """3 epochs of 6 batches of adamw with EMA, a checkpoint every 4 steps, stopped after `stop_at`
    batches."""

    class Stop(ft.Callback):
        def on_batch_end(self, run):
            if stop_at and run.batches == stop_at:
                run.request_stop("interrupted")

    state = ft.TrainState.create(mlp(), ft.adamw(1e-2), loss_fn, ema_decay=0.9, sharding=sharding)
    return ft.fit(
        state,
        dataset(),
        eval_data=dataset(),
        batch_size=16,
        max_epochs=3,
        log_every=2,
        checkpoint_dir=directory,
        save_every=4,
        callbacks=[Stop()],
        resume=resume,
        progress=False,
        verbosity="silent",
        async_save=True,
    )


def gathered(tree):
    """Plain tensors of a tree of DTensors (collective)."""
    return torch.utils._pytree.tree_map(
        lambda x: x.full_tensor() if isinstance(x, DTensor) else x, tree
    )


def outcome_of(result: ft.FitResult) -> dict:
    """What two runs must agree on: the final params, optimizer state and EMA, and the validation
    losses."""
    state = result.state
    return {
        "params": gathered(state.params),
        "opt": gathered(state.opt_state),
        "ema": gathered(state.ema_state),
        "val": torch.tensor(result.history.column("val_loss")),
    }


def check_equal(got, want, where: str = "") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, got, want)
        for k in want:
            check_equal(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            check_equal(g, w, f"{where}/{i}")
    elif isinstance(want, DTensor):
        assert isinstance(got, DTensor), (where, type(got))
        assert got.placements == want.placements and got.shape == want.shape, (
            where,
            got.placements,
            got.shape,
        )
        assert got._local_tensor.dtype == want._local_tensor.dtype and torch.equal(
            got._local_tensor, want._local_tensor
        ), (where, got._local_tensor, want._local_tensor)
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and not isinstance(got, DTensor), (where, type(got))
        assert got.dtype == want.dtype and torch.equal(got, want), (where, got, want)
    else:
        assert got == want, (where, got, want)


def outcome(fn) -> dict:
    try:
        fn()
    except ft.FunctrainError as e:
        return {"error": type(e).__name__, "message": str(e)}
    return {"error": None}


def main() -> None:
    scenarios, out = sys.argv[1], Path(sys.argv[2])
    ft.distributed.init_from_env()
    rank, world = ft.distributed.rank_and_world()
    mesh = init_device_mesh("cpu", (world,))
    for scenario in scenarios.split("+"):  # several per launch: a launch costs more than its checks
        report = run(scenario, out, mesh, rank, world)
        (out / f"report-{scenario}-{world}-rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def run(scenario: str, out: Path, mesh, rank: int, world: int) -> dict:
    report: dict = {}
    if scenario == "write":
        # two saves at one path; the second replaces the first atomically
        path = out / f"w{world}"
        for version in (1, 2):
            ft.save(as_sharded(full_tree(version), mesh), path)
            check_equal(
                ft.load(path, like=as_sharded(full_tree(0), mesh)),
                as_sharded(full_tree(version), mesh),
            )
        # a plain template on every rank reads every shard: the global tensors
        check_equal(ft.load(path, like=full_tree(0)), full_tree(2))

        # a failure on one rank (before the commit) fails the save on every rank; v2 stays
        def failing():
            if rank == world - 1:
                raise OSError("disk full (simulated)")

        from functrain.checkpoint.sharded import write_sharded

        report["failed_save"] = outcome(
            lambda: write_sharded(path, as_sharded(full_tree(3), mesh), before_commit=failing)
        )
        check_equal(
            ft.load(path, like=as_sharded(full_tree(0), mesh)), as_sharded(full_tree(2), mesh)
        )
        from functrain.checkpoint.files import wait_for_removals

        wait_for_removals()  # rank 0 deletes the checkpoint v2 displaced in the background
        dist.barrier()
        report["leftovers"] = sorted(
            p.name for p in path.parent.iterdir() if re.match(rf"\.tmp-{path.name}-\d+-", p.name)
        )
        # a path per rank: refused on every rank, nothing written
        report["paths_per_rank"] = outcome(
            lambda: ft.save(as_sharded(full_tree(5), mesh), out / f"per-rank-{rank}")
        )
        # params plain (mode "optimizer"): only the moments are sharded
        ft.save(as_sharded(full_tree(4), mesh, plain_params=True), out / f"w{world}-optimizer")
        if (out / "single").exists():  # one process's checkpoint, on these ranks
            check_equal(
                ft.load(out / "single", like=as_sharded(full_tree(0), mesh)),
                as_sharded(full_tree(2), mesh),
            )
        check_managed(out, mesh, rank, report)
    elif scenario == "read":
        # checkpoints of other world sizes and modes, and a single process's, into this world's
        # templates
        for name in sorted(os.listdir(out)):
            if name.startswith("w") or name == "single":
                version = 4 if name.endswith("-optimizer") else 2
                for plain_params in (False, True):
                    got = ft.load(
                        out / name, like=as_sharded(full_tree(0), mesh, plain_params=plain_params)
                    )
                    check_equal(
                        got, as_sharded(full_tree(version), mesh, plain_params=plain_params)
                    )
        for name in sorted(os.listdir(out)):
            if name.startswith("attack-"):
                report[name] = outcome(
                    lambda name=name: ft.load(out / name, like=as_sharded(full_tree(0), mesh))
                )
        ft.save(as_sharded(full_tree(2), mesh), out / f"w{world}")
    elif scenario == "fit":
        # uninterrupted; interrupted after 9 batches then resumed: bit-identical on the same ranks
        # and mode
        mode = "full"
        straight = outcome_of(fit(out / f"straight-{world}", mode))
        fit(out / f"resumed-{world}", mode, stop_at=9)
        if rank == 0:
            ft.save(straight, out / f"straight-{world}-{mode}")
            for copy in ("other-ranks", "one-process"):
                shutil.copytree(out / f"resumed-{world}", out / f"{copy}-from-{world}")
        dist.barrier()
        resumed = outcome_of(fit(out / f"resumed-{world}", mode, resume=True))
        check_equal(resumed, straight)
    elif scenario == "resume":
        # a checkpoint of other ranks and mode, resumed here
        source, mode = "other-ranks-from-4", "optimizer"
        latest = ft.CheckpointManager(out / source, readonly=True).latest()
        result = outcome_of(fit(out / source, mode, resume=True))
        if rank == 0:
            ft.save(result, out / f"{source}-resumed-{world}-{mode}")
        # a warm start of a "full" state here from the 4-rank checkpoint's weights
        into = ft.TrainState.create(mlp(), ft.sgd(0.1), loss_fn, sharding="full")
        warm = ft.load_weights(latest, into=into)
        saved, _ = ft.load(latest)
        check_equal(gathered(warm.params), saved["params"])
        assert all(isinstance(p, DTensor) for p in warm.params.values()) and int(warm.step) == 0
    elif scenario == "kill":
        path = out / "ckpt"
        ft.save(as_sharded(full_tree(1), mesh), path)
        from functrain.checkpoint.sharded import write_sharded

        def die():
            if rank == world - 1:
                os._exit(17)  # killed after writing its shards, before the manifest

        write_sharded(path, as_sharded(full_tree(2), mesh), before_commit=die)
        raise AssertionError("the save went on without the killed rank")
    return report


if __name__ == "__main__":
    main()
