"""Attention during training: per-row attention over padding-free batches, and float32 attention on the CPU.

Padding-free batches (`speed.padding_free`, and packing) put a batch's rows end to end in one sequence, with
position ids restarting at each row and the row boundaries in `cu_seq_lens_q`. Through plain sdpa,
transformers derives a block-diagonal mask from the position ids and attends over the whole sequence with
it: 8 rows of 280 tokens cost attention over 2,240 x 2,240 positions instead of 8 x 280 x 280. Here each row
attends on its own, with the causal kernel and no mask: the padded batch's attention without the padding.

On the CPU, autocast runs sdpa in bf16, and PyTorch's CPU flash-attention kernel is slower in bf16 than in
float32 (forward and backward, 8 x 9 heads x 64 dims: 12.5 ms against 4.8 ms at 66 tokens, 60 against 49 ms
at 280, equal at 512). The float32 variant computes attention outside autocast: faster there, and exact.

On a GPU, where PyTorch has it, the rows go to its variable-length flash-attention kernel in one call
(`torch.nn.attention.varlen`) instead of one sdpa call per row.
"""

from __future__ import annotations

import functools
import inspect
from itertools import pairwise

import torch
from torch import nn

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    # Its keywords changed between releases: the first took no scale, is_causal became window_size, and
    # enable_gqa came later.
    _VARLEN_KEYWORDS = frozenset(inspect.signature(_varlen_attn).parameters)
except ImportError:
    _varlen_attn, _VARLEN_KEYWORDS = None, frozenset()
VARLEN_DEVICES = ("cuda",)  # where PyTorch's varlen kernel runs

SEGMENTED_SDPA = "llmtune_sdpa"
SEGMENTED_SDPA_FLOAT32 = "llmtune_sdpa_float32"


def use_segmented_attention(model: nn.Module, float32: bool) -> bool:
    """Switch a model that attends through transformers' sdpa to `_segmented_sdpa`; returns whether it switched.

    The names are registered with sdpa's own mask builder, so a padded batch is masked exactly as before.
    transformers does not save the implementation's name with the model."""
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = _unwrapped(model)
    if not isinstance(base, PreTrainedModel) or base.config._attn_implementation != "sdpa":
        return False
    name = SEGMENTED_SDPA_FLOAT32 if float32 else SEGMENTED_SDPA
    AttentionInterface.register(name, _segmented_sdpa_float32 if float32 else _segmented_sdpa)
    AttentionMaskInterface.register(name, sdpa_mask)
    base.set_attn_implementation(name)
    return True


def attends_per_row(model: nn.Module) -> bool:
    """Whether `model` attends through `_segmented_sdpa`, or will once `use_segmented_attention` switches it."""
    base = _unwrapped(model)
    return getattr(getattr(base, "config", None), "_attn_implementation", None) in (
        "sdpa",
        SEGMENTED_SDPA,
        SEGMENTED_SDPA_FLOAT32,
    )


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper, or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _segmented_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    # A sliding window needs the mask transformers built; rows of a padded batch need nothing more.
    if bounds is None or query.size(0) != 1 or kwargs.get("sliding_window") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("cu_seq_lens_k", None)
    if _varlen_runs(query) and kwargs.get("max_length_q") and not kwargs.get("dropout"):
        device = query.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
        if dtype in (torch.float16, torch.bfloat16):
            return _varlen(module, query, key, value, bounds, dtype, **kwargs), None
    bounds = _bounds_list(bounds)
    rows = [
        sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, **kwargs)[0]
        for s, e in pairwise(bounds)
    ]
    # The collator pads the flattened batch to a multiple only when asked; those positions attend to nothing.
    if bounds[-1] < query.size(2):
        rows.append(query.new_zeros(1, query.size(2) - bounds[-1], query.size(1), query.size(3)))
    return torch.cat(rows, dim=1), None


def _varlen_runs(query: torch.Tensor) -> bool:
    """Whether PyTorch's varlen kernel takes `query`: flash attention wants head dims up to 256 and, on NVIDIA
    GPUs, compute capability 8.0 (Ampere) or newer."""
    if "scale" not in _VARLEN_KEYWORDS or query.device.type not in VARLEN_DEVICES or query.size(-1) > 256:
        return False
    return query.device.type != "cuda" or _capability(query.device.index or 0) >= (8, 0)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _varlen(module, query, key, value, bounds, dtype, max_length_q, scaling=None, is_causal=None, **_):
    """Attention within each row of a flattened batch, one kernel for all rows."""
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # (tokens, heads, head dim)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    options = {"scale": scaling}
    if "window_size" in _VARLEN_KEYWORDS:
        options["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        options["is_causal"] = causal
    if k.size(1) != q.size(1):
        if "enable_gqa" in _VARLEN_KEYWORDS:
            options["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    bounds = bounds.to(query.device, torch.int32)
    longest = int(max_length_q)
    out = _varlen_attn(q, k, v, bounds, bounds, longest, longest, **options)
    return out.unsqueeze(0).to(query.dtype)


# Every layer of a forward pass gets the same boundaries tensor; reading one on a GPU waits for the GPU.
_last_bounds: list = [None, None]


def _bounds_list(bounds: torch.Tensor) -> list[int]:
    if _last_bounds[0] is not bounds:
        _last_bounds[:] = [bounds, bounds.tolist()]
    return _last_bounds[1]


def _segmented_sdpa_float32(module, query, key, value, attention_mask, **kwargs):
    # Additive masks and position biases (T5's) come in the autocast dtype; sdpa wants them in the query's.
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    if kwargs.get("position_bias") is not None:
        kwargs["position_bias"] = kwargs["position_bias"].float()
    with torch.autocast(query.device.type, enabled=False):
        out, weights = _segmented_sdpa(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights
