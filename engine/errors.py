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


#: exit code of a run stopped by :class:`ClusterLost` (``EX_TEMPFAIL``: try again later),
#: so a batch script can tell "resubmit" from a user error (2) or a bug (1)
EXIT_CLUSTER_LOST = 75


class ClusterLost(RuntimeError):
    """The cluster had no worker able to run the blocks for longer than allowed (its SLURM
    jobs ended and no replacement started, or its workers died).

    Not the user's input: the partial outputs and their finished blocks are kept, and the
    same command resumes them. The CLI prints the message without a traceback and exits
    with :data:`EXIT_CLUSTER_LOST`.
    """


#: exit code of a run stopped by :class:`Terminated` (128 + SIGTERM, as a shell reports it)
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """The process was asked to stop with SIGTERM (a batch system's time limit, ``scancel``,
    ``kill``, a container being stopped).

    Handled as Ctrl-C is: running blocks are let finish, SLURM worker jobs are cancelled,
    partial outputs and their finished blocks are kept for the same command to resume.
    """
