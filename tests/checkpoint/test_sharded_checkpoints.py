"""Sharded checkpoints (format 4) on torch.distributed: gloo, 1, 2 and 4 processes on CPU.

The trees are built by hand from DTensors (tests/checkpoint/workers/shard_worker.py): each launch
runs many checks on every rank; a failed check fails the launch. What must hold across world sizes
is checked here, in the test process: a checkpoint of 4 ranks loads on 2 ranks and in one process,
and one of 2 ranks or one process loads on 4; a deleted, truncated, altered or swapped shard is a
`CheckpointCorruptError` on every rank; a rank killed mid-save leaves the previous checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import functrain as ft
from functrain.checkpoint.format import read_manifest, read_tree, verify
from functrain.tree import leaves_by_path
from tests.processes import checkout_env, torchrun

WORKER = Path(__file__).parent / "workers" / "shard_worker.py"
sys.path.insert(0, str(WORKER.parent))
import shard_worker  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="needs torch.distributed with gloo",
    ),
    pytest.mark.xdist_group("ports"),  # under pytest -n, one worker launches the process groups
]


def launch(nproc: int, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = checkout_env(OMP_NUM_THREADS="1")
    cmd = torchrun(nproc, WORKER, *args)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    if expect_ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def reports(directory: Path, scenario: str, world: int) -> list[dict]:
    return [
        json.loads((directory / f"report-{scenario}-{world}-rank{r}.json").read_text())
        for r in range(world)
    ]


def assert_tree_equal(got, want) -> None:
    shard_worker.check_equal(got, want)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 ranks: hand-built checkpoints (w4, w4-optimizer), a sharded manager; fit "full",
    interrupted and resumed."""
    out = tmp_path_factory.mktemp("sharded")
    ft.save(shard_worker.full_tree(2), out / "single")  # read on 4 ranks
    launch(4, "write+fit", str(out))
    return out


def test_a_sharded_manager_saves_async_on_every_rank_rotates_keeps_the_best_and_restores(
    written: Path,
) -> None:
    for report in reports(written, "write", 4):
        # steps 1..4 with losses 3, 1, 2, 4: the last two kept, step 2 the best, step 4 the latest
        assert report["kept"] == ["ckpt-000000003-000000003", "ckpt-000000004-000000004"]
        assert (
            report["best"] == "best-000000002-000000002"
            and report["latest"] == "ckpt-000000004-000000004"
        )
        assert (
            report["second_writer"]["error"] == "CheckpointError"
            and "failed on rank 0" in report["second_writer"]["message"]
        )
    assert not [p for p in (written / "managed").iterdir() if p.name.startswith(".tmp-")]


def test_four_ranks_write_each_their_shards_once_and_one_manifest_that_seals_them(
    written: Path,
) -> None:
    names = sorted(os.listdir(written / "w4"))
    # rank 3 holds rows of w, h and nothing of e, moments/0: it still has a file; replicated leaves
    # once
    assert names == [
        "manifest.json",
        "shards-00000-00000.safetensors",
        "shards-00001-00000.safetensors",
        "shards-00002-00000.safetensors",
        "shards-00003-00000.safetensors",
        "tensors-00000.safetensors",
    ]
    manifest = verify(written / "w4")
    assert manifest["format_version"] == 4
    index = manifest["tensors"]
    assert [(s["file"][:12], s["offset"], s["extent"]) for s in index["params/w"]["shards"]] == [
        ("shards-00000", [0, 0], [3, 3]),
        ("shards-00001", [3, 0], [3, 3]),
        ("shards-00002", [6, 0], [3, 3]),
        ("shards-00003", [9, 0], [1, 3]),
    ]
    assert index["params/w"]["shape"] == [10, 3] and index["params/h"]["dtype"] == "bfloat16"
    assert [s["extent"] for s in index["params/e"]["shards"]] == [
        [1],
        [1],
        [1],
    ]  # rank 3's empty shard is not written
    assert index["moments/1"] == {"dtype": "float32", "shape": [0, 4], "shards": []}
    for key in ("plain", "count", "replicated"):
        assert index[key]["file"] == "tensors-00000.safetensors"
    # with plain params, only the moments are sharded
    assert "shards" not in read_manifest(written / "w4-optimizer")["tensors"]["params/w"]


def test_a_failed_rank_fails_the_save_on_every_rank_and_leaves_the_previous_checkpoint(
    written: Path,
) -> None:
    for report in reports(written, "write", 4):
        assert report["failed_save"]["error"] == "CheckpointError"
        assert (
            "failed on rank 3" in report["failed_save"]["message"]
            and "disk full (simulated)" in report["failed_save"]["message"]
        )
        assert report["leftovers"] == []
        assert (
            report["paths_per_rank"]["error"] == "CheckpointError"
            and "to one path" in report["paths_per_rank"]["message"]
        )
    assert not [p for p in written.iterdir() if "per-rank" in p.name]
    tree, _ = ft.load(written / "w4")
    assert tree["note"] == "v2"


