"""Data parallelism on torch.distributed (gloo, 2 processes on CPU), launched like torchrun does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import functrain as ft
from tests.processes import checkout_env, free_port, run_script, torchrun

WORKER = Path(__file__).parent / "workers" / "worker.py"
sys.path.insert(0, str(WORKER.parent))
import worker  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="needs torch.distributed with gloo",
    ),
    pytest.mark.xdist_group("ports"),  # under pytest -n, one worker launches the process groups
]


def launch(nproc: int, *args: str) -> None:
    # the workers import this checkout's functrain, whatever the environment has installed
    if nproc == 1:  # one process, no process group: forked as `python worker.py` would start
        done = run_script(WORKER, *args, timeout=240, OMP_NUM_THREADS="1")
    else:
        env = checkout_env(OMP_NUM_THREADS="1")
        cmd = torchrun(nproc, WORKER, *args)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


# the scenarios on 2 ranks that one launch runs in turn (a launch costs seconds of process start),
# each read by the tests from its own directory
ON_TWO = (
    "steps",
    "torch_ddp",
    "unused",
    "samples",
    "fit:0:0",
    "mismatch",
    "indivisible",
    "stream",
    "loader",
    "meta",
    "sharded",
)


@pytest.fixture(scope="module")
def on_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One launch of the scenarios of `ON_TWO` on 2 ranks, each under its name."""
    out = tmp_path_factory.mktemp("two")
    launch(2, "+".join(ON_TWO), str(out))
    return out


@pytest.fixture(scope="module")
def steps_on_two(on_two: Path) -> Path:
    """The "steps" scenario on 2 ranks, read by two tests."""
    return on_two / "steps"


@pytest.fixture(scope="module")
def fit_straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The "fit" scenario on one process, never stopped: the run the resumed ones must equal."""
    out = tmp_path_factory.mktemp("straight")
    launch(1, "fit", str(out), "0", "0")
    return out


def test_two_ranks_with_half_batches_match_one_process_and_each_other(steps_on_two: Path) -> None:
    rank0, _ = ft.load(steps_on_two / "rank0")
    rank1, _ = ft.load(steps_on_two / "rank1")
    for name in rank0["params"]:
        assert torch.equal(rank0["params"][name], rank1["params"][name]), (
            name
        )  # bit-identical ranks
    # one process on the whole batch, with the NaN rank 1 saw (its first sample is row 8 of the
    # batch)
    state = ft.TrainState.create(worker.mlp(0), ft.adamw(1e-2), worker.loss_fn)
    for i, (x, y) in enumerate(worker.batches(20)):
        if i == 5:
            x = x.clone()
            x[8, 0] = float("nan")
        state, _ = ft.train_step(state, (x, y))
    for name, p in state.params.items():
        torch.testing.assert_close(rank0["params"][name], p, rtol=1e-6, atol=1e-7)


def test_a_nan_on_one_rank_makes_every_rank_skip_that_step(steps_on_two: Path) -> None:
    for rank in (0, 1):
        tree, _ = ft.load(steps_on_two / f"rank{rank}")
        skipped = [float(m["skipped"]) for m in tree["metrics"]]
        assert skipped == [1.0 if i == 5 else 0.0 for i in range(20)]


def test_data_parallel_steps_match_torchs_distributed_data_parallel_bit_for_bit(
    on_two: Path,
) -> None:
    """Each configuration of `worker.DDP_CONFIGS` on 2 ranks, donated and pure, against torch's
    DistributedDataParallel and the torch.optim loop it matches (DDP scales each gradient by
    1/2 and sums, functrain sums and halves: the same bits), a NaN on one rank skipped by both;
    the eager step is the straight line, and its counters count every rank's samples."""
    tmp_path = on_two / "torch_ddp"
    for rank in (0, 1):
        tree, _ = ft.load(tmp_path / f"rank{rank}")
        for name in worker.DDP_CONFIGS:
            for kind in ("pure", "donated"):
                assert bool(tree[f"{name}/{kind}/straight"]), (name, kind)
                # 8 batches of 8 samples on each rank, the NaN one's update skipped (counted in
                # `skipped`): the samples seen are every rank's, as one process's of the batches
                assert tree[f"{name}/{kind}/counters"].tolist() == [8, 8, 128, 1], (name, kind)
                assert int(tree[f"{name}/{kind}/loss_bytes"]) == 4, (name, kind)
                for i in range(8):
                    key = f"{name}/{kind}/{i}"
                    for k in ("0.weight", "0.bias", "2.weight", "2.bias"):
                        ours, theirs = tree[f"{key}/ours/{k}"], tree[f"{key}/torch/{k}"]
                        assert torch.equal(ours, theirs), (rank, key, k)


