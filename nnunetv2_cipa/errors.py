"""Exceptions shared across the package."""


class InputError(ValueError):
    """Bad user input (files, folders, arguments). The message names the offending file or argument and the problem;
    the CLI prints it without a traceback and exits with status 1."""


class StageFailed(RuntimeError):
    """A console script that a command runs as one of its stages (the demo's) failed. The message names the stage,
    its exit status and its log; the CLI prints it without a traceback and exits with status 1."""
