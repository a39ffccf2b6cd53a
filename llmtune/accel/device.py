"""The one place that asks what the machine computes on: every speed choice and every model placement reads it."""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from llmtune.errors import LLMTuneError


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu"
    name: str
    native_bf16: bool  # computes bfloat16 in hardware; emulated bf16 is several times slower than float32

    @property
    def gpu(self) -> bool:
        return self.kind == "cuda"


def current_device() -> Device:
    if torch.cuda.is_available():
        return Device("cuda", torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported())
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return Device("cpu", platform.processor() or platform.machine(), native)


def on_device(model: torch.nn.Module) -> torch.nn.Module:
    """`model` on the GPU where there is one (bitsandbytes has already put a quantized model there)."""
    if current_device().gpu and model.device.type == "cpu":
        return model.to("cuda")
    return model


# Attention implementations whose kernels (the flash-attn packages) run on CUDA GPUs only.
CUDA_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def check_attention(implementation: str, device: Device) -> None:
    """Refuse an attention implementation `device` cannot run before a model is loaded with it."""
    if implementation in CUDA_ATTENTION and not device.gpu:
        raise LLMTuneError(
            f"model_options.attn_implementation: {implementation} runs on CUDA GPUs only, and this machine computes "
            f"on the CPU ({device.name}); use sdpa or auto"
        )


# bitsandbytes (0.50) computes a 4-bit layer outside training (evaluation, generation) on a CPU with AVX512-BF16
# through a kernel that first repacks the weight: output rows in blocks of 32 (`block_n` of
# bitsandbytes.functional._convert_weight_packed_for_cpu) and one scale per quantization block of each row, so a
# row must hold whole blocks. Other widths fail there, after training has run.
PACKED_4BIT_ROWS = 32


def check_4bit_layers(model: torch.nn.Module, device: Device, ref: str) -> None:
    """Refuse a 4-bit model that bitsandbytes could train on `device` but not evaluate or generate with."""
    if not _packs_4bit_weights(device):
        return
    from bitsandbytes.nn import Linear4bit

    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        block = module.weight.blocksize
        if module.out_features % PACKED_4BIT_ROWS or module.in_features % block:
            raise LLMTuneError(
                f"model {ref!r}: 4-bit layer {name} ({module.in_features} inputs, {module.out_features} outputs) "
                f"cannot be evaluated on this CPU: bitsandbytes' CPU kernel outside training needs outputs in "
                f"multiples of {PACKED_4BIT_ROWS} and inputs in multiples of the quantization block ({block}); use "
                "method.bits: 8, a method without quantization such as lora, or a model whose layer widths fit"
            )


def _packs_4bit_weights(device: Device) -> bool:
    """Whether bitsandbytes repacks 4-bit weights for inference on `device`: its own test, made on the CPU only."""
    if device.gpu:
        return False
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())
