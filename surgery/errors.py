"""The one exception type surgery raises for bad input."""


class SurgeryError(Exception):
    """A problem with the user's input, stated in one line with how to fix it.

    The CLI prints the message without a traceback and exits with code 2.
    """
