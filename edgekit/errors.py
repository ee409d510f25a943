"""The errors edgekit raises for input the user can fix, under one root.

The CLI prints an EdgekitError as one line (exit code 2); anything else is a bug and keeps
its traceback. Both sides import this module: it imports nothing.

    EdgekitError
    ├── UserError            a mistake on the command line
    ├── ExportError          a model, adapter, option or target the exporter cannot use (host)
    ├── BundleError          a bundle that is missing, altered, damaged or from a newer edgekit
    ├── InputError           a prompt, request or setting the runtime cannot use (also a ValueError)
    │   └── ContextLengthError, ChatFormatError, ConstraintError, ProtocolError,
    │       TargetError, BenchError, EvalTextError
    ├── JournalError         the MQTT service's journal is damaged
    └── RequestError         an MQTT request the device answered with an error
"""


class EdgekitError(Exception):
    """A mistake in the user's input, files or settings, said in one line with what to do."""


class UserError(EdgekitError):
    """A mistake on the command line (a flag that cannot work, or two that do not go together)."""


class ExportError(EdgekitError):
    """A model, adapter, option or target the exporter cannot use (host side)."""


class InputError(EdgekitError, ValueError):
    """A prompt, message or setting the runtime cannot use (a ValueError too, for callers that catch those)."""
