"""The one exception the command line turns into a message (and exit status 2) instead of a trace."""


class CLIError(ValueError):
    """Bad input: the message says what to change. A ValueError, for the Python API (`routeformer.load`)."""
