"""A zoo of real architectures: functrain's default step against the hand-written torch loop.

Tiny configurations of `transformers` models built from their configs (no download): GPT-2 (tied
embeddings), Llama (grouped-query attention, rotary buffers), BERT, ViT, ResNet (BatchNorm) and
ConvNeXt, the CNNs also fed channels_last images and with channels_last weights, a LoRA adapter
through `peft` (a frozen base), and a MobileNet-style block written here (depthwise and pointwise
convolutions, BatchNorm). For each, with dropout off:

- 20 steps of the default ``ft.adamw(1e-3)`` equal ``torch.optim.AdamW(lr=1e-3, fused=True)`` with
  ``loss.backward()``, bit for bit, each parameter in the layout torch keeps;
- the step is pure: the state it was given is unchanged;
- a run saved after 10 steps, loaded into a fresh state and continued equals the run never stopped;
- `export_module` gives back a module whose forward equals the state's evaluation.

torchvision and timm cannot serve here: their wheels do not load against the CPU build of torch
this project is developed on (`operator torchvision::nms does not exist`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

STEPS = 20
SAVE_AT = 10
CL = torch.channels_last


def tokens(gen: torch.Generator, vocab: int = 64) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (4, 12), generator=gen)
    return {"input_ids": ids, "labels": ids}


def classified(gen: torch.Generator, *, channels_last: bool = False) -> dict[str, torch.Tensor]:
    x = torch.randn(4, 3, 16, 16, generator=gen)
    return {
        "pixel_values": x.contiguous(memory_format=CL) if channels_last else x,
        "labels": torch.randint(0, 3, (4,), generator=gen),
    }


def sentences(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(0, 64, (4, 12), generator=gen),
        "labels": torch.randint(0, 3, (4,), generator=gen),
    }


def gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=64,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg)


def bert() -> nn.Module:
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg)


def vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.ViTForImageClassification(cfg)


def resnet() -> nn.Module:
    cfg = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    return transformers.ResNetForImageClassification(cfg)


def convnext() -> nn.Module:
    cfg = transformers.ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, drop_path_rate=0.0
    )
    return transformers.ConvNextForImageClassification(cfg)


def lora_gpt2() -> nn.Module:
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True
    )
    with warnings.catch_warnings(
        action="ignore", category=FutureWarning
    ):  # peft reads a property transformers deprecates
        model = peft.get_peft_model(gpt2(), config)
    # peft starts B at zero: give it values, so that A's gradients are not zero from the start
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model


class MobileBlock(nn.Module):
    """A MobileNetV2-style inverted residual: pointwise expansion, depthwise 3x3, pointwise
    projection."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.block = nn.Sequential(
            nn.Conv2d(8, 24, 1, bias=False),
            nn.BatchNorm2d(24),
            nn.ReLU6(),
            nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False),
            nn.BatchNorm2d(24),
            nn.ReLU6(),
            nn.Conv2d(24, 8, 1, bias=False),
            nn.BatchNorm2d(8),
        )
        self.head = nn.Linear(8, 3)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> Any:
        h = self.stem(pixel_values)
        h = h + self.block(h)
        logits = self.head(h.mean((2, 3)))
        return transformers.modeling_outputs.SequenceClassifierOutput(
            loss=nn.functional.cross_entropy(logits, labels), logits=logits
        )


def channels_last(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    return lambda: build().to(memory_format=CL)


# name: (the model's builder, its batches)
ZOO: dict[
    str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], dict[str, torch.Tensor]]]
] = {
    "gpt2": (gpt2, tokens),
    "llama": (llama, tokens),
    "bert": (bert, sentences),
    "vit": (vit, classified),
    "resnet": (resnet, classified),
    "resnet-cl-inputs": (resnet, lambda g: classified(g, channels_last=True)),
    "resnet-cl-weights": (channels_last(resnet), lambda g: classified(g, channels_last=True)),
    "convnext": (convnext, classified),
    "convnext-cl-inputs": (convnext, lambda g: classified(g, channels_last=True)),
    "convnext-cl-weights": (channels_last(convnext), lambda g: classified(g, channels_last=True)),
    "mobilenet-block": (MobileBlock, classified),
    "mobilenet-block-cl": (channels_last(MobileBlock), lambda g: classified(g, channels_last=True)),
    "lora-gpt2": (lora_gpt2, tokens),
}


