"""The small models and losses the tests train: one definition each, imported as `tests.models`.

pytest imports the test files by their path under the repository root (``--import-mode=importlib``),
so ``from tests.models import loss_fn`` works in every test file without making ``tests`` a package.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

F = nn.functional


def loss_fn(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The mean squared error of ``model(x)`` against ``y`` for a batch ``(x, y)``."""
    x, y = batch
    return F.mse_loss(model(x), y)


def cross_entropy_loss_fn(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The cross-entropy of the logits ``model(x)`` against the classes ``y``."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def cross_entropy_with_accuracy(
    model: Any, batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`cross_entropy_loss_fn` and the batch's accuracy as the metric ``acc``."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def make_mlp(dropout: float = 0.0) -> nn.Module:
    """6 -> 16 -> 3 with ReLU (and dropout before the last layer), from torch's seed 0."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(6, 16), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(16, 3))


def make_tanh_mlp() -> nn.Module:
    """16 -> 32 -> 5 with tanh, from torch's seed 0."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5))


def tanh_mlp_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` batches of 8 inputs and 5 classes for `make_tanh_mlp`, from a generator seeded 1."""
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 16, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)
    ]


def make_cnn(dropout: float = 0.0) -> nn.Module:
    """A convolution with batch norm over 2 x 5 x 5 inputs, then 3 logits (with dropout before
    the last layer), from torch's seed 0."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
    ]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(4 * 5 * 5, 3))


def square_output_loss(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """The mean square of ``model(batch)``: a loss of the inputs alone, no targets."""
    return model(batch).square().mean()


def first_column_loss(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """The mean squared error of ``model`` predicting each row's first column from the others."""
    return (model(batch[:, 1:]) - batch[:, :1]).pow(2).mean()


def detection_batches(sizes: list[int], seed: int = 0) -> list[tuple[tuple, tuple]]:
    """Batches as torchvision's detection loaders collate them (``collate_fn=lambda b:
    tuple(zip(*b))``): ``(images, targets)``, a tuple of ``[3, H, W]`` images of their own sizes
    and a tuple of their targets (``{"boxes": [k, 4], "labels": [k]}``, some without objects);
    one batch of each of `sizes` images."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for n in sizes:
        samples = []
        for _ in range(n):
            h, w, k = (int(v) for v in torch.randint(4, 8, (3,), generator=g))
            k = max(k - 5, 0)  # 0 to 2 objects: some images hold none
            target = {
                "boxes": torch.rand(k, 4, generator=g),
                "labels": torch.randint(0, 2, (k,), generator=g),
            }
            samples.append((torch.randn(3, h, w, generator=g), target))
        batches.append(tuple(zip(*samples)) if samples else ((), ()))
    return batches


def detection_loss(model: Any, batch: tuple[tuple, tuple]) -> torch.Tensor:
    """A per-image loss, averaged over the batch's images: `model` (3 -> 2) on each image's mean
    colour, the class whether it holds an object."""
    images, targets = batch
    logits = model(torch.stack([im.mean((1, 2)) for im in images]))
    present = torch.tensor([int(t["labels"].numel() > 0) for t in targets])
    return F.cross_entropy(logits, present)


def graph_batches(graphs: list[int], seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Graph batches ``(x, edge_index, batch, y)`` as PyG collates them: each of `graphs`
    graphs of 2 to 5 nodes of 3 features, their edges, each node's graph and a class per graph."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for count in graphs:
        nodes = torch.randint(2, 6, (count,), generator=g)
        total = int(nodes.sum())
        x = torch.randn(total, 3, generator=g)
        edge_index = torch.randint(0, total, (2, 2 * total), generator=g)
        owner = torch.arange(count).repeat_interleave(nodes)
        batches.append((x, edge_index, owner, torch.randint(0, 2, (count,), generator=g)))
    return batches


def graph_loss(
    model: Any, batch: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The cross-entropy of each graph's summed node logits (`model`: 3 -> 2), averaged over the
    graphs, and the accuracy over the graphs (``acc``)."""
    x, _, owner, y = batch
    logits = torch.zeros(y.shape[0], 2).index_add(0, owner, model(x))
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}
