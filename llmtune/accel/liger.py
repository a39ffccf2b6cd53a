"""Liger's Triton kernels (the `gpu` extra) for the model families Liger supports: the GPU path of
`speed.fused_kernels`, in place of the CPU's own fused blocks."""

from __future__ import annotations

from torch import nn

# Liger's fused linear cross-entropy replaces the model's forward; speed.fused_loss already computes the loss
# without the other positions' logits, so only the layer kernels are taken.
KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "geglu": True}
NOT_TAKEN = {"cross_entropy": False, "fused_linear_cross_entropy": False}


def liger_families() -> frozenset[str]:
    """The `model_type`s Liger has kernels for; none without the gpu extra."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return frozenset()
    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def apply_liger(model: nn.Module) -> None:
    """Patch the transformers model under any peft wrapper with Liger's kernels (it ignores those its family
    has no use for, e.g. GeGLU for a SwiGLU model)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(model=base, **KERNELS, **NOT_TAKEN)
