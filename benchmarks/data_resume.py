"""What resuming a shuffled DataLoader costs, and what seeding each batch costs, in one run.

Two tables:

* **Replay on resume**: the samples a resumed epoch loads before its first new batch, for a
  ``DataLoader(shuffle=True, generator=seeded)`` of 1,024 samples in batches of 32, resumed after
  `k` batches: through `IterableSource` (replay: what any other iterable, and before
  `DataLoaderSource` a plain DataLoader, costs) and through `DataLoaderSource` (what `fit` uses for
  a plain DataLoader over a map-style dataset: the consumed index batches are drawn, not loaded).
* **Per batch**: the time of one batch in the main process (``num_workers=0``) of iterating the
  DataLoader directly, against `DataLoaderSource` (which seeds torch's, Python's and numpy's
  global generators for each sample and batch and puts the caller's back) and `IterableSource`
  (which draws each batch in the epoch's stream of the three generators and notes its
  fingerprint), on a dataset whose samples cost almost nothing to read, so the seeding shows as
  much as it can.
* **Per sample**: the same for a map-style dataset given to `fit` with ``batch_size=`` (`Batcher`,
  ``num_workers=0``), against the plain `DataLoader` over the same order: what the seeding of
  each sample's draws (from (``data_seed``, epoch, sample index)) and of each batch's collation
  costs the main process.

Usage: ``python benchmarks/data_resume.py [--reps 30]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch.utils.data import DataLoader, Dataset

from functrain.driver.data import Batcher, DataLoaderSource, IterableSource

SAMPLES, BATCH = 1024, 32


class Counted(Dataset):
    """Sample i is a 16-feature row; reads are counted."""

    def __init__(self) -> None:
        self.rows, self.reads = torch.randn(SAMPLES, 16), 0

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads += 1
        return self.rows[i]


def loader(data: Dataset) -> DataLoader:
    return DataLoader(
        data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(7)
    )


def reads_before_first_new_batch(kind: type, consumed: int) -> int:
    data = Counted()
    source = kind(loader(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the replay's own warning
        next(iter(source.epoch(0, start=consumed)))
    return data.reads - BATCH  # the new batch itself aside


def per_batch_us(fn_epoch: object, reps: int, per: int = 1) -> float:
    """The median time of one batch of `fn_epoch()` (of one sample, `per` samples a batch)."""
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        n = sum(1 for _ in fn_epoch())  # type: ignore[operator]
        samples.append((time.perf_counter() - start) / n / per * 1e6)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        f"replay on resume: samples loaded again before the first new batch ({SAMPLES} samples, "
        f"batches of {BATCH})"
    )
    print(f"{'consumed batches':>17} {'IterableSource':>15} {'DataLoaderSource':>17}")
    for consumed in (1, 8, 31):
        print(
            f"{consumed:>17} {reads_before_first_new_batch(IterableSource, consumed):>15} "
            f"{reads_before_first_new_batch(DataLoaderSource, consumed):>17}"
        )
    data = Counted()
    plain, source = loader(data), DataLoaderSource(loader(data))
    replayed = IterableSource(loader(data))
    # interleaved, so all see the same machine state
    direct, seeded, streamed = [], [], []
    for _ in range(3):
        direct.append(per_batch_us(lambda: iter(plain), args.reps))
        seeded.append(per_batch_us(lambda: source.epoch(0), args.reps))
        streamed.append(per_batch_us(lambda: replayed.epoch(0), args.reps))
    d, s, r = (statistics.median(x) for x in (direct, seeded, streamed))
    print(
        f"\nper batch, main process: DataLoader {d:.1f} us, DataLoaderSource {s:.1f} us "
        f"(+{s - d:.1f} us), IterableSource {r:.1f} us (+{r - d:.1f} us)"
    )
    batcher = Batcher(data, BATCH, seed=7)
    direct, seeded = [], []
    for _ in range(3):
        direct.append(per_batch_us(lambda: iter(plain), args.reps, BATCH))
        seeded.append(per_batch_us(lambda: batcher.epoch(0), args.reps, BATCH))
    d, b = (statistics.median(x) for x in (direct, seeded))
    print(f"per sample, main process: DataLoader {d:.2f} us, Batcher {b:.2f} us (+{b - d:.2f} us)")


if __name__ == "__main__":
    main()