def test_a_sharded_checkpoint_loads_in_one_process_into_plain_tensors(written: Path) -> None:
    assert_tree_equal(
        ft.load(written / "w4", like=shard_worker.full_tree(0)), shard_worker.full_tree(2)
    )
    assert_tree_equal(
        ft.load(written / "w4-optimizer", like=shard_worker.full_tree(0)), shard_worker.full_tree(4)
    )
    tree, manifest = ft.load(written / "w4")  # the raw tree: shards joined
    assert (
        torch.equal(tree["params"]["w"], shard_worker.full_tree(2)["params"]["w"])
        and manifest["format_version"] == 4
    )


def damage(source: Path, target: Path, how: str) -> None:
    shutil.copytree(source, target)
    if how == "deleted":
        (target / "shards-00001-00000.safetensors").unlink()
    elif how == "truncated":  # only rank 1 of 2 reads rank 3's shards
        path = target / "shards-00003-00000.safetensors"
        path.write_bytes(path.read_bytes()[:-8])
    elif how == "altered":  # same size, one byte of rank 2's data: only its shard's digest tells
        path = target / "shards-00002-00000.safetensors"
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x40
        path.write_bytes(bytes(data))
    elif how == "swapped":  # ranks 0 and 1 hold shards of the same shapes: same sizes, same headers
        a, b = target / "shards-00000-00000.safetensors", target / "shards-00001-00000.safetensors"
        a_bytes = a.read_bytes()
        a.write_bytes(b.read_bytes())
        b.write_bytes(a_bytes)


ATTACKS = ("deleted", "truncated", "altered", "swapped")