def test_an_expert_no_rank_reached_sits_the_update_out_as_under_ddp_finding_unused_ones(
    on_two: Path,
) -> None:
    """`worker.unused_runs` on 2 ranks: an expert no rank's batch reached sits the update out
    (no update, no weight decay, its moments and count untouched), as torch.optim skips the
    parameter DistributedDataParallel(find_unused_parameters=True) leaves without .grad; one
    that some ranks reached takes the mean with the others' zeros. Bit for bit, on every rank,
    pure, donated and resumed from a checkpoint between such steps; the ranks' optimizer states
    are the same."""
    tmp_path = on_two / "unused"
    ranks = [ft.load(tmp_path / f"rank{rank}")[0] for rank in (0, 1)]
    # in the second step rank 0 had every gradient (its straight line averaged them) and rank 1
    # lacked some (its straight line handed the step to the body): the two engines took part in
    # the same all-reduce; both stay on the straight line until a weight sits out on every rank
    assert [int(r["adamw/0/pure/1/handed"]) for r in ranks] == [0, 1]
    assert [bool(r["adamw/0/pure/1/body"]) for r in ranks] == [False, False]
    assert [bool(r["adamw/0/pure/2/body"]) for r in ranks] == [True, True]
    names = [k for k, _ in worker.make_experts().named_parameters()]
    for tree in ranks:
        for name in worker.UNUSED_CONFIGS:
            for start in (0, 2):
                for kind in ("pure", "donated", "resumed"):
                    for i in range(len(worker.ROUTES) - start):
                        key = f"{name}/{start}/{kind}/{i}"
                        for k in names:
                            ours, theirs = tree[f"{key}/ours/{k}"], tree[f"{key}/torch/{k}"]
                            assert torch.equal(ours, theirs), (key, k)
    for key, leaves in ranks[0].items():
        if key.endswith("opt_state"):
            for mine, other in zip(leaves, ranks[1][key], strict=True):
                assert torch.equal(mine, other), key


