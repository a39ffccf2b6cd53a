"""The speed layer: every precision and speed lever behind `resolve(recipe, device, model, train) -> SpeedPlan`
and `apply(model, plan)`.

`resolve` turns the recipe's `speed:` section (and `training.bf16`) into plain decisions for the device the run is
on; `auto` is the choice measured fastest there that leaves the numbers alone. The trainer is built from the
plan (mixed precision, checkpointing, padding-free batches are its arguments), then `apply` switches the model's
layers to the chosen kernels, in the one order that works (see `apply`). The CPU's levers live in precision.py,
fused.py, attention.py and loss.py; the GPU's kernels are Liger's (liger.py).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from llmtune.accel.attention import attends_per_row, use_segmented_attention
from llmtune.accel.device import Device, current_device, on_device
from llmtune.accel.fused import fuse_blocks
from llmtune.accel.liger import apply_liger, liger_families
from llmtune.accel.loss import TargetedLoss
from llmtune.accel.precision import compact_dropouts, fuse_lora_layers, route_frozen_linears

if TYPE_CHECKING:
    from datasets import Dataset
    from torch import nn

    from llmtune.recipe import Recipe

__all__ = ["Device", "SpeedPlan", "apply", "current_device", "on_device", "resolve"]

# Below this share of padding in random batches, rows end to end gain nothing measurable (benchmarks/RESULTS.md).
PADDING_FREE_FROM = 0.10


@dataclass(frozen=True)
class SpeedPlan:
    device: str
    bf16: bool  # matmuls under bfloat16 autocast
    sharded: bool  # fsdp or deepspeed own the weights outside the forward pass
    gradient_checkpointing: bool
    padding_free: bool
    fused_loss: bool
    kernels: Literal["liger", "llmtune"] | None  # whose fused norm / MLP kernels
    fused_lora: bool
    frozen_bf16: bool
    recast_frozen: bool
    compact_dropout: bool
    float32_attention: bool

    def summary(self) -> str:
        """One line for the start of a run: the device and every lever that is on."""
        on = [name.replace("_", " ") for name, value in asdict(self).items() if value is True]
        if self.kernels:
            on.append(f"{self.kernels} kernels")
        return f"speed on {self.device}: " + (", ".join(on) if on else "no levers")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve(recipe: Recipe, device: Device, model: nn.Module, train: Dataset | None = None) -> SpeedPlan:
    """The recipe's speed choices for `model` on `device`; `train` (tokenized rows) decides padding-free batches."""
    speed, t, method, objective = recipe.speed, recipe.training, recipe.method, recipe.objective
    bf16 = _bf16(recipe, device)
    unsharded = not t.sharded
    return SpeedPlan(
        device=device.kind,
        bf16=bf16,
        sharded=t.sharded,
        # Activations decide a GPU's peak of allocated memory; on the CPU the process already stays below a
        # checkpointed baseline without it. Prefixes travel in the key/value cache, which checkpointing switches
        # off, and FSDP checkpoints on its own.
        gradient_checkpointing=_choose(
            speed.gradient_checkpointing, device.gpu and method.name != "prefix" and not t.fsdp_checkpoints
        ),
        padding_free=objective.token_loss and _padding_free(recipe, model, train),
        fused_loss=objective.token_loss
        and model.get_output_embeddings() is not None
        and _choose(speed.fused_loss, unsharded),
        kernels=_kernels(speed.fused_kernels, device, model, unsharded),
        fused_lora=bf16 and _choose(speed.fused_lora, unsharded and not device.gpu),
        # On the CPU the float32 weights are pages of the checkpoint file, mapped whatever is done with them.
        frozen_bf16=bf16
        and method.frozen_weights_unused
        and not objective.generates_while_training
        and _choose(speed.frozen_bf16, unsharded and device.gpu),
        recast_frozen=bf16 and _choose(speed.recast_frozen, unsharded),
        # CUDA's fused dropout already keeps a boolean mask.
        compact_dropout=_choose(speed.compact_dropout, not device.gpu),
        # PyTorch's CPU flash-attention kernel is slower in bf16 than in float32 for short rows; CUDA's bf16
        # kernels are the fast ones. It is a variant of sdpa: a model attending otherwise (model_options.
        # attn_implementation, or its own default) keeps its attention.
        float32_attention=bf16 and attends_per_row(model) and _choose(speed.float32_attention, not device.gpu),
    )


