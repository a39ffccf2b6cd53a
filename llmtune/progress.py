"""Progress bars for the passes users wait on outside training: eval's scoring and `generate --input`.

The scoring loops (perplexity, generation, rewards, class probabilities) also run where no bar belongs: inside
training (GRPO's reward model), behind `serve`, for one `generate` prompt. So a loop shows a bar only while
`evaluate` has named the model it is scoring (`scoring("tuned")`); anywhere else `rows` hands back a no-op.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

_model: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmtune_scoring", default=None)


@contextlib.contextmanager
def scoring(model: str) -> Iterator[None]:
    """Show the bars of the passes run inside, labelled with `model` (tuned, base, teacher)."""
    token = _model.set(model)
    try:
        yield
    finally:
        _model.reset(token)


@contextlib.contextmanager
def rows(total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A function to call with the rows each batch finished: a bar `MODEL WHAT` inside `scoring`, else a no-op."""
    model = _model.get()
    if model is None:
        yield lambda n: None
        return
    with bar(total, f"{model} {what}") as advance:
        yield advance


@contextlib.contextmanager
def bar(total: int, desc: str, initial: int = 0) -> Iterator[Callable[[int], None]]:
    """A tqdm bar on stderr counting rows (rows/s and ETA), as finetune's bar; it ends at total/total."""
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=initial, desc=desc, unit="row", dynamic_ncols=True) as line:
        yield line.update