def test_a_data_parallel_state_counts_every_ranks_declared_samples(on_two: Path) -> None:
    # each rank's detection batches counted by their images (samples=), times the ranks
    tmp_path = on_two / "samples"
    ranks = [ft.load(tmp_path / f"rank{r}")[0] for r in range(2)]
    for name in ("straight", "donated", "body"):
        assert [int(r[f"seen/{name}"]) for r in ranks] == [2 * (2 + 5 + 3)] * 2, name
    # the evaluation's mean over both ranks' images, each batch weighted by its images
    losses = torch.cat([r["losses"] for r in ranks])
    counts = torch.cat([r["images"] for r in ranks]).double()
    expected = float((losses * counts).sum() / counts.sum())
    for r in ranks:
        assert float(r["val_loss"]) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_a_run_checkpointed_on_n_ranks_resumes_on_m_ranks(
    tmp_path: Path, first: int, then: int, fit_straight: Path
) -> None:
    straight = fit_straight
    resumed = tmp_path / "resumed"
    launch(first, "fit", str(resumed), "9", "0")  # stopped mid-epoch 1 (6 batches per epoch)
    launch(then, "fit", str(resumed), "0", "1")
    want, _ = ft.load(straight / "rank0")
    got, _ = ft.load(resumed / "rank0")
    for name, p in want["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["val"], want["val"], rtol=1e-5, atol=1e-6)


def reads_of(directory: Path, world: int, skip: int = 0) -> torch.Tensor:
    """Every rank's reads in `directory` (``[index, torch's, random's, numpy's draw]`` rows), the
    first `skip` of each rank's left out."""
    return torch.cat([ft.load(directory / f"rank{r}")[0]["reads"][skip:] for r in range(world)])


@pytest.fixture(scope="module")
def augmented_stopped_on_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The "augmented" run on 2 ranks stopped in its second epoch: its reads (``interrupted``) and
    its checkpoints (``ckpt``), where the cases stopped on 2 ranks start; each resumes a copy."""
    out = tmp_path_factory.mktemp("augmented2")
    launch(2, "augmented", str(out / "interrupted"), "9", "0", str(out / "ckpt"))
    return out


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2), (2, 4)])
def test_a_run_resumed_on_m_ranks_reads_each_remaining_sample_once_with_its_own_draws(
    tmp_path: Path, first: int, then: int, request: pytest.FixtureRequest
) -> None:
    """Stopped in the second epoch on `first` ranks, resumed on `then`: the interrupted epoch's
    samples are each read once across the two runs and ranks, each with the draws of torch's,
    Python's and numpy's generators it has in an uninterrupted run on one process."""
    straight = worker.Augmented()
    ft.fit(
        ft.TrainState.create(worker.mlp(), ft.adamw(1e-2), worker.loss_fn),
        straight,
        batch_size=16,
        max_epochs=2,
        progress=False,
        verbosity="silent",
    )
    want = {int(r[0]): r[1:] for r in torch.tensor(straight.reads[96:], dtype=torch.float64)}
    ckpt = tmp_path / "ckpt"
    if first == 2:  # the same stopped run for every `then`: launched once, its checkpoints copied
        stopped = request.getfixturevalue("augmented_stopped_on_two")
        shutil.copytree(stopped / "ckpt", ckpt)
        interrupted = stopped / "interrupted"
    else:
        interrupted = tmp_path / "interrupted"
        launch(first, "augmented", str(interrupted), "9", "0", str(ckpt))
    launch(then, "augmented", str(tmp_path / "resumed"), "0", "1", str(ckpt))
    # 9 batches of 16: the first epoch's 6, then 3 of the second, split over the ranks
    before = reads_of(interrupted, first, skip=96 // first)
    after = reads_of(tmp_path / "resumed", then)
    assert len(before) == 3 * 16 and len(after) == 3 * 16  # it resumed mid-epoch
    epoch = torch.cat([before, after])  # the second epoch's reads, by both runs
    assert sorted(int(i) for i in epoch[:, 0]) == list(range(96))  # each once
    for row in epoch:
        assert torch.equal(row[1:], want[int(row[0])]), int(row[0])


@pytest.mark.parametrize(("first", "then", "stop_at"), [(2, 1, 9), (1, 2, 17), (2, 4, 8)])
def test_a_distributed_samplers_loader_resumed_on_m_ranks_reads_each_remaining_sample_once(
    tmp_path: Path, first: int, then: int, stop_at: int
) -> None:
    """A `DataLoader` of 8 a rank over a `DistributedSampler`, stopped in the second epoch on
    `first` ranks and resumed on `then`: the rest of the epoch is dealt over the new ranks, each
    sample read once across the two runs with the draws it has in an uninterrupted run."""
    straight = worker.Augmented()
    ft.fit(
        ft.TrainState.create(worker.mlp(), ft.adamw(1e-2), worker.loss_fn),
        torch.utils.data.DataLoader(
            straight,
            batch_size=8,
            sampler=torch.utils.data.DistributedSampler(straight, num_replicas=1, rank=0, seed=5),
        ),
        max_epochs=2,
        progress=False,
        verbosity="silent",
    )
    want = {int(r[0]): r[1:] for r in torch.tensor(straight.reads[96:], dtype=torch.float64)}
    ckpt = tmp_path / "ckpt"
    launch(first, "augmented-loader", str(tmp_path / "interrupted"), str(stop_at), "0", str(ckpt))
    launch(then, "augmented-loader", str(tmp_path / "resumed"), "0", "1", str(ckpt))
    before = reads_of(tmp_path / "interrupted", first, skip=96 // first)
    after = reads_of(tmp_path / "resumed", then)
    assert 0 < len(before) < 96 and len(before) + len(after) == 96  # it resumed mid-epoch
    epoch = torch.cat([before, after])  # the second epoch's reads, by both runs
    assert sorted(int(i) for i in epoch[:, 0]) == list(range(96))  # each once
    for row in epoch:
        assert torch.equal(row[1:], want[int(row[0])]), int(row[0])


def test_fit_on_two_ranks_writes_one_set_of_checkpoints_and_one_log(on_two: Path) -> None:
    tmp_path = on_two / "fit"
    checkpoints = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert [n for n in checkpoints if n.startswith(".tmp-")] == []
    regular = [n for n in checkpoints if n.startswith("ckpt-")]
    assert len(regular) == len(set(regular)) > 0
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines if json.loads(x)["kind"] == "train"]
    assert steps == sorted(set(steps))  # written once, by rank 0
    a, _ = ft.load(tmp_path / "rank0")
    b, _ = ft.load(tmp_path / "rank1")
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])


def test_ranks_that_build_different_models_get_a_clear_error(on_two: Path) -> None:
    tmp_path = on_two / "mismatch"
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}" / "error.txt").read_text()
        assert "disagree on the model structure" in text
        text = (tmp_path / f"rank{rank}" / "seed.txt").read_text()
        assert "with the same seed (not seed=rank" in text
        text = (tmp_path / f"rank{rank}" / "frozen.txt").read_text()
        assert "which weights train" in text


def test_a_rank_whose_peer_raised_in_fit_gets_a_peer_failed_error(tmp_path: Path) -> None:
    """Rank 1 raises in its loss and exits; rank 0, waiting in the step's all-reduce, raises a
    `PeerFailedError` pointing at the other rank's log, not gloo's raw connection error. Started
    as plain processes: torchrun would stop rank 0 itself."""
    env = checkout_env(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "peer_fails", str(tmp_path)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for r in (0, 1)
    ]
    try:
        for w in workers:
            w.wait(timeout=120)
    finally:
        for w in workers:
            w.kill()
    assert (tmp_path / "rank1" / "error.txt").read_text().startswith("BatchError")
    text = (tmp_path / "rank0" / "error.txt").read_text()
    assert text.startswith("PeerFailedError: rank 0: a collective across the 2 ranks failed"), text
    assert "its log shows the first error" in text


def test_a_collective_that_timed_out_names_the_timeout_not_a_rank_that_left() -> None:
    # gloo's error on a rank whose peer is still running, only slower than the group's timeout
    # (an evaluation or a callback of its own): that peer's log shows no error to look for
    from functrain.distributed.data_parallel import DistConfig, peer_failure

    timed_out = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 4000ms "
        "for recv operation to complete"
    )
    failure = peer_failure(timed_out, DistConfig(2, 0))
    assert isinstance(failure, ft.PeerFailedError)
    text = str(failure)
    assert "did not reach it within the group's timeout" in text
    assert "init_process_group(timeout=...)" in text
    assert "left it" not in text


def test_a_global_batch_the_world_size_does_not_divide_is_refused(on_two: Path) -> None:
    tmp_path = on_two / "indivisible"
    text = (tmp_path / "rank0" / "error.txt").read_text()
    assert "batch_size=15 (global) must be divisible by world_size=2" in text


def test_each_rank_stores_and_resumes_its_own_streams_state(on_two: Path) -> None:
    tmp_path = on_two / "stream"
    for rank in (0, 1):
        got, _ = ft.load(tmp_path / f"rank{rank}")
        # every rank holds both ranks' states, each naming its rank (a mixed-up load would fail)
        assert got["saved"] == [{"rank": 0, "next": 16}, {"rank": 1, "next": 16}]
        assert got["reads"] == [
            16,
            20,
            0,
            4,
            8,
            12,
        ]  # from the 5th batch of its own stream: none read again
        for name, p in got["straight"].items():
            assert torch.equal(got["resumed"][name], p), name


def test_each_rank_resumes_its_distributed_samplers_dataloader_exactly_loading_nothing_again(
    on_two: Path,
) -> None:
    tmp_path = on_two / "loader"
    for rank in (0, 1):
        got, _ = ft.load(tmp_path / f"rank{rank}")
        assert (
            got["reads"] == (14 - 9) * 8
        )  # from the 4th batch of the second epoch: none read again
        assert [r["epoch"] for r in got["saved"]] == [2, 2] and got["saved"][0]["order"] != got[
            "saved"
        ][1]["order"]  # each rank its own indices
        for name, p in got["straight"].items():
            assert torch.equal(got["resumed"][name], p), name


def reference_run(optimizer: ft.Transform, world: int) -> dict[str, torch.Tensor]:
    """One process on the whole batches, with the NaN the last rank saw (its first sample)."""
    state = ft.TrainState.create(worker.mlp(0), optimizer, worker.loss_fn)
    for i, (x, y) in enumerate(worker.batches(20)):
        if i == 5:
            x = x.clone()
            x[(world - 1) * (x.shape[0] // world), 0] = float("nan")
        state, _ = ft.train_step(state, (x, y))
    return state.params


def assert_trees_close(
    got: dict[str, torch.Tensor],
    want: dict[str, torch.Tensor],
    what: str,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    assert sorted(got) == sorted(want), what
    for name, value in want.items():
        torch.testing.assert_close(
            got[name], value, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


@pytest.fixture(scope="module")
def sharded_on_two(on_two: Path) -> Path:
    """The "sharded" scenario on 2 ranks, read by several tests."""
    return on_two / "sharded"


@pytest.mark.parametrize("nproc", [2, 4])
def test_sharded_modes_match_one_process_and_the_replicated_mode_and_skip_a_nan_together(
    tmp_path: Path, nproc: int, request: pytest.FixtureRequest
) -> None:
    if nproc == 2:
        tmp_path = request.getfixturevalue("sharded_on_two")
    else:
        launch(nproc, "sharded", str(tmp_path))
    ranks = [ft.load(tmp_path / f"rank{r}")[0] for r in range(nproc)]
    for name, optimizer in (("adamw", ft.adamw(1e-2)), ("sgd", ft.sgd(0.05, momentum=0.9))):
        alone = {f"params/{k}": v for k, v in reference_run(optimizer, nproc).items()}
        for mode in worker.MODES:
            key = f"{name}/{mode}"
            assert_trees_close(ranks[0][key]["tree"], alone, f"{key} vs one process")
            assert_trees_close(
                ranks[0][key]["tree"], ranks[0][f"{name}/None"]["tree"], f"{key} vs replicated"
            )
            for r in range(nproc):
                assert all(
                    torch.equal(ranks[r][key]["tree"][k], v)
                    for k, v in ranks[0][key]["tree"].items()
                ), f"{key}: rank {r} gathers other values"
                assert ranks[r][key]["skipped"].tolist() == [
                    1.0 if i == 5 else 0.0 for i in range(20)
                ], f"{key} rank {r}"
    if nproc == 2:
        # BatchNorm, dropout, frozen and tied weights, a 0-d parameter, accumulation, clipping, EMA,
        # bf16, fp16, eval_step
        for case in ("accumulate-clip-ema", "bf16", "fp16", "float64-clip"):
            want = ranks[0][f"{case}/None"]
            for mode in ("optimizer", "full"):
                got = ranks[0][f"{case}/{mode}"]
                # autocast caches the half-precision copy of a leaf parameter only: a gathered
                # ("full")
                # tied weight is cast at each use, so its two gradients add in float32, not in half;
                # float64 within its own rounding (a norm taken in float32 is 1e-8 apart)
                rtol, atol = (
                    (1e-12, 1e-14)
                    if case == "float64-clip"
                    else (1e-3, 1e-4)
                    if case != "accumulate-clip-ema" and mode == "full"
                    else (1e-5, 1e-6)
                )
                assert_trees_close(got["tree"], want["tree"], f"{case}/{mode}", rtol, atol)
                torch.testing.assert_close(got["eval"], want["eval"], rtol=rtol, atol=atol)


def test_full_sharding_gathers_each_weight_where_it_is_used_and_again_in_the_backward(
    sharded_on_two: Path,
) -> None:
    got = ft.load(sharded_on_two / "rank0")[0]
    assert_trees_close(got["per_use/full"]["tree"], got["per_use/None"]["tree"], "per_use/full")
    torch.testing.assert_close(
        got["per_use/full"]["eval"], got["per_use/None"]["eval"], rtol=1e-5, atol=1e-6
    )
    # after the forward only the last layer's weight is whole (kept for the backward, which needs it
    # first); gathering everything up front would leave all four
    assert int(got["per_use/full/alive"]) == 1 and int(got["per_use/None/alive"]) == 0
    # forward: proj (through .T) and 4 weights + 4 biases; backward: the saved weights of layers 1-3
    # again (layer 4's was kept, proj's is not needed: the batch takes no gradient)
    assert int(got["per_use/full/gathers"]) == 9 + 3
    # reshard_after_forward=False: the backward uses what the forward gathered (layers 1-4 held
    # whole)
    assert_trees_close(
        got["per_use/full-kept"]["tree"], got["per_use/None"]["tree"], "per_use/full-kept"
    )
    assert int(got["per_use/full-kept/gathers"]) == 9 and int(got["per_use/full-kept/alive"]) == 4


def test_compiled_steps_on_sharded_states_match_the_eager_ones_and_one_process(
    sharded_on_two: Path,
) -> None:
    ranks = [ft.load(sharded_on_two / f"rank{r}")[0] for r in range(2)]
    alone = {f"params/{k}": v for k, v in reference_run(ft.adamw(1e-2), 2).items()}
    for mode in ("optimizer", "full"):
        for r, got in enumerate(ranks):
            # 20 steps, donated after the first, a NaN on rank 1 at step 5: every rank skips it
            compiled = got[f"compiled-adamw/{mode}"]
            assert_trees_close(
                compiled["tree"],
                got[f"adamw/{mode}"]["tree"],
                f"compiled {mode} vs eager, rank {r}",
            )
            assert_trees_close(compiled["tree"], alone, f"compiled {mode} vs one process, rank {r}")
            assert compiled["skipped"].tolist() == [1.0 if i == 5 else 0.0 for i in range(20)], (
                f"{mode} rank {r}"
            )
            # BatchNorm buffers, dropout, a 0-d parameter, tied and frozen weights, accumulation,
            # clipping, EMA
            features = got[f"compiled-features/{mode}"]["tree"]
            assert_trees_close(
                features,
                got[f"accumulate-clip-ema/{mode}"]["tree"],
                f"compiled features {mode}, rank {r}",
            )
            assert bool(got[f"compiled-pure/{mode}"]), (
                f"compiled {mode}: the given state or the caller's RNG changed"
            )
            assert "donate=True" in got[f"compiled-donated/{mode}"], got[f"compiled-donated/{mode}"]
    for r, got in enumerate(ranks):  # autocast, the loss scale, a sharded EMA
        assert_trees_close(
            got["compiled-fp16/full"]["tree"],
            got["fp16/full"]["tree"],
            f"compiled fp16 full, rank {r}",
        )
    assert [got["compiled-graphs"].tolist() for got in ranks] == [
        [5, 0],
        [5, 0],
    ]  # graphs, graph breaks


def test_sharded_states_fit_generate_export_and_refuse_what_they_cannot_do(
    sharded_on_two: Path,
) -> None:
    tmp_path = sharded_on_two / "extras"
    for r in (0, 1):
        got, _ = ft.load(tmp_path / f"rank{r}")
        for mode in ("optimizer", "full"):
            assert_trees_close(got[f"fit/{mode}"]["tree"], got["fit/None"]["tree"], f"fit/{mode}")
            torch.testing.assert_close(
                got[f"fit/{mode}"]["val"], got["fit/None"]["val"], rtol=1e-5, atol=1e-6
            )
            assert torch.equal(got[f"generate/{mode}"], got["generate/None"])
            assert_trees_close(
                got[f"grad_stats/{mode}"], got["grad_stats/None"], f"grad_stats/{mode}"
            )
        assert all(bool(got[f"rank0_only/{mode}"]) for mode in worker.MODES)
        assert all(bool(got[f"pure/{mode}"]) for mode in worker.MODES)
        assert (
            len(got["grad_stats/None"]) == 13
        )  # grad_norm, and grad_norm/ and update_ratio/ for inp, bn, a, b, out, temperature
        assert (
            "the optimizer muon updates whole matrices"
            in (tmp_path / f"rank{r}" / "muon.txt").read_text()
        )


def test_sharding_without_a_process_group_or_with_an_unknown_mode_is_refused() -> None:
    with pytest.raises(
        ft.ConfigError,
        match=r"sharding='full' needs an initialized torch.distributed process group, got none",
    ):
        ft.TrainState.create(worker.mlp(), ft.adamw(1e-2), worker.loss_fn, sharding="full")
    with pytest.raises(
        ft.ConfigError, match=r"sharding must be None, 'optimizer' or 'full', got sharding='zero3'"
    ):
        ft.TrainState.create(worker.mlp(), ft.adamw(1e-2), worker.loss_fn, sharding="zero3")
    with pytest.raises(
        ft.ConfigError,
        match=r"reshard_after_forward=False applies to sharding='full' only .* got "
        r"sharding='optimizer'",
    ):
        ft.TrainState.create(
            worker.mlp(),
            ft.adamw(1e-2),
            worker.loss_fn,
            sharding="optimizer",
            reshard_after_forward=False,
        )


def test_what_ranks_exchange_is_data_and_round_trips_tensors_and_json_values() -> None:
    from functrain.distributed import data_parallel as dp

    value = {
        "t": ["d", 1],
        "pos": 3,
        "seen": torch.arange(3),
        "nested": ({"x": torch.ones(2, 2, dtype=torch.bfloat16)}, None, "s", 1.5),
    }
    blob = dp._encode(value)
    assert b"pickle" not in blob and not blob[8:].startswith(
        b"\x80"
    )  # orjson head, safetensors tail
    back = dp._decode(blob)
    assert back["t"] == ["d", 1] and back["pos"] == 3 and torch.equal(back["seen"], torch.arange(3))
    assert torch.equal(back["nested"][0]["x"], torch.ones(2, 2, dtype=torch.bfloat16)) and back[
        "nested"
    ][1:] == [None, "s", 1.5]
    assert dp._decode(dp._encode({"only": "json"})) == {"only": "json"}


def test_a_meta_device_model_is_materialized_a_submodule_at_a_time_as_if_built_normally(
    on_two: Path,
) -> None:
    tmp_path = on_two / "meta"
    ranks = [ft.load(tmp_path / f"rank{r}")[0] for r in range(2)]
    torch.manual_seed(11)
    reference = (
        worker.TiedNet()
    )  # the same net built normally after torch.manual_seed(create's seed)
    want = {
        f"params/{k}": v
        for k, v in reference.state_dict().items()
        if "bn.running" not in k and "num_batches" not in k
    }
    want |= {f"buffers/{k}": v for k, v in reference.named_buffers()}
    for mode in ("full", "optimizer"):
        for r, got in enumerate(ranks):
            initial = {k: v for k, v in got[f"{mode}/initial"].items() if k in want}
            assert sorted(initial) == sorted(want), mode
            assert all(torch.equal(initial[k], v) for k, v in want.items()), (
                f"{mode} rank {r}: other initial values"
            )
            assert_trees_close(
                got[f"{mode}/trained"],
                got[f"{mode}/normal"],
                f"{mode} rank {r}, 5 steps from meta vs normal",
            )
            assert all(
                torch.equal(v, ranks[0][f"{mode}/trained"][k])
                for k, v in got[f"{mode}/trained"].items()
            ), f"{mode}: ranks differ"
            # the optimizer state is made on this rank's rows (15 rows chunk into 8 and 7, 3 into 2
            # and 1)
            rows = got[f"{mode}/opt_rows"].tolist()
            assert len(rows) == 6 and all(mine == (n + 1) // 2 - r * (n % 2) for mine, n in rows), (
                f"{mode} rank {r}: {rows}"
            )
        assert "the ranks disagree on the model structure" in got["mismatch"]
    # "full": one submodule's weight at most is whole at a time, while it is initialized (the
    # buffer every submodule reuses); "optimizer" keeps each whole, so they add up
    for got in ranks:
        assert int(got["full/whole"]) == 1 and int(got["optimizer/whole"]) == 3


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_trains_data_parallel_and_is_refused_fully_sharded(
    sharded_on_two: Path, reentrant: bool
) -> None:
    ranks = [ft.load(sharded_on_two / f"rank{r}")[0] for r in range(2)]
    for got in ranks:
        for mode in ("None", "optimizer"):
            checked = got[f"checkpointing/{mode}/{reentrant}/{reentrant}"]
            plain = got[f"checkpointing/{mode}/{reentrant}/None"]
            for name, value in plain.items():
                assert torch.equal(checked[name], value), (mode, name)
        assert int(got[f"checkpointing/full/{reentrant}/refused"]) == 1
