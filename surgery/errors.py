"""The one exception type surgery raises for bad input."""


class SurgeryError(Exception):
    """A problem with the user's input, stated in one line with how to fix it.

    The CLI prints the message without a traceback and exits with code 2.
    """


def one_line(e: BaseException) -> str:
    """The first line of a library's exception message (its type name if it has none), for our one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