@pytest.fixture(scope="module")
def resharded(written: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks read the 4-rank checkpoints, a single process's, and damaged copies; then save their
    own."""
    out = tmp_path_factory.mktemp("resharded")
    for name in ("w4", "w4-optimizer", "other-ranks-from-4"):
        shutil.copytree(written / name, out / name)
    ft.save(shard_worker.full_tree(2), out / "single")
    for how in ATTACKS:
        damage(written / "w4", out / f"attack-{how}", how)
    launch(2, "read+resume", str(out))
    return out


def test_four_ranks_checkpoint_and_one_process_checkpoint_load_on_two_ranks_in_both_modes(
    resharded: Path,
) -> None:
    # the checks ran on the ranks (shard_worker "read": bit-identical shards of w4, w4-optimizer and
    # single into sharded and plain-params templates); here: they did run, and the 2-rank save is
    # whole
    assert len(reports(resharded, "read", 2)) == 2
    assert_tree_equal(
        ft.load(resharded / "w2", like=shard_worker.full_tree(0)), shard_worker.full_tree(2)
    )
    assert [
        s["extent"][0] for s in read_manifest(resharded / "w2")["tensors"]["params/w"]["shards"]
    ] == [5, 5]


@pytest.mark.parametrize("how", ATTACKS)
def test_a_damaged_shard_is_a_corrupt_checkpoint_on_every_rank(resharded: Path, how: str) -> None:
    seen = [r[f"attack-{how}"] for r in reports(resharded, "read", 2)]
    assert [s["error"] for s in seen] == ["CheckpointCorruptError"] * 2, seen
    assert seen[0]["message"] == seen[1]["message"]  # the ranks agree on one failure
    file = {
        "deleted": "shards-00001",
        "truncated": "shards-00003",
        "altered": "shards-00002",
        "swapped": "shards-0000",
    }[how]
    assert file in seen[0]["message"], seen[0]["message"]
    with pytest.raises(ft.CheckpointCorruptError):  # and in one process, reading every file
        ft.load(resharded / f"attack-{how}")


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_and_nothing_that_looks_complete(
    tmp_path: Path,
) -> None:
    done = launch(2, "kill", str(tmp_path), expect_ok=False)
    assert done.returncode != 0
    assert "exitcode  : 17" in done.stderr or "exitcode: 17" in done.stderr, done.stderr[-3000:]
    tree, _ = ft.load(tmp_path / "ckpt")
    assert tree["note"] == "v1"
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert all(not (p / "manifest.json").exists() for p in leftovers)
    with ft.CheckpointManager(tmp_path):  # the next writer clears what the killed save left
        pass
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------------------------------------
# end to end: fit on sharded states, interrupted, resumed on other ranks, modes, one process


def assert_close_outcomes(got: dict, want: dict) -> None:
    """Final params, EMA and optimizer state (gathered), and the validation losses, allclose."""
    want_leaves, got_leaves = leaves_by_path(want), leaves_by_path(got)
    assert set(got_leaves) == set(want_leaves)
    for path, w in want_leaves.items():
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            torch.testing.assert_close(got_leaves[path], w, rtol=1e-5, atol=1e-6, msg=path)
        elif isinstance(w, torch.Tensor):
            assert torch.equal(got_leaves[path], w), path
        else:
            assert got_leaves[path] == w, path


def test_fit_full_on_four_ranks_interrupted_and_resumed_is_bit_identical_and_checkpoints_by_shard(
    written: Path,
) -> None:
    # the ranks compared the resumed run with the uninterrupted one, bit for bit (shard_worker
    # "fit")
    assert len(reports(written, "fit", 4)) == 4
    manifest = read_manifest(
        ft.CheckpointManager(written / "other-ranks-from-4", readonly=True).latest()
    )
    assert manifest["format_version"] == 4
    assert len(manifest["tensors"]["params/0.weight"]["shards"]) == 4 and manifest["tensors"][
        "params/0.weight"
    ]["shape"] == [10, 6]
    sharded = {key for key, info in manifest["tensors"].items() if "shards" in info}
    assert {"params/0.weight", "params/2.bias"} <= sharded and any(
        key.startswith("ema_state") for key in sharded
    )
    assert (
        any(key.startswith("opt_state") for key in sharded)
        and "step" not in sharded
        and "rng" not in sharded
    )


def test_fit_full_checkpoint_of_four_ranks_resumes_on_two_ranks_optimizer_like_uninterrupted_run(
    written: Path, resharded: Path
) -> None:
    want, _ = ft.load(written / "straight-4-full")
    got, _ = ft.load(resharded / "other-ranks-from-4-resumed-2-optimizer")
    assert_close_outcomes(got, want)


def test_fit_full_checkpoint_of_four_ranks_resumes_in_one_process_like_the_uninterrupted_run(
    written: Path, tmp_path: Path
) -> None:
    shutil.copytree(written / "one-process-from-4", tmp_path / "ckpt")
    got = shard_worker.outcome_of(shard_worker.fit(tmp_path / "ckpt", None, resume=True))
    want, _ = ft.load(written / "straight-4-full")
    assert_close_outcomes(
        ft.load(ft.save(got, tmp_path / "got"))[0], want
    )  # NamedTuples as dicts, as saved


# ---------------------------------------------------------------------------------------------
# crafted manifests (re-sealed, so only the checks of the sharded entries can refuse them)


def resealed(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_bytes())
    manifest.pop("manifest_blake3")
    edit(manifest)
    (target / "manifest.json").write_bytes(sealed(manifest))
    return target


def sealed(manifest: dict) -> bytes:
    from functrain.checkpoint.format import _sealed

    return _sealed(manifest)


def w_shards(m: dict) -> list:
    return m["tensors"]["params/w"]["shards"]


CRAFTED = {
    "gap": (
        lambda m: w_shards(m)[1]["offset"].__setitem__(0, 4),
        "does not continue the shards before it",
    ),
    "out-of-order": (lambda m: w_shards(m).reverse(), "does not continue the shards before it"),
    "short": (
        lambda m: w_shards(m).pop(),
        r"its shards cover rows 0:9, its shape \[10, 3\] has 10",
    ),
    "extent": (lambda m: w_shards(m)[0]["extent"].__setitem__(1, 4), "does not continue"),
    "file-twice": (lambda m: w_shards(m)[1].update(file=w_shards(m)[0]["file"]), "names twice"),
    "unlisted-file": (
        lambda m: w_shards(m)[1].update(file="elsewhere.safetensors"),
        "does not list",
    ),
    "0-d": (
        lambda m: m["tensors"]["params/w"].update(shape=[]),
        "0-d tensor is never sharded|does not continue",
    ),
    "digest": (
        lambda m: w_shards(m)[2].update(blake3="0" * 64),
        r"shards-00002-00000.safetensors: the BLAKE3 digest of tensor 'params/w'",
    ),
    "format-3": (lambda m: m.update(format_version=3), "expected file, dtype and shape"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_sharded_index_is_refused_whole_and_by_rows(
    written: Path, tmp_path: Path, case: str
) -> None:
    edit, match = CRAFTED[case]
    path = resealed(written / "w4", tmp_path / "ckpt", edit)
    with pytest.raises(ft.CheckpointCorruptError, match=match):
        verify(path)
    with pytest.raises(
        ft.CheckpointCorruptError, match=match
    ):  # rows of a shard that is fine, or not
        read_tree(path, rows=lambda m: {"params/w": (6, 9)})


def test_a_process_that_never_shards_never_imports_dtensor() -> None:
    # importing torch.distributed.tensor costs about a second: a plain step, save, async save and
    # load must not pay it (a killed-save test once found every first save a second late)
    code = """
import sys, tempfile, pathlib, torch, functrain as ft
s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.adamw(1e-2), lambda m, b: m(b).sum())
s, _ = ft.train_step(s, torch.randn(4, 2))
p = pathlib.Path(tempfile.mkdtemp()) / "c"
ft.save(s, p)
ft.load(p, like=s)
m = ft.CheckpointManager(pathlib.Path(tempfile.mkdtemp()) / "m", async_save=True)
m.save(s)
m.close()
print("torch.distributed.tensor" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert out.stdout.strip() == "False", out.stderr[-2000:]
