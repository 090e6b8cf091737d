"""Exceptions shared across the package."""


class InputError(ValueError):
    """Bad user input (files, folders, arguments). The message names the offending file or argument and the problem;
    the CLI prints it without a traceback and exits with status 1."""
