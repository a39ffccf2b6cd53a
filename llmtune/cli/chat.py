from typing import Annotated

import typer


def chat(
    target: Annotated[
        str, typer.Argument(help="A run directory, or a model reference (hub id, dir, builtin:, tiny:).")
    ],
    system: Annotated[
        str | None, typer.Option(help="System message; default: the recipe's data.system_prompt, if any.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens in one answer.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 means greedy decoding.")] = 0.0,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Sample from the smallest set with this total probability.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed, set before each answer.")] = None,
) -> None:
    """Talk with a tuned run or any model in the terminal, formatted with its chat template; answers stream as
    they are generated. Commands: /reset, /system TEXT, /help, /exit.

    Example: llmtune chat runs/quickstart
    """
    from llmtune.chat import chat as run_chat
    from llmtune.generation import Sampling

    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    run_chat(target, sampling, system)
