"""User-facing errors: one clear message naming the file, axis or value."""

from __future__ import annotations

import errno


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


#: exit code of a run stopped by :class:`RunStopped` (``EX_TEMPFAIL``: try again later),
#: so a batch script can tell "resubmit" from a user error (2) or a bug (1)
EXIT_STOPPED = 75


class RunStopped(RuntimeError):
    """The run cannot go on for a reason outside its input and options: its cluster, its
    disk.

    The partial outputs and their finished blocks are kept, and the same command resumes
    them once the cause is gone. The CLI prints the message without a traceback and exits
    with :data:`EXIT_STOPPED`.
    """


class ClusterLost(RunStopped):
    """The cluster could not run the blocks: no worker for longer than allowed (its SLURM
    jobs ended and no replacement started, or its workers died), its scheduler gone, every
    worker paused at its memory limit, or workers ended by the blocks they ran."""


class DiskFull(RunStopped):
    """No space, or no quota, left on the file system a run writes to."""


#: the errors of a write that more space (or quota) would have let through
_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException, stage: str | None = None) -> DiskFull | None:
    """The :class:`DiskFull` for ``exc`` when it is an ``OSError`` of a full file system
    (``ENOSPC``) or an exceeded quota (``EDQUOT``) met by ``stage`` (a pass; None: the
    command itself), else None."""
    if not isinstance(exc, OSError) or exc.errno not in _FULL:
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    return DiskFull(f"{stage + ': ' if stage else ''}{exc.strerror}{where}: free some space "
                    "(or raise your quota), then run the same command again (a resumable run "
                    "goes on from its finished blocks)")


#: exit code of a run stopped by :class:`Terminated` (128 + SIGTERM, as a shell reports it)
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """The process was asked to stop with SIGTERM (a batch system's time limit, ``scancel``,
    ``kill``, a container being stopped).

    Handled as Ctrl-C is: running blocks are let finish, SLURM worker jobs are cancelled,
    partial outputs and their finished blocks are kept for the same command to resume.
    """
