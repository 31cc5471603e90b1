"""Checkpoints: the format apart from the policy.

Modules: `tensorfile` (safetensors files, written and parsed), `files` (their bytes written and
read through buffers of their own, hashed in one pass), `reading` (tensor files read whole or by
shard into memory of the load's own), `commit` (a finished directory swapped into place
atomically), `format` (a tree as a directory of tensor files and a sealed manifest: atomic,
verified, no pickle), `sharded` (a sharded tree: every rank writes its
shards, one manifest; loads that reshard), `counters` (what a state's counters and RNG may hold),
`state_io` (`save` / `load` of a `TrainState` against a template), `directory` (the layout of a
managed directory), `lock` (one writer per directory), `bests` (which best checkpoints to keep),
`manager` (`CheckpointManager`: what to keep, the best ones, `latest`, async saves, restoring).
"""

from functrain.checkpoint.manager import CheckpointManager
from functrain.checkpoint.state_io import VersionWarning, fingerprint, load, load_weights, save

__all__ = ["CheckpointManager", "VersionWarning", "fingerprint", "load", "load_weights", "save"]
