from pathlib import Path
from typing import Annotated

import typer


def export(
    target: Annotated[
        str, typer.Argument(help="A run directory, a merged directory or a model reference (hub id, dir, builtin:).")
    ],
    format: Annotated[
        str, typer.Option("--format", help="Output format; gguf (llama.cpp, Ollama, LM Studio).")
    ] = "gguf",
    quant: Annotated[
        str, typer.Option(help="f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0; norms and biases stay f32.")
    ] = "q8_0",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="The .gguf file; default RUN/export/model-QUANT.gguf for a run, else ./NAME-QUANT.gguf."
        ),
    ] = None,
    ollama: Annotated[
        bool, typer.Option("--ollama", help="Also write an Ollama Modelfile (template, stop tokens) next to it.")
    ] = False,
    tolerance: Annotated[
        float | None,
        typer.Option(help="Largest allowed max |logit diff| against the merged model; default per quantization."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file.")] = False,
) -> None:
    """Write a run or model as one GGUF file, merged and quantized, and check it by reading it back.

    Example: llmtune export runs/quickstart --quant q8_0 --ollama
    """
    from llmtune.errors import LLMTuneError
    from llmtune.export import export_gguf

    if format != "gguf":
        raise LLMTuneError(f"--format {format}: unsupported; supported: gguf")
    result = export_gguf(target, out, quant, ollama=ollama, overwrite=overwrite, tolerance=tolerance)
    typer.echo(f"exported {result.out} ({result.size_bytes / 1e6:.1f} MB, {result.quant})")
    if result.modelfile is not None:
        typer.echo(f"wrote {result.modelfile}; run: ollama create NAME -f {result.modelfile}")
