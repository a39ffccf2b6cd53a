from typing import Annotated

import typer


def generate(
    target: Annotated[
        str, typer.Argument(help="A run directory, or a model reference (hub id, dir, builtin:, tiny:).")
    ],
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 means greedy decoding.")] = 0.0,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Sample from the smallest set with this total probability.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the chat template.")] = False,
) -> None:
    """Complete a prompt with a tuned run or any model; a classifier run prints the label and its probabilities.

    Example: llmtune generate runs/quickstart "Write the date 5 March 2021 in ISO format."
    """
    from llmtune.generation import Sampling, complete

    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    typer.echo(complete(target, prompt, sampling, raw=raw))
