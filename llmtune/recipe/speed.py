"""The `speed:` section: levers that change how fast a run trains and how much memory it takes, not what it learns.

Each is `auto`, `true` or `false`. `auto` is the choice measured fastest on the device the run lands on that
leaves the numbers alone; llmtune.accel resolves it and prints the plan when training starts.
"""

from __future__ import annotations

from pydantic import Field

from llmtune.recipe.common import AutoOrBool, Spec


class SpeedSpec(Spec):
    gradient_checkpointing: AutoOrBool = Field(
        "auto",
        description="recompute each layer's activations in backward: one more forward pass per step for far less "
        "activation memory; auto = on a GPU (not for prefix tuning or under FSDP's own activation checkpointing)",
    )
    padding_free: AutoOrBool = Field(
        "auto",
        description="objective sft: put a batch's rows end to end instead of padding them to the longest, each row "
        "attending on its own; the same loss with no work on padding; auto = where random batches of the data "
        "would be at least 10% padding (not for prefix, prompt and p-tuning, with NEFTune, or models not attending "
        "through sdpa)",
    )
    fused_loss: AutoOrBool = Field(
        "auto",
        description="apply the output head only at loss-bearing positions, a chunk at a time, its gradient in the "
        "same pass: the logits of prompt and padding tokens are never made; auto = on, but under fsdp or deepspeed",
    )
    fused_kernels: AutoOrBool = Field(
        "auto",
        description="fused RMSNorm, SwiGLU/GeGLU and RoPE kernels: on a GPU Liger's (the gpu extra) where it "
        "supports the model family, on the CPU llmtune's RMSNorm and SwiGLU, which keep one activation less for "
        "backward; auto = on, but under fsdp or deepspeed",
    )
    fused_lora: AutoOrBool = Field(
        "auto",
        description="under bf16 autocast, each LoRA layer over a frozen linear layer as one autograd function: "
        "fewer passes over its input and output; auto = on the CPU, not under fsdp or deepspeed",
    )
    frozen_bf16: AutoOrBool = Field(
        "auto",
        description="under bf16 autocast, store frozen linear weights in bfloat16, the values autocast computes with: "
        "half their memory and no casts, for methods that save only their adapter; auto = on a GPU (on the CPU the "
        "float32 weights stay mapped from the checkpoint file anyway)",
    )
    recast_frozen: AutoOrBool = Field(
        "auto",
        description="under bf16 autocast, cast frozen linear weights to bfloat16 again in backward instead of keeping "
        "a bf16 copy of each from forward: less memory for a few percent more time; auto = on, but under fsdp or "
        "deepspeed",
    )
    compact_dropout: AutoOrBool = Field(
        "auto",
        description="dropout keeps its mask as booleans and draws four elements per 64-bit random number (p rounded "
        "to a multiple of 2^-15): a quarter of the mask's memory and faster draws; auto = on the CPU (CUDA's own "
        "dropout already keeps a boolean mask)",
    )
    float32_attention: AutoOrBool = Field(
        "auto",
        description="under bf16 autocast, attention in float32: PyTorch's CPU attention kernel is faster so for "
        "short rows, and exact; auto = on the CPU",
    )
