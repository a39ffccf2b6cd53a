"""Cross-entropy over the loss-bearing tokens only, without materialising the logits of any other token.

A causal LM's output head maps every position to a vocabulary-sized row of logits (49k for SmolLM2), yet
in instruction tuning most positions are prompt tokens whose label is -100. `TargetedLoss` lets the model
run its blocks as usual, takes the last hidden states from the head's input, and applies the head only at
the positions whose next token carries loss, `chunk_size` rows at a time. For a plain linear head the
gradient is computed chunk by chunk during the forward pass (so no chunk's logits are kept for backward);
other heads (LoRA on lm_head, modules_to_save) are applied chunk by chunk under autograd.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmtune.data import IGNORE_INDEX

_CHUNK_BYTES, _CHUNK_ROWS = 24 << 20, 1024


class TargetedLoss:
    """Per-batch loss for a causal LM that applies the output head only where a label is set."""

    def __init__(self, model: nn.Module, chunk_size: int | None = None) -> None:
        self.head = model.get_output_embeddings()
        self.chunk_size = chunk_size
        self._capture = False
        self._hidden: torch.Tensor | None = None
        self.head.register_forward_pre_hook(self._take_hidden_states)

    def _take_hidden_states(self, module: nn.Module, args: tuple[Any, ...]):
        if not self._capture:
            return None  # generation and evaluation use the head as usual
        self._hidden = args[0]
        # Zero positions: the model's own head call costs nothing and its forward returns empty logits.
        return (args[0][:, :0], *args[1:])

    def __call__(self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items: Any = None) -> torch.Tensor:
        """Summed NLL of every label that is not -100, divided by `num_items` (default: their count).

        The model is called through whatever wraps it (DDP, FSDP, peft), so those wrappers work unchanged.
        """
        labels = inputs["labels"]
        hidden = self.hidden_states(model, inputs)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if "position_ids" in inputs and labels.size(0) == 1:
            # A padding-free pack: the last token of one row must not predict the first token of the next.
            keep &= inputs["position_ids"][:, 1:] != 0
        states, targets = hidden[:, :-1][keep], targets[keep]
        total = summed_nll(self.head, states, targets, self.chunk_size or self.chunk_rows(states))
        count = keep.sum() if num_items is None else num_items
        return total / torch.as_tensor(count, device=total.device).clamp(min=1)

    def hidden_states(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's inputs at the positions of the labels, from a forward that skips the head itself."""
        self._capture = True
        try:
            model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
        finally:
            self._capture = False
        hidden, self._hidden = self._hidden, None
        # Prompt tuning and p-tuning put their virtual tokens in front; the labels cover the real tokens.
        return hidden[:, -inputs["labels"].size(1) :]

    def chunk_rows(self, states: torch.Tensor, gpu: bool | None = None) -> int:
        """Rows a chunk: on the CPU, with a frozen head, few enough that their float32 logits stay under glibc's
        largest mmap threshold (32 MiB) and reuse freed heap memory; larger blocks are mapped afresh and
        page-faulted in on every chunk (SmolLM2, 1,000 rows of loss: 0.61-0.65 s forward and backward at 1,024
        rows a chunk, 0.50-0.55 s at 128). A trained head's gradient is vocabulary-sized whatever the chunk,
        and a GPU wants large matmuls. `gpu` says where the rows compute when `states` cannot (fake tensors)."""
        vocab = getattr(self.head, "out_features", None)
        weight = getattr(self.head, "weight", None)
        trained = weight is not None and weight.requires_grad
        if (states.device.type != "cpu" if gpu is None else gpu) or trained or not isinstance(vocab, int):
            return _CHUNK_ROWS
        return max(16, min(_CHUNK_ROWS, _CHUNK_BYTES // (4 * vocab)))


def summed_nll(head: nn.Module, states: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    if type(head) is nn.Linear:
        return _LinearCrossEntropy.apply(states, head.weight, head.bias, targets, chunk_size)
    total = states.new_zeros((), dtype=torch.float32)
    for start in range(0, states.size(0), chunk_size):
        logits = head(states[start : start + chunk_size]).float()
        total = total + nn.functional.cross_entropy(logits, targets[start : start + chunk_size], reduction="sum")
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(states_i @ weight.T + bias, targets_i), with its gradients computed chunk by chunk in forward.

    The matmuls run in the autocast dtype when autocast is on (as the head would), softmax and the sums in
    float32, so the result matches `cross_entropy(head(states).float(), targets, reduction="sum")`.
    """

    @staticmethod
    def forward(ctx, states, weight, bias, targets, chunk_size):
        device = states.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else states.dtype
        need_states, need_weight = states.requires_grad, weight.requires_grad
        need_bias = bias is not None and bias.requires_grad
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            grad_states = torch.zeros_like(states, dtype=torch.float32) if need_states else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
            total = torch.zeros((), dtype=torch.float32, device=states.device)
            for start in range(0, states.size(0), chunk_size):
                h = states[start : start + chunk_size].to(dtype)
                y = targets[start : start + chunk_size]
                logits = (h @ w.T if b is None else torch.addmm(b, h, w.T)).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                # d(sum CE)/d logits = softmax - one_hot(target)
                grad_logits = torch.exp(logits - lse[:, None], out=logits)
                grad_logits[torch.arange(y.size(0), device=y.device), y] -= 1
                g = grad_logits.to(dtype)
                if need_states:
                    grad_states[start : start + chunk_size] = (g @ w).float()
                if need_weight:
                    grad_weight += (g.T @ h).float()
                if need_bias:
                    grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_states, grad_weight, grad_bias)
        ctx.dtypes = (states.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True):
            grads.append(None if grad is None else (grad * grad_total).to(dtype))
        return (*grads, None, None)
