"""The `llmtune` command. Each command module turns its options into one library call.

Library modules (torch, transformers, trl) are imported inside command bodies so `llmtune --help`
answers instantly.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from llmtune.cli import chat, data, evaluate, export, finetune, generate, merge, plan, push, recipes, serve, validate

app = typer.Typer(
    name="llmtune",
    help="Fine-tune, evaluate and merge Hugging Face language models from one recipe YAML.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    epilog="Example: llmtune finetune recipes/quickstart.yaml && llmtune eval runs/quickstart --compare-base",
)
_state = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
) -> None:
    _state["debug"] = debug
    if not debug:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """Keep the terminal to our own lines and the progress bar; --debug shows the libraries' warnings."""
    import logging
    import os
    import warnings

    warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Weight loading/writing bars; the Trainer's own progress bar is separate and stays.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # bitsandbytes logs a missing optional CPU kernel at import; it falls back to its own, so say nothing.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


app.command("finetune")(finetune.finetune)
app.command("eval")(evaluate.evaluate)
app.command("merge-adapter")(merge.merge_adapter)
app.command("generate")(generate.generate)
app.command("chat")(chat.chat)
app.command("export")(export.export)
app.command("push")(push.push)
app.command("validate")(validate.validate)
app.command("plan")(plan.plan)
app.command("init")(recipes.init)
app.command("serve")(serve.serve)
app.add_typer(data.app, name="data")
app.add_typer(recipes.app, name="recipes")


def main() -> None:
    from llmtune.errors import LLMTuneError, first_line

    try:
        app()
    except LLMTuneError as e:
        if _state["debug"]:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # anything unexpected still gets one line; --debug shows where it came from
        if _state["debug"]:
            raise
        print(f"error: {type(e).__name__}: {first_line(e)} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