def own_loss_fn(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss the `transformers` model computes itself from the batch's labels."""
    return model(**batch).loss


class Run:
    """One architecture's runs, made once for all the checks."""

    def __init__(self, name: str, tmp: Path) -> None:
        build, make_batch = ZOO[name]
        torch.manual_seed(0)
        self.net = build()
        gen = torch.Generator().manual_seed(1)
        self.batches = [make_batch(gen) for _ in range(STEPS)]
        self.reference = self._torch_loop()
        self.start = ft.TrainState.create(
            copy.deepcopy(self.net), ft.adamw(1e-3), own_loss_fn, seed=0
        )
        before = self.start.clone()
        state, saved = self.start, None
        for i, batch in enumerate(self.batches):
            state, _ = ft.train_step(state, batch)
            if i == 0:
                self.pure = ft.diff_states(before, self.start)
            if i + 1 == SAVE_AT:
                saved = ft.save(state, tmp / f"{name}-step{SAVE_AT}")
        self.final = state
        resumed = ft.load(
            saved,
            like=ft.TrainState.create(copy.deepcopy(self.net), ft.adamw(1e-3), own_loss_fn, seed=0),
        )
        for batch in self.batches[SAVE_AT:]:
            resumed, _ = ft.train_step(resumed, batch)
        self.resumed = resumed

    def _torch_loop(self) -> nn.Module:
        ref = copy.deepcopy(self.net)
        ref.train()
        opt = torch.optim.AdamW(
            [p for p in ref.parameters() if p.requires_grad], lr=1e-3, fused=True
        )
        for batch in self.batches:
            own_loss_fn(ref, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return ref


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Run]:
    made: dict[str, Run] = {}
    tmp = tmp_path_factory.mktemp("zoo")

    def get(name: str) -> Run:
        if name not in made:
            made[name] = Run(name, tmp)
        return made[name]

    return get


@pytest.mark.parametrize("name", list(ZOO))
def test_default_adamw_equals_the_fused_torch_loop_bit_for_bit(
    runs: Callable[[str], Run], name: str
) -> None:
    run = runs(name)
    trained = [(n, p) for n, p in run.reference.named_parameters() if p.requires_grad]
    assert trained and all(n in run.final.params for n, _ in trained)
    for n, p in trained:
        got = run.final.params[n]
        assert got.stride() == p.stride(), (
            f"{n}: laid out as {got.stride()}, torch keeps {p.stride()}"
        )
        assert torch.equal(got, p.detach()), (
            f"{name}: {n} differs from torch.optim.AdamW(fused=True) by "
            f"{(got - p.detach()).abs().max().item():.3e}"
        )
    for n, b in run.reference.named_buffers():
        if n in run.final.buffers:
            assert torch.equal(run.final.buffers[n], b), f"{name}: buffer {n} differs"
    moved = [
        n for n, p in trained if not torch.equal(p.detach(), dict(run.net.named_parameters())[n])
    ]
    assert len(moved) == len(trained), (
        f"parameters that never moved: {sorted(set(n for n, _ in trained) - set(moved))}"
    )


@pytest.mark.parametrize("name", list(ZOO))
def test_the_step_leaves_its_input_state_unchanged(runs: Callable[[str], Run], name: str) -> None:
    assert runs(name).pure == []


@pytest.mark.parametrize("name", list(ZOO))
def test_a_resumed_run_equals_the_uninterrupted_run(runs: Callable[[str], Run], name: str) -> None:
    run = runs(name)
    ft.assert_states_equal(run.resumed, run.final)
    for n, p in run.final.params.items():
        assert run.resumed.params[n].stride() == p.stride(), f"{n} resumed in another layout"


@pytest.mark.parametrize("name", list(ZOO))
def test_export_module_gives_back_the_trained_module(runs: Callable[[str], Run], name: str) -> None:
    run = runs(name)
    module = run.final.export_module()
    batch = run.batches[0]
    with torch.no_grad():
        exported = own_loss_fn(module, batch)
    assert not module.training
    assert torch.equal(exported, ft.eval_step(run.final, batch)["loss"])
    for n, p in module.named_parameters():
        if n in run.final.params:
            assert (
                torch.equal(p, run.final.params[n]) and p.stride() == run.final.params[n].stride()
            )


def test_a_compiled_resnet_step_follows_the_eager_step() -> None:
    """Inside inductor's graph the convolutions' gradients come out channels_last for contiguous
    weights: the fused kernel then paired the wrong elements (1e-2 apart after 5 steps)."""
    torch.manual_seed(0)
    net = resnet()
    gen = torch.Generator().manual_seed(1)
    data = [classified(gen) for _ in range(5)]
    eager = compiled = ft.TrainState.create(net, ft.adamw(1e-3), own_loss_fn, seed=0)
    step = ft.compile_step()
    for batch in data:
        eager, _ = ft.train_step(eager, batch)
        compiled, _ = step(compiled, batch)
    for name, p in eager.params.items():
        torch.testing.assert_close(
            compiled.params[name], p, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_a_compiled_llama_step_follows_a_torch_loop() -> None:
    """Llama's forward slices its ModuleList (``self.layers[:n]``): the registration hooks that
    clear the eager bindings' plans, traced by dynamo, made it fail the trace ("SpeculationLog
    diverged") before the first step."""
    torch.manual_seed(0)
    net = llama()
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(3):
        ids = torch.randint(0, 64, (4, 12), generator=gen)
        data.append({"input_ids": ids, "labels": ids})
    reference = copy.deepcopy(net)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, fused=True)
    state = ft.TrainState.create(net, ft.adamw(1e-3), own_loss_fn, seed=0)
    step = ft.compile_step(backend="aot_eager")
    for batch in data:
        opt.zero_grad()
        own_loss_fn(reference, batch).backward()
        opt.step()
        state, _ = step(state, batch)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-5, atol=1e-5)
