"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class LLMTuneError(Exception):
    """A problem the user can fix: bad recipe, missing file, unreachable hub, existing run directory.

    The message must be one line that names the file, key or row at fault and says what to do.
    """

    exit_code = 2


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, for wrapping library errors into one-line messages."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
