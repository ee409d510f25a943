"""The errors edgekit raises for input the user can fix, under one root.

The CLI prints an EdgekitError as one line (exit code 2); anything else is a bug and keeps
its traceback. Both sides import this module: it imports nothing.
"""


class EdgekitError(Exception):
    """A mistake in the user's input, files or settings, said in one line with what to do."""


class ExportError(EdgekitError):
    """A model, adapter, option or target the exporter cannot use (host side)."""
