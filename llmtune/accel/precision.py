"""Frozen linear layers and dropout under mixed precision: less memory held for backward, and adapters' small
updates kept at full precision.

Frozen linear layers: autocast casts a float32 weight to bf16 for every matmul. For a frozen weight autograd
then keeps that bf16 copy until backward, where it computes the input's gradient from it: one copy of every
frozen weight per step (SmolLM2-135M: about 210 MB), more than an adapter run would otherwise hold beside
the float32 model. `route_frozen_linears` makes each frozen `nn.Linear` keep a reference to its own float32
weight instead and cast it again in backward: the same bf16 products, a few percent more time, that much less
memory. It also hands the bf16 product back in float32, so an adapter's delta is added to it at full precision,
and it can store the frozen weights in bf16 outright (see `route_frozen_linears`).

Dropout on the CPU multiplies its input by a noise tensor of the input's own dtype and keeps that tensor for
backward: with LoRA's dropout on every targeted module's input, a float32 copy of the hidden states per
module and layer (SmolLM2-135M, 4096 tokens: about 1.4 GB). It also draws one Mersenne-twister number per
element, one element at a time (PyTorch takes MKL's vectorised generator only on Intel CPUs): 1.7 ms per LoRA
input of 8 x 69 x 576; over a step's 210 of them, a fifth of a quickstart step. `compact_dropouts` keeps the
mask as booleans, a quarter of the bytes, and draws it from torch's generator four elements per 64-bit number
(15 bits each): 0.5 ms.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn
from torch.nn import functional as F


def route_frozen_linears(
    model: nn.Module,
    recast: bool = True,
    full_precision_outputs: bool = True,
    store_dtype: torch.dtype | None = None,
) -> int:
    """Route every frozen `nn.Linear` of `model` through `_frozen_linear_forward`; returns how many were routed.

    Args:
        recast: keep the weight's own reference for backward and cast it again there (`_FrozenLinear`), instead
            of autograd keeping autocast's bf16 copy.
        full_precision_outputs: hand the bf16 product back in the weight's dtype. An adapter adds a small delta
            to a frozen layer's output; summed in bf16 (8 bits of mantissa) most of that delta is rounded away
            early in training, and the adapter learns from a forward pass that barely reflects it.
        store_dtype: keep the routed weights in this dtype, autocast's: every product under autocast uses
            exactly these values, now without a cast in each forward and backward, in half the memory. Only
            for runs that save no frozen weight (an adapter's). The embeddings keep theirs: the input embedding
            looks tokens up outside autocast, and peft saves the output head's base weight with an adapter
            that targets it.
    """
    routed = [m for m in model.modules() if type(m) is nn.Linear and not m.weight.requires_grad]
    # The dtype outputs come back in is the model's own, whatever a weight is then stored in.
    outputs = {m: m.weight.dtype if full_precision_outputs else None for m in routed}
    kept = set()
    if hasattr(model, "get_input_embeddings"):
        kept = {id(getattr(e, "weight", None)) for e in (model.get_input_embeddings(), model.get_output_embeddings())}
    for module in routed:
        if store_dtype is not None and id(module.weight) not in kept:
            module.weight.data = module.weight.data.to(store_dtype)
        module.forward = functools.partial(_frozen_linear_forward, module, recast, outputs[module])
    return len(routed)


def _frozen_linear_forward(
    self: nn.Linear, recast: bool, output_dtype: torch.dtype | None, x: torch.Tensor
) -> torch.Tensor:
    device = x.device.type
    if self.weight.requires_grad or not torch.is_autocast_enabled(device):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
    dtype = torch.get_autocast_dtype(device)
    trained_bias = self.bias is not None and self.bias.requires_grad  # BitFit: the bias trains, the weight does not
    bias = None if trained_bias else self.bias
    # Without a gradient to pass on, autograd keeps nothing, and autocast's own product is the same.
    out = (
        _FrozenLinear.apply(x, self.weight, bias, dtype)
        if recast and x.requires_grad
        else F.linear(x, self.weight, bias)
    )
    out = out.to(output_dtype or dtype)
    return out + self.bias.to(out.dtype) if trained_bias else out


class _FrozenLinear(torch.autograd.Function):
    """x @ weight.T + bias in `dtype`, as autocast computes it, saving only the weight itself for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            grad_x = grad.to(ctx.dtype) @ weight.to(ctx.dtype)
        return grad_x.to(ctx.x_dtype), None, None, None


def compact_dropouts(model: nn.Module) -> int:
    """Route every `nn.Dropout` of `model` through `_BooleanMaskDropout`; returns how many were routed."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Dropout and 0 < module.p < 1:
            module.forward = types.MethodType(_compact_dropout_forward, module)
            count += 1
    return count


def _compact_dropout_forward(self: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    # Also without a gradient to keep a mask for: reentrant checkpointing runs a block's forward under no_grad,
    # then again with gradients, and both passes must draw the same masks from the same generator.
    if not self.training or self.inplace:
        return F.dropout(x, self.p, self.training, self.inplace)
    return _BooleanMaskDropout.apply(x, self.p)


class _BooleanMaskDropout(torch.autograd.Function):
    """x * keep / (1 - p), saving `keep` as booleans for backward."""

    @staticmethod
    def forward(ctx, x, p):
        keep, p = _keep_mask(x, p)
        ctx.save_for_backward(keep)
        ctx.p = p
        return _dropped(x, keep, p)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return _dropped(grad, keep, ctx.p), None


_LANE = 1 << 15


def _keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A mask keeping each element of `x` with probability 1 - p', and p', the dropout probability `p` rounded to
    a multiple of 2^-15.

    `random_()` fills an int64 with the low 63 bits of a 64-bit draw: four 15-bit lanes (the top one's
    sixteenth bit is always 0), each uniform on [0, 2^15). An element is dropped where its lane is below
    p' * 2^15. Scaling by 1 / (1 - p') keeps the output's expectation equal to the input."""
    threshold = min(round(p * _LANE), _LANE - 1)  # p just below 1 must not round to 1, dropping everything
    draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_()
    lanes = draws.view(torch.int16)[: x.numel()].view(x.shape).bitwise_and_(_LANE - 1)
    return lanes >= threshold, threshold / _LANE


def _dropped(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    # Two passes, not x * keep.to(dtype).div_(1 - p)'s three, and the scale is not rounded to x's dtype first
    # (bf16 would make 1 / (1 - 0.05) 1.0547).
    return torch.where(keep, x, 0).mul_(1 / (1 - p))


def fuse_lora_layers(
    model: nn.Module, recast: bool = True, full_precision_outputs: bool = True, compact_masks: bool = True
) -> int:
    """Route every peft LoRA `Linear` over a frozen `nn.Linear` through `_LoraLinear` under autocast; returns how
    many were routed. Call it before `route_frozen_linears` stores frozen weights in another dtype: full precision
    outputs come back in the base weight's dtype as it is now, as peft's would.

    peft computes base(x) + lora_B(lora_A(dropout(x))) * scaling as a dozen autograd nodes, each a pass over the
    layer's input or output: the dropout's mask and scale, autocast's casts of the dropped input, the bf16 delta,
    its scaling, and the sum promoted to float32, and their mirror images in backward. `_LoraLinear` casts the
    input once, applies the mask to that bf16 copy, folds dropout's scale into the adapter's, and adds the delta
    to the frozen product inside one float32 matmul: four passes over the input and four over the output fewer
    per layer. `recast` and `full_precision_outputs` mean what they mean for `route_frozen_linears`; dropout
    masks are drawn as `compact_dropouts` draws them, and without `compact_masks` a layer with dropout keeps peft's
    forward. So does anything else `_LoraLinear` does not compute as peft would (adapters disabled or merged,
    DoRA, several active adapters, a quantized or trained base, no autocast).
    """
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is nn.Linear:
            output_dtype = module.base_layer.weight.dtype if full_precision_outputs else None
            module.forward = functools.partial(_lora_forward, module, recast, output_dtype, compact_masks)
            count += 1
    return count


def _lora_forward(
    self: nn.Module,
    recast: bool,
    output_dtype: torch.dtype | None,
    compact_masks: bool,
    x: torch.Tensor,
    *args,
    **kwargs,
):
    name = None if args or kwargs else _plain_adapter(self, x)
    dropout = None if name is None else self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    if name is None or (p > 0 and not compact_masks):
        return type(self).forward(self, x, *args, **kwargs)
    base, lora_a, lora_b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
    dtype = torch.get_autocast_dtype(x.device.type)
    output_dtype = output_dtype or dtype
    return _LoraLinear.apply(
        x, base.weight, base.bias, lora_a, lora_b, self.scaling[name], p, dtype, output_dtype, recast
    )


def _plain_adapter(self: nn.Module, x: torch.Tensor) -> str | None:
    """The one active adapter of LoRA layer `self` if `_LoraLinear` computes what peft would (to rounding), else
    None."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or self.disable_adapters or self.merged:
        return None
    active = [name for name in self.active_adapters if name in self.lora_A]
    if len(active) != 1 or active[0] in self.lora_variant:  # DoRA and other variants have their own forward
        return None
    name = active[0]
    base, lora_a, lora_b, dropout = self.base_layer, self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
    frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
    plain = type(lora_a) is type(lora_b) is nn.Linear and lora_a.bias is None and lora_b.bias is None
    drops = type(dropout) is nn.Identity or (type(dropout) is nn.Dropout and not dropout.inplace)
    return name if frozen and plain and drops and base.weight.device == x.device else None


class _LoraLinear(torch.autograd.Function):
    """x @ W.T + bias + scaling * dropout(x) @ A.T @ B.T, the frozen product in `dtype` as `_FrozenLinear`
    computes it, the adapter's delta added to it in `output_dtype`.

    Dropout masks the bf16 copy of x that the adapter multiplies, and its 1 / (1 - p) joins the adapter's scaling.
    Saved for backward: the frozen weight itself (`recast`) or its bf16 copy, the mask as booleans, the masked
    input in bf16 (what autocast would keep for A's gradient), and the adapter's small intermediate.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, p, dtype, output_dtype, recast):
        with torch.autocast(x.device.type, enabled=False):
            shape = x.shape
            xb = x.reshape(-1, shape[-1]).to(dtype)
            w = weight.to(dtype)
            out = F.linear(xb, w, None if bias is None else bias.to(dtype)).to(output_dtype)
            keep = None
            if p > 0:
                keep, p = _keep_mask(xb, p)
                xb = xb * keep.view(torch.uint8)  # a multiply by 0/1 bytes is twice as fast as where() with booleans
            scale = scaling / (1 - p)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            h = xb @ a.T
            out.addmm_(h.to(output_dtype), lora_b.to(output_dtype).T, alpha=scale)
        need_x, need_a, need_b = (ctx.needs_input_grad[i] for i in (0, 3, 4))
        ctx.save_for_backward(
            (weight if recast else w) if need_x else None,
            xb if need_a else None,
            keep if need_x else None,
            h if need_b else None,
            a if need_x else None,
            b if need_x or need_a else None,
        )
        ctx.dtype, ctx.scale, ctx.x_shape, ctx.x_dtype = dtype, scale, shape, x.dtype
        ctx.adapter_dtypes = lora_a.dtype, lora_b.dtype
        return out.view(*shape[:-1], out.size(-1))

    @staticmethod
    def backward(ctx, grad):
        weight, xb, keep, h, a, b = ctx.saved_tensors
        need_x, need_a, need_b = (ctx.needs_input_grad[i] for i in (0, 3, 4))
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.size(-1)).to(ctx.dtype)
            # d loss / d h, with dropout's and the adapter's scale: h = masked x @ A.T, delta = scale * h @ B.T.
            grad_h = (g @ b).float().mul_(ctx.scale).to(ctx.dtype) if need_x or need_a else None
            grad_a = (grad_h.T @ xb).to(ctx.adapter_dtypes[0]) if need_a else None
            grad_b = (g.T @ h).float().mul_(ctx.scale).to(ctx.adapter_dtypes[1]) if need_b else None
            grad_x = None
            if need_x:
                grad_x = (g @ weight.to(ctx.dtype)).to(ctx.x_dtype)
                through_adapter = grad_h @ a
                grad_x.add_(through_adapter if keep is None else through_adapter.mul_(keep.view(torch.uint8)))
                grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None, None