def apply(model: nn.Module, plan: SpeedPlan, probe: bool = True) -> TargetedLoss | None:
    """Switch `model`'s layers to the plan's kernels, after the trainer is built (it may move or cast the model);
    returns the fused loss for the trainer to compute its loss with, if the plan has one.

    `probe=False` fuses blocks without first checking them on random inputs: for llmtune.plan's model of fake
    tensors, which hold no values to compare.

    The order matters: fused LoRA layers take their output dtype from the frozen weights before those may be
    stored in bf16; the fused-block check runs each block as it will train, so it comes after everything else
    that changes a layer; the loss hook goes on the head last.
    """
    if plan.fused_lora:
        fuse_lora_layers(model, plan.recast_frozen, compact_masks=plan.compact_dropout)
    if plan.bf16 and not plan.sharded:
        # Frozen layers hand their bf16 product back in float32, so an adapter's small delta is added at full
        # precision instead of being rounded away by a bf16 sum.
        route_frozen_linears(model, plan.recast_frozen, store_dtype=torch.bfloat16 if plan.frozen_bf16 else None)
    if plan.compact_dropout:
        compact_dropouts(model)
    use_segmented_attention(model, float32=plan.float32_attention)
    if plan.kernels == "llmtune":
        fuse_blocks(model, probe)
    elif plan.kernels == "liger":
        apply_liger(model)
    return TargetedLoss(model) if plan.fused_loss else None


def _choose(wanted: bool | str, auto: bool) -> bool:
    return auto if wanted == "auto" else wanted


def _bf16(recipe: Recipe, device: Device) -> bool:
    wanted = recipe.training.bf16
    if wanted != "auto":
        return wanted
    # Weights already in a 16-bit dtype gain nothing from autocast; a QLoRA base computes in method.compute_dtype.
    if recipe.training.dtype != "float32" or recipe.method.name == "qlora":
        return False
    return device.native_bf16


def _kernels(wanted: bool | str, device: Device, model: nn.Module, unsharded: bool) -> str | None:
    if not _choose(wanted, unsharded):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if device.gpu and getattr(base.config, "model_type", None) in liger_families():
        return "liger"
    return "llmtune"


def _padding_free(recipe: Recipe, model: nn.Module, train: Dataset | None) -> bool:
    """'auto' is on where each row attends on its own (see attention.py; through another attention implementation
    transformers masks the whole flattened batch, correct but quadratic in it) and random batches of this data
    would be at least PADDING_FREE_FROM padding; never with NEFTune, whose noise shrinks with the sequence length."""
    wanted = recipe.speed.padding_free
    if wanted != "auto":
        return wanted
    neftune = recipe.training.neftune_noise_alpha is not None
    if recipe.method.virtual_tokens or neftune or not attends_per_row(model) or train is None:
        return False
    # A few thousand rows drawn at random estimate the padding without reading every row.
    rows = random.Random(recipe.training.seed).sample(range(len(train)), min(len(train), 4096))
    lengths = [len(ids) for ids in train.select(rows)["input_ids"]]
    return expected_padding(lengths, recipe.training.batch_size, recipe.training.seed) >= PADDING_FREE_FROM


def expected_padding(lengths: list[int], batch_size: int, seed: int, batches: int = 256) -> float:
    """The share of padding in `batches` batches of rows drawn at random, each padded to its longest row."""
    rng = random.Random(seed)
    real = padded = 0
    for _ in range(batches):
        batch = rng.sample(lengths, min(batch_size, len(lengths)))
        real, padded = real + sum(batch), padded + len(batch) * max(batch)
    return 1 - real / padded if padded else 0.0
