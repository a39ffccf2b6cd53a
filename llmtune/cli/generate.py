from pathlib import Path
from typing import Annotated

import typer


def generate(
    target: Annotated[
        str, typer.Argument(help="A run directory, or a model reference (hub id, dir, builtin:, tiny:).")
    ],
    prompt: Annotated[str | None, typer.Argument(help="The user message (or give --input).")] = None,
    input_path: Annotated[
        Path | None,
        typer.Option("--input", help="A JSONL file, one {'prompt': ...} or {'messages': [...]} a line."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", help="JSONL file for --input: each row plus prediction, finish_reason and tokens."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows generated together with --input.")] = 8,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start --output over instead of continuing after its last row.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 means greedy decoding.")] = 0.0,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Sample from the smallest set with this total probability.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    num_beams: Annotated[
        int,
        typer.Option(min=1, help="Beam search over this many candidates (1: none); with --temperature, beam sampling."),
    ] = 1,
    repetition_penalty: Annotated[
        float | None,
        typer.Option(help="Divide the score of tokens already in the text by this; above 1 discourages repeats."),
    ] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Do not apply the chat template (to prompts, not messages).")
    ] = False,
) -> None:
    """Complete a prompt, or a file of prompts, with a tuned run or any model; a classifier run prints the label
    and its probabilities, a token-classify run each word with its tag (word/TAG).

    Example: llmtune generate runs/quickstart "Write the date 5 March 2021 in ISO format."

    Example: llmtune generate runs/quickstart --input prompts.jsonl --output completions.jsonl
    """
    from llmtune.errors import LLMTuneError
    from llmtune.generation import Sampling, complete, generate_file

    if (prompt is None) == (input_path is None):
        raise LLMTuneError(
            "give either a PROMPT or --input FILE, not both" if prompt else "give a PROMPT or --input FILE"
        )
    if input_path is None and (output is not None or overwrite):
        raise LLMTuneError("--output and --overwrite go with --input FILE; a single PROMPT's answer is printed")
    if input_path is not None and output is None:
        raise LLMTuneError("--input needs --output FILE for the completions")
    sampling = Sampling(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        num_beams=num_beams,
        repetition_penalty=repetition_penalty,
    )
    if input_path is None:
        typer.echo(complete(target, prompt, sampling, raw=raw))
        return
    report = generate_file(target, input_path, output, sampling, batch_size, raw=raw, overwrite=overwrite)
    kept = f" after the {report.resumed} already there" if report.resumed else ""
    typer.echo(f"wrote {report.written} rows to {report.output}{kept}; {report.rows} rows in all")
