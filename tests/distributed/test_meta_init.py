"""TrainState.create on a module built on the meta device, in one process (a process group of one).

The two-rank behaviour (every rank the same values, one submodule whole at a time, training equal
to the normally built module's) is in tests/distributed/test_distributed.py (scenario "meta").
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

import functrain as ft
from functrain.distributed import gather_tree
from tests.models import cross_entropy_loss_fn

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Scale(nn.Module):
    """A layer with its own parameter and no reset_parameters."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.scale = Scale(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.scale(self.norm(self.inp(x))))


def meta_net() -> Net:
    with torch.device("meta"):
        return Net()


def test_a_meta_module_without_sharding_is_refused_naming_the_sharded_route() -> None:
    with pytest.raises(
        ft.ConfigError,
        match=r"got 7 on the meta device .*or load weights; or, with a process group, pass "
        r"sharding='full' \(or 'optimizer'\)",
    ):
        ft.TrainState.create(meta_net(), ft.adamw(1e-2), cross_entropy_loss_fn)


def test_a_meta_submodule_without_reset_parameters_or_init_is_refused_naming_it(
    group: None,
) -> None:
    with pytest.raises(
        ft.ConfigError,
        match=r"have no reset_parameters\(\) to initialize them: scale \(Scale\); pass "
        r"init=fn to TrainState.create",
    ):
        ft.TrainState.create(meta_net(), ft.adamw(1e-2), cross_entropy_loss_fn, sharding="full")


def test_a_meta_module_is_not_materialized_on_the_meta_device(group: None) -> None:
    with (
        torch.device("meta"),
        pytest.raises(
            ft.ConfigError, match=r"call TrainState.create outside `with torch.device\('meta'\):`"
        ),
    ):
        ft.TrainState.create(
            Net(), ft.adamw(1e-2), cross_entropy_loss_fn, sharding="full", init=lambda m: None
        )


def test_init_is_refused_for_a_module_without_meta_tensors_or_when_not_callable(
    group: None,
) -> None:
    with pytest.raises(
        ft.ConfigError,
        match=r"init= initializes tensors on the meta device, but the module has none",
    ):
        ft.TrainState.create(
            Net(), ft.adamw(1e-2), cross_entropy_loss_fn, sharding="full", init=lambda m: None
        )
    with pytest.raises(
        ft.ConfigError, match=r"init must be a function init\(submodule\) -> None or None, got str"
    ):
        ft.TrainState.create(
            meta_net(), ft.adamw(1e-2), cross_entropy_loss_fn, sharding="full", init="normal"
        )


def test_init_is_called_on_each_submodule_owning_meta_tensors_instead_of_reset_parameters(
    group: None,
) -> None:
    seen: list[str] = []

    def init(module: nn.Module) -> None:
        seen.append(type(module).__name__)
        assert not torch.is_grad_enabled() and not any(
            t.is_meta for t in module.parameters(recurse=False)
        )
        if isinstance(module, Scale):
            module.gain.fill_(2.0)  # in place, without torch.no_grad(): create runs init under it
        else:
            module.reset_parameters()

    model = meta_net()
    model.out = nn.Linear(6, 2)  # already holds values: kept, not initialized
    out_weight = model.out.weight.detach().clone()
    rng = torch.random.get_rng_state()
    state = ft.TrainState.create(
        model, ft.adamw(1e-2), cross_entropy_loss_fn, sharding="full", init=init, ema_decay=0.9
    )
    assert seen == ["Linear", "LayerNorm", "Scale"]
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's generator is untouched
    assert all(
        p.is_meta for name, p in model.named_parameters() if not name.startswith("out.")
    )  # the module is not modified
    params = gather_tree(state.params)
    assert torch.equal(params["scale.gain"], torch.full((6,), 2.0)) and torch.equal(
        params["out.weight"], out_weight
    )
    assert all(
        torch.equal(a, params[k]) for k, a in gather_tree(state.ema_params).items()
    )  # the EMA starts at the values


@pytest.mark.parametrize("sharding", ["full", "optimizer"])
def test_a_meta_module_gets_the_values_of_the_module_built_normally_with_the_seed(
    group: None, sharding: str
) -> None:
    def init(module: nn.Module) -> None:
        nn.init.normal_(module.gain) if isinstance(module, Scale) else module.reset_parameters()

    # the normal build draws as `init` does: Scale's constructor draws nothing, its init draws after
    # the layers before it and before `out`; so build the reference the same way
    torch.manual_seed(5)
    reference = Net()
    with torch.no_grad():
        torch.manual_seed(5)
        for module in (reference.inp, reference.norm, reference.scale, reference.out):
            init(module)
    freeze = lambda name, p: name != "norm.bias"  # noqa: E731
    state = ft.TrainState.create(
        meta_net(),
        ft.adamw(1e-2),
        cross_entropy_loss_fn,
        sharding=sharding,
        seed=5,
        init=init,
        trainable=freeze,
    )
    normal = ft.TrainState.create(
        reference,
        ft.adamw(1e-2),
        cross_entropy_loss_fn,
        sharding=sharding,
        seed=5,
        trainable=freeze,
    )
    assert sorted(state.frozen) == ["norm.bias"] and not ft.distributed.is_sharded(
        state.frozen["norm.bias"]
    )
    assert ft.distributed.is_sharded(state.params["inp.weight"]) == (sharding == "full")
    for k, v in gather_tree(normal.params).items():
        assert torch.equal(gather_tree(state.params)[k], v), k
    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    for _ in range(3):
        state, _ = ft.train_step(state, batch)
        normal, _ = ft.train_step(normal, batch)
    for k, v in gather_tree(normal.params).items():
        torch.testing.assert_close(gather_tree(state.params)[k], v, rtol=1e-6, atol=1e-7)
