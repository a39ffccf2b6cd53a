"""The one place that asks what the machine computes on: every speed choice and every model placement reads it."""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch


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
