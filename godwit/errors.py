"""Errors that reach an operator as one line of text."""


class GodwitError(Exception):
    """A failure with a message fit to show an operator as is."""


class NotFound(GodwitError):
    """A container, host or migration that does not exist."""


class Conflict(GodwitError):
    """The request clashes with existing state (name taken, wrong container state)."""
