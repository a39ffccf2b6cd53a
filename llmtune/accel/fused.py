"""Llama-style RMSNorm and SwiGLU MLP blocks as single autograd functions.

A SwiGLU MLP computes down(silu(gate(x)) * up(x)). Autograd keeps gate(x), up(x) and silu(gate(x)) for
backward: three tensors of the intermediate size (SmolLM2-135M: 1,536 floats per token and layer), where the
first two suffice, silu being cheap to compute again. `_SwiGLU` keeps those two: in a quickstart LoRA step,
97 of the 757 MiB of activations autograd keeps. An RMSNorm is eight autograd nodes, each a pass over the
hidden states in forward and again in backward; `_RMSNorm` is one, keeping the input and one float per token.

A module is switched only where its new forward reproduces its own bit for bit on random inputs, small and
large: the same operations in the same order. Anything else keeps its forward (Gemma's norm scales by
1 + weight; gated norms take a second input; GELU MLPs; MLPs that clamp).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from torch.nn import functional as F


def fuse_blocks(model: nn.Module, probe: bool = True) -> int:
    """Switch every Llama-style RMSNorm and SwiGLU MLP of `model` to a fused forward; returns how many.

    Each is first run on random inputs and kept only if it reproduces the module's outputs, unless `probe` is
    False."""
    count = 0
    for module in model.modules():
        fused = _fused_forward(module)
        if fused is not None and (not probe or _reproduces(module, fused)):
            module.forward = functools.partial(fused, module)
            count += 1
    return count


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


def _fused_forward(module: nn.Module):
    """The fused forward `module` looks made for, judged by its attributes and its forward's inputs, or None."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if isinstance(weight, nn.Parameter) and weight.dim() == 1 and isinstance(eps, float):
        fused = _rms_norm_forward
    elif all(isinstance(getattr(module, name, None), nn.Module) for name in _MLP_PARTS):
        fused = _swiglu_forward
    else:
        return None
    # Gated norms (Mamba hybrids) take a second input that a one-input probe would never pass.
    return fused if len(inspect.signature(module.forward).parameters) == 1 else None


_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def _reproduces(module: nn.Module, fused) -> bool:
    """Whether `fused` gives exactly `module`'s own outputs on random inputs of its width: in its dtype and, for
    a norm, in bf16 as well (T5's norm agrees with Llama's in float32 but not on bf16 inputs)."""
    if fused is _rms_norm_forward:
        width, dtypes = module.weight.size(0), {module.weight.dtype, torch.bfloat16}
    else:
        width = getattr(module.gate_proj, "in_features", None)
        # The hidden states come in the trained weights' dtype (frozen ones may be stored in bf16).
        floats = [p for p in module.parameters() if p.is_floating_point()]
        trained = {p.dtype for p in floats if p.requires_grad} or {p.dtype for p in floats}
        dtypes = trained if len(trained) == 1 else set()
    if not isinstance(width, int) or not dtypes:
        return False
    device = next(module.parameters()).device
    # Large inputs as well: an MLP that clamps its activations (some do) agrees with the plain one below the limit.
    for dtype, scale in ((dtype, scale) for dtype in dtypes for scale in (1.0, 1e3)):
        try:
            outputs = _both_outputs(module, fused, width, dtype, scale, device)
        # Not a forward for an input of this shape or kind, or weights not in memory: the module keeps its own.
        except (AttributeError, NotImplementedError, RuntimeError, TypeError, ValueError):
            return False
        if not torch.equal(*outputs):
            return False
    return True


def _both_outputs(module: nn.Module, fused, width: int, dtype: torch.dtype, scale: float, device: torch.device):
    """`module`'s own output and the fused forward's, for one random input of `width` features."""
    generator = torch.Generator(device).manual_seed(0)
    # An input that needs a gradient, as in training: shown one that does not, bitsandbytes repacks a 4-bit
    # weight on the CPU into an inference layout that passes no gradient back.
    x = (torch.randn(2, 3, width, device=device, generator=generator) * scale).to(dtype).requires_grad_()
    accelerator = [] if device.type == "cpu" else [device]
    outputs = []
    for forward in (module.forward, functools.partial(fused, module)):
        # Both calls draw the same dropout masks, and the training run's random streams stay as they were.
        with (
            torch.enable_grad(),
            torch.random.fork_rng(accelerator, device_type=device.type if accelerator else "cuda"),
        ):
            outputs.append(forward(x).detach())
    return outputs


class _RMSNorm(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), with the statistics in float32, as Llama computes it;
    saves x and the reciprocal norm for backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd
        grad_normed = (grad * weight).to(torch.float32)
        # The gradient of x * rstd(x) along x: rstd * (g - normed * mean(g * normed)).
        grad_x = (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True)).mul_(rstd)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.size(0)).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_weight, None


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, saving gate and up and computing silu(gate) again in backward, in float32."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        g, u, grad32 = (t.to(torch.float32) for t in (gate, up, grad))
        sigmoid = torch.sigmoid(g)
        grad_up = grad32 * g * sigmoid if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            # d silu(g) / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
            grad_gate = (1 - sigmoid).mul_(g).add_(1).mul_(sigmoid).mul_(grad32).mul_(u).to(gate.dtype)
        return grad_gate, None if grad_up is None else grad_up.to(up.dtype)
