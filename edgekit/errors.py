"""Errors a user can act on. The CLI prints them as one line and exits with their code, never a traceback."""


class EdgekitError(Exception):
    """Base of every error the CLI reports as a one-line message."""

    exit_code = 1


class BadInput(EdgekitError):
    """The user gave something unusable: a malformed model, profile, file or flag (exit 2)."""

    exit_code = 2


class OperationFailed(EdgekitError):
    """The input was fine but the operation did not succeed, e.g. verification failed (exit 1)."""

    exit_code = 1
