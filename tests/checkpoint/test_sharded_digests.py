"""A sharded save records each shard's digest from the bytes its file holds, not from memory."""

from __future__ import annotations

from pathlib import Path

import blake3
import torch

from functrain.checkpoint.format import write_tensor_files
from functrain.checkpoint.sharded import written_digests


def test_each_shard_digest_is_of_the_file_even_when_the_tensor_changed_after_the_write(
    tmp_path: Path,
) -> None:
    tensors = {
        "params/w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "params/b": torch.ones(5, dtype=torch.bfloat16),
        "opt/count": torch.tensor(7),
        "empty": torch.zeros(0, 3),
    }
    written = {k: bytes(t.reshape(-1).view(torch.uint8).numpy()) for k, t in tensors.items()}
    files: dict = {}
    index: dict = {}
    write_tensor_files(tmp_path, "shards-00000", tensors, files, index, empty=False)
    tensors["params/w"].data.mul_(2)  # a write the version counter does not see, after the file
    digests = written_digests(tmp_path, index)
    assert digests == {k: blake3.blake3(b).hexdigest() for k, b in written.items()}
    # hashing the tensor's memory, as the save did before, records what the file does not hold
    changed = tensors["params/w"].reshape(-1).view(torch.uint8).numpy().tobytes()
    assert digests["params/w"] != blake3.blake3(changed).hexdigest()
