"""User-facing errors: one clear message naming the file, axis or value."""

from __future__ import annotations


class VoxelmillError(Exception):
    """An error caused by the user's input or options.

    The CLI prints the message without a traceback and exits with code 2.
    """


class InputError(VoxelmillError):
    """The input file is missing, unreadable, corrupt or of an unsupported format."""


class OptionError(VoxelmillError):
    """A command-line option or parameter has an invalid value."""


class DestinationError(VoxelmillError):
    """The destination exists (without ``overwrite``) or cannot be written."""
