from typing import Annotated

import typer


def serve(
    target: Annotated[
        str, typer.Argument(help="A run directory, or a model reference (hub id, dir, builtin:, tiny:).")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 accepts other machines.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    max_batch_size: Annotated[
        int, typer.Option(help="Most completions (all requests' choices together) generated as one batch.")
    ] = 16,
) -> None:
    """Serve a tuned run or any model over an OpenAI-compatible HTTP API until interrupted.

    Example: llmtune serve runs/quickstart --port 8000
    """
    from llmtune.serve import serve as run_server

    run_server(target, host=host, port=port, max_batch_size=max_batch_size, announce=typer.echo)
