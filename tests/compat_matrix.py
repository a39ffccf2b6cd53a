"""The compatibility matrix of tuning methods x features (issue 3), kept as data.

Every cell is "tested" (tests/integration/test_compat.py trains that combination), "refused" (a one-line LLMTuneError
says why; test_compat.py triggers it) or "n/a" (the combination does not exist; the note says why, and
test_compat.py checks what it can of that). README.md carries `render()`'s output between the lines
`<!-- compat-matrix:start -->` and `<!-- compat-matrix:end -->`; `python tests/compat_matrix.py` prints it.

This module imports nothing from llmtune or torch, so printing the table is instant.
"""

from __future__ import annotations

TESTED, REFUSED, NA = "tested", "refused", "n/a"
STATUSES = (TESTED, REFUSED, NA)

# feature id -> column title
FEATURES: dict[str, str] = {
    "sft": "SFT",
    "grad_ckpt": "gradient checkpointing",
    "packing": "packing",
    "padding_free": "padding-free batches",
    "qlora_base": "QLoRA base",
    "merge": "merge",
    "distributed": "distributed",
}

_QUANT_ADAPTER = "a 4-bit/8-bit base comes with method `qlora` (LoRA over it); a recipe names one method"
_QUANT_OWN = (
    "trains and saves the model's own weights, which a quantized base stores in 4/8 bits; "
    "a quantized base comes only with method `qlora`"
)
_STANDALONE = "the run saves a standalone model already; `merge-adapter` says so and merges nothing"
_NO_MERGE = (
    "learns virtual tokens, not a weight change: `merge-adapter` refuses (at merge time) and says to serve "
    "the run directory with `generate` / `eval`"
)
_NONLINEAR = (
    "adapter layers with a non-linearity, not a linear weight change: `merge-adapter` refuses (at merge time) "
    "and says to serve the run directory with `generate` / `eval`, which re-insert the adapters"
)
_PACK = "virtual tokens go in front of each sequence: in a pack only the first row would get them"
_FLAT = (
    "virtual tokens go in front of each sequence: rows end to end would share one set; "
    "`speed.padding_free: auto` pads these rows"
)
_PREFIX_GC = "prefixes reach the layers through the key/value cache, which gradient checkpointing switches off"
_DEQUANT = "the 4-bit base is dequantized to the compute dtype, then merged"
_BIASES = "on tiny:gpt2 (Llama has no biases)"
_TIED = "on tiny:gpt2, whose head is tied to the input embeddings (untied and trained alone)"


def _row(**cells: tuple[str, str]) -> dict[str, tuple[str, str]]:
    row = {feature: (TESTED, "") for feature in FEATURES}
    row.update(cells)
    return row


MATRIX: dict[str, dict[str, tuple[str, str]]] = {
    "lora": _row(qlora_base=(NA, _QUANT_ADAPTER)),
    "qlora": _row(sft=(TESTED, "NF4 base through bitsandbytes, on CPU"), merge=(TESTED, _DEQUANT)),
    "dora": _row(qlora_base=(NA, _QUANT_ADAPTER)),
    "ia3": _row(qlora_base=(NA, _QUANT_ADAPTER)),
    "prefix": _row(
        grad_ckpt=(REFUSED, _PREFIX_GC),
        packing=(REFUSED, _PACK),
        padding_free=(REFUSED, _FLAT),
        qlora_base=(NA, _QUANT_ADAPTER),
        merge=(REFUSED, _NO_MERGE),
    ),
    "prompt": _row(
        packing=(REFUSED, _PACK),
        padding_free=(REFUSED, _FLAT),
        qlora_base=(NA, _QUANT_ADAPTER),
        merge=(REFUSED, _NO_MERGE),
    ),
    "p-tuning": _row(
        packing=(REFUSED, _PACK),
        padding_free=(REFUSED, _FLAT),
        qlora_base=(NA, _QUANT_ADAPTER),
        merge=(REFUSED, _NO_MERGE),
    ),
    "adapter": _row(qlora_base=(NA, _QUANT_ADAPTER), merge=(REFUSED, _NONLINEAR)),
    "bitfit": _row(sft=(TESTED, _BIASES), qlora_base=(NA, _QUANT_OWN), merge=(NA, _STANDALONE)),
    "head": _row(sft=(TESTED, _TIED), qlora_base=(NA, _QUANT_OWN), merge=(NA, _STANDALONE)),
    "layers": _row(qlora_base=(NA, _QUANT_OWN), merge=(NA, _STANDALONE)),
    "full": _row(qlora_base=(NA, _QUANT_OWN), merge=(NA, _STANDALONE)),
}

LEGEND = (
    "**tested**: `tests/integration/test_compat.py` trains the combination for 2 steps on a tiny model and checks "
    "that every trainable weight moved (merge: `merge-adapter` on that run reproduces its logits; distributed: 2 CPU "
    "processes, gloo DDP under torchrun, replicas identical after training). "
    "**refused**: a one-line error says why, from recipe validation before any model loads unless the note "
    "says otherwise. **n/a**: the combination does not exist; the note says why."
)


def render() -> str:
    """The matrix as a markdown table, its legend and numbered notes (identical notes share a number)."""
    notes: list[str] = []
    header = ["method", *FEATURES.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, row in MATRIX.items():
        cells = [f"`{method}`"]
        for feature in FEATURES:
            status, note = row[feature]
            if note:
                if note not in notes:
                    notes.append(note)
                status = f"{status} [{notes.index(note) + 1}]"
            cells.append(status)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", LEGEND, ""]
    lines += [f"{i}. {note[0].upper()}{note[1:]}." for i, note in enumerate(notes, 1)]
    lines += [
        "",
        "Generated by `python tests/compat_matrix.py`; `tests/integration/test_compat.py` and "
        "`tests/distributed/test_compat_ddp.py` prove every cell.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
