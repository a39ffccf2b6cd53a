"""Token rows into padded tensors: for training (the collator) and for every batched forward pass at eval time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from llmtune.data import IGNORE_INDEX


def pad_batch(
    rows: list[list[int]], value: int, left: bool, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        attn[i, span] = 1
    return ids.to(device), attn.to(device)


def pad_rows(pad_token_id: int) -> Callable:
    """Right-pad a batch of tokenized rows; padded labels are -100, so padding never carries loss."""

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, attention = pad_batch([r["input_ids"] for r in rows], pad_token_id, left=False)
        labels, _ = pad_batch([r["labels"] for r in rows], IGNORE_INDEX, left=False)
        return {"input_ids": ids, "attention_mask": attention, "labels": labels}

    return collate


def padded_batches(
    input_ids: list[list[int]],
    batch_size: int,
    pad_token_id: int,
    device: torch.device | str,
    labels: list[list[int]] | None = None,
    left: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Consecutive batches of `batch_size` rows on `device`: (input_ids, attention_mask, labels or None).

    Right-padded unless `left` (generation continues each prompt from its last token); labels are padded with -100.
    """
    for start in range(0, len(input_ids), batch_size):
        ids, attn = pad_batch(input_ids[start : start + batch_size], pad_token_id, left=left, device=device)
        lab = None
        if labels is not None:
            lab, _ = pad_batch(labels[start : start + batch_size], IGNORE_INDEX, left=left, device=device)
        yield ids, attn, lab
