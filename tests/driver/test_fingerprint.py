"""`batch_fingerprint`: what a checkpoint's replay digest is made of, so its bytes never change.

A resumed run compares the fingerprints of the batches it replays with the digest the checkpoint
holds: a faster fingerprint must give the same bytes as the plain definition, on every layout."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from functrain.driver.data.iterable import batch_fingerprint

SAME_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def plain_fingerprint(t: torch.Tensor) -> bytes:
    """The definition: shape and dtype, then 16 elements evenly spread in logical order (all of
    them up to 16), their bytes as an integer of their size."""
    head = f"{list(t.shape)}{t.dtype}".encode()
    if t.numel() == 0:
        return head
    flat = t.detach().resolve_conj().resolve_neg().reshape(-1)
    n = flat.numel()
    picked = flat[[i * (n - 1) // 15 for i in range(16)]] if n > 16 else flat
    return head + picked.contiguous().view(SAME_SIZE[t.element_size()]).numpy().tobytes()


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 784, generator=g)
    return {
        "contiguous": x,
        "transposed": x.t(),
        "strided": x[:, ::3],
        "rows": x[::2],
        "few": torch.randn(3, generator=g),
        "sixteen": torch.randn(16, generator=g),
        "seventeen": torch.randn(17, generator=g),
        "permuted": torch.randn(2, 3, 4, generator=g).permute(2, 0, 1),
        "expanded": torch.randn(40, generator=g).expand(3, 40),
        "channels_last": torch.randn(2, 3, 5, 5, generator=g).to(memory_format=torch.channels_last),
        "column": torch.randn(3, 4, generator=g)[:, 1],
        "conjugate": torch.randn(4, 4, dtype=torch.complex64, generator=g).conj(),
        "negative view": torch._neg_view(torch.randn(20, generator=g)),
        "requires grad": torch.randn(30, generator=g).requires_grad_(),
        "float64": torch.randn(5, 5, dtype=torch.float64, generator=g),
        "half": torch.randn(8, 8, generator=g).half(),
        "bfloat16": torch.randn(8, 8, generator=g).bfloat16(),
        "bool": torch.rand(10, generator=g) > 0.5,
        "uint8": torch.randint(0, 5, (7, 3), dtype=torch.uint8, generator=g),
        "int64 labels": torch.randint(0, 10, (64,), generator=g),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_a_tensors_fingerprint_is_its_plain_definition(name: str) -> None:
    t = _cases()[name]
    assert batch_fingerprint(t) == plain_fingerprint(t)
    assert batch_fingerprint(t) == plain_fingerprint(t)  # made again from what was cached


def test_a_batchs_fingerprint_joins_its_leaves() -> None:
    cases = _cases()
    batch: Any = (cases["contiguous"], {"y": cases["int64 labels"], "n": 3, "s": "a"})
    expected = b"|".join(
        [
            plain_fingerprint(cases["contiguous"]),
            plain_fingerprint(cases["int64 labels"]),
            b"3",
            b"'a'",
        ]
    )
    assert batch_fingerprint(batch) == expected
    assert batch_fingerprint(np.arange(40.0)) == plain_fingerprint(
        torch.arange(40.0, dtype=torch.float64)
    )
