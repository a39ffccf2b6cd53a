"""The `model_options:` section: how the model and its tokenizer are read, for every command that loads them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmtune.recipe.common import Spec

# transformers' own names (its AttentionInterface), and auto for the model's default.
ATTENTION_IMPLEMENTATIONS = (
    "auto",
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "flex_attention",
)
# The implementations llmtune's per-row and float32 attention build on (llmtune/accel/attention.py).
SDPA_ATTENTION = ("auto", "sdpa")


def is_gguf_ref(ref: str) -> bool:
    """Whether a model reference names a local GGUF file (a hub id does not end in .gguf)."""
    return ref.lower().endswith(".gguf")


class ModelOptionsSpec(Spec):
    trust_remote_code: bool = Field(
        False,
        description="run the Python code a checkpoint ships for an architecture transformers does not have "
        "(`auto_map` in its config.json); that code runs with your permissions, so only for a repository you trust",
    )
    revision: str | None = Field(
        None,
        description="branch, tag or commit of a hub model to download, for the model and, unless `tokenizer` names "
        "another, its tokenizer; a commit hash pins the exact weights a run trained from",
    )
    attn_implementation: Literal[ATTENTION_IMPLEMENTATIONS] = Field(
        "auto",
        description="how attention is computed: auto = transformers' default for the model (sdpa where it has it); "
        "eager is the reference and slowest; flash_attention_2/3/4 need a CUDA GPU and the flash-attn package; "
        "llmtune's per-row attention for padding-free batches and speed.float32_attention work through sdpa only",
    )
