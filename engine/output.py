"""Safe destinations and the one run lifecycle of every command that writes outputs.

An output is built in a hidden sibling ``.NAME.partial`` and renamed into place when
complete (:func:`commit`), so a crash never leaves a half-written ``NAME``.
:func:`output_run` is the lifecycle around it: lock every output, record the run's
provenance, resume the partial outputs of an interrupted run with the same identity or
start them afresh, remove them on a user error, and commit them with the provenance entry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import provenance
from engine.errors import DestinationError, VoxelmillError
from engine.io import readguard
from engine.runlock import output_lock
from engine.workerpaths import check_workers_see

if TYPE_CHECKING:
    from engine.runner import RunState


def made_by_voxelmill(folder: Path, manifests: Sequence[str] = ()) -> bool:
    """Whether ``folder`` is an output of voxelmill: a zarr group whose attributes carry
    voxelmill's provenance record, or an output folder holding one of ``manifests`` (the
    manifest the command that made it writes)."""
    for meta, inner in (("zarr.json", True), (".zattrs", False)):
        try:
            attrs = json.loads((folder / meta).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if inner:
            attrs = attrs.get("attributes", {}) if isinstance(attrs, dict) else {}
        vm = attrs.get("voxelmill") if isinstance(attrs, dict) else None
        if isinstance(vm, dict) and "provenance" in vm:
            return True
    return any((folder / m).is_file() and not (folder / m).is_symlink() for m in manifests)


def check_destination(dst: Path, overwrite: bool, source: Path | None = None, *,
                      sources: Sequence[Path] = (), file: bool = False,
                      manifests: Sequence[str] = (),
                      owned: Callable[[Path], bool] | None = None) -> None:
    """Refuse a destination that is not safe to write, and create its parent folder.

    Without ``overwrite`` an existing ``dst`` is refused. With it, ``dst`` is replaced only
    when voxelmill made it: a single file when the command writes a file (``file``), or a
    folder carrying voxelmill's record (:func:`made_by_voxelmill`) when it writes a folder.
    A foreign folder, a symbolic link, a folder holding an input or the current directory
    is refused whatever the options, with a message saying to remove it by hand.

    Parameters
    ----------
    dst : Path
        The destination the command will build (in its partial sibling) and commit.
    overwrite : bool
        The user's ``--overwrite``.
    source, sources : Path, sequence of Path
        The inputs; none may be ``dst`` or lie inside it.
    file : bool
        The command writes a single file (else a folder).
    manifests : sequence of str
        File names whose presence marks an output folder of this command as voxelmill's.
    owned : callable, optional
        A further test that a folder is this command's output (for outputs without a
        manifest); an empty folder holds nothing to lose and is always replaced.

    Raises
    ------
    DestinationError
        With one line naming ``dst`` and what to do.
    """
    dst = Path(dst)
    inputs = [Path(s) for s in ((source,) if source is not None else ())] + \
        [Path(s) for s in sources]
    for src in inputs:
        if dst.resolve() == src.resolve():
            raise DestinationError(f"{dst}: destination is the source; choose another path")
    if dst.is_symlink() and overwrite:
        # replacing a link would write through it or drop it: neither is voxelmill's to do
        raise DestinationError(f"{dst}: destination is a symbolic link; voxelmill does not "
                               "replace links: remove it by hand or choose another path")
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise DestinationError(f"{dst}: destination exists; pass --overwrite to replace it")
    if dst.exists():
        root = dst.resolve()
        for src in inputs:
            if src.resolve().is_relative_to(root):
                raise DestinationError(f"{dst}: destination holds the input {src}; "
                                       "choose another path")
        if Path.cwd().resolve().is_relative_to(root):
            raise DestinationError(f"{dst}: destination holds the current folder; "
                                   "choose another path")
        if dst.is_dir() and file:
            raise DestinationError(f"{dst}: destination is a folder, not a file; remove it "
                                   "by hand or choose another path")
        if not dst.is_dir() and not file:
            raise DestinationError(f"{dst}: destination is a file, not an output folder; "
                                   "remove it by hand or choose another path")
        if dst.is_dir() and next(dst.iterdir(), None) is not None \
                and not made_by_voxelmill(dst, manifests) and not (owned and owned(dst)):
            raise DestinationError(f"{dst}: destination was not made by voxelmill (it has no "
                                   "provenance record); --overwrite replaces only voxelmill's "
                                   "outputs: remove it by hand or choose another path")
    if not dst.parent.exists():
        missing = [p for p in (dst.parent, *dst.parent.parents) if not p.exists()]
        try:
            dst.parent.mkdir(parents=True)
        except OSError as exc:
            raise DestinationError(f"{dst.parent}: cannot create folder ({exc.strerror})") from None
        made_folders.update(missing)


#: Folders :func:`check_destination` created for destinations in this process; a run that
#: fails removes those left empty (:func:`remove_made_folders`), so it leaves nothing behind.
made_folders: set[Path] = set()


def remove_made_folders() -> None:
    """Remove the folders :func:`check_destination` created that are still empty, deepest
    first (one that now holds anything is kept)."""
    for folder in sorted(made_folders, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:
            continue
        made_folders.discard(folder)


#: the file that marks a scratch folder as voxelmill's (:func:`fresh_scratch`)
SCRATCH_MARK = ".voxelmill-scratch"


def is_scratch(folder: Path, legacy: Sequence[str] = ()) -> bool:
    """Whether ``folder`` is a scratch folder of voxelmill's: it holds the mark of
    :func:`fresh_scratch`, or one of ``legacy`` (what an older version put in it first)."""
    return any((folder / m).exists() for m in (SCRATCH_MARK, *legacy))


def fresh_scratch(folder: Path, *, keep: bool = False, legacy: Sequence[str] = ()) -> None:
    """Make ``folder`` a scratch folder for intermediate files, marked as voxelmill's.

    A scratch folder left by an earlier run (:func:`is_scratch`) is deleted first, unless
    ``keep`` (a run resuming from it); an empty folder is taken over. Anything else of
    that name is the user's: refused (:class:`DestinationError`), never deleted.
    """
    folder = Path(folder)
    if folder.is_symlink() or folder.exists() and not folder.is_dir() or folder.is_dir() \
            and next(folder.iterdir(), None) is not None and not is_scratch(folder, legacy):
        raise DestinationError(f"{folder}: voxelmill needs this name for its scratch folder, "
                               "and a file or folder not made by voxelmill has it: move it "
                               "away or choose another output path")
    if folder.is_dir() and not keep:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SCRATCH_MARK).touch()


def remove_scratch(folder: Path) -> None:
    """Delete the scratch folder ``folder`` (see :func:`fresh_scratch`) if it is one."""
    if Path(folder).is_dir() and not Path(folder).is_symlink() and is_scratch(Path(folder)):
        shutil.rmtree(folder, ignore_errors=True)


def check_output_name(name: str, example: str) -> None:
    """Refuse a ``--name`` that is not a plain file-system name (it becomes a folder)."""
    from engine.errors import OptionError

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
        raise OptionError(f"--name {name!r}: use a plain name such as {example!r} (letters, "
                          "digits, '_', '-', '.')")


def partial_path(dst: Path) -> Path:
    """Where an unfinished output lives: a hidden sibling, so a crash leaves no ``dst``."""
    return dst.parent / f".{dst.name}.partial"


def commit(partial: Path, dst: Path, client: Any = None) -> None:
    """Move a finished output into place, replacing ``dst`` only now that it is complete
    (the replaced one is deleted after, on the workers of ``client`` when given: see
    :func:`remove_tree`).

    Refused (:class:`InputError`) when an input this command read was replaced meanwhile
    (:func:`engine.io.readguard.check`): the output could mix its old and new data.
    Readers of ``dst`` in other commands detect the swap the same way.
    """
    readguard.release(partial)  # this command's own output: what it read there is its own
    readguard.check()
    holder = None
    if dst.exists():
        # the replaced output goes into a folder of a name no one else has (never a fixed
        # ".NAME.old", which could be the user's own file, or another run's)
        holder = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        try:
            dst.rename(holder / dst.name)
        except OSError:
            holder.rmdir()  # nothing moved: leave no empty folder behind
            raise
    partial.rename(dst)
    readguard.release(dst)  # replaced by this command itself: no longer what it read
    # this replacement's holder, and those of replacements killed before they emptied them
    for old in stale_holders(dst):
        remove_on_workers(old / dst.name, client)
        _delete(old)  # what is left


def stale_holders(dst: Path) -> list[Path]:
    """The hidden folders that replacements of ``dst`` killed before they deleted the old
    output left beside it: named as :func:`commit` names them (``.NAME.old-`` and the 8
    characters of :func:`tempfile.mkdtemp`), holding nothing but an entry ``NAME``. A
    folder holding anything else is not touched."""
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.old-[a-z0-9_]{{8}}")
    found = []
    for p in dst.parent.iterdir():
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink() \
                and [c.name for c in p.iterdir()] in ([], [dst.name]):
            found.append(p)
    return sorted(found)


def _delete(path: Path) -> None:
    """Delete the file or folder ``path``; errors show (unlike :func:`_remove`)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def commit_recorded(outputs: Sequence[tuple[Path, Path]], entry: dict[str, Any]) -> None:
    """Store the run's provenance ``entry`` in every finished ``(partial, dst)`` group, then
    move them all into place (provenance first, so no output is ever seen without it)."""
    for partial, _ in outputs:
        provenance.append(partial, [entry])
    for partial, dst in outputs:
        commit(partial, dst)


def create_multiscale(group: Path, name: str, axes: str, unit: str, chunks: Sequence[int],
                      levels: Sequence[Any], ngff: str, method: str, dtype: Any) -> list[str]:
    """Create the empty level arrays and the multiscales metadata of the NGFF image
    ``group`` (``levels`` from :func:`engine.pyramid.plan_levels`); return the level paths."""
    from engine.io import omezarr

    group.mkdir(parents=True, exist_ok=True)
    for i, lv in enumerate(levels):
        level_chunks = [min(c, s) for c, s in zip(chunks, lv.shape, strict=True)]
        omezarr.create_level(group, str(i), lv.shape, level_chunks, dtype, axes, ngff,
                             every_chunk_written=method != "mode")
    metas = [omezarr.LevelMeta(str(i), lv.scale, lv.translation) for i, lv in enumerate(levels)]
    omezarr.write_group_attrs(group, {"multiscales": [omezarr.multiscales(
        axes, unit, metas, name, ngff, method)]}, ngff)
    return [str(group / str(i)) for i in range(len(levels))]


def write_multiscale(client: Any, data: Any, group: Path, name: str, axes: str, unit: str,
                     chunks: Sequence[int], levels: Sequence[Any], ngff: str, method: str,
                     progress: Callable[[], Any] | None = None) -> None:
    """Write the lazy level-0 ``data`` and its pyramid (``levels`` from
    :func:`engine.pyramid.plan_levels`) as an NGFF multiscale image ``group``, blockwise."""
    from engine.pyramid import build_pyramid

    create_multiscale(group, name, axes, unit, chunks, levels, ngff, method, data.dtype)
    build_pyramid(client, data, group, list(levels), chunks, method=method, progress=progress,
                  name=f"{name}-pyramid")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


#: a folder is deleted on the workers when it splits into at least this many pieces
#: (chunk rows, shares of a folder's files: :func:`pieces`); fewer are deleted here
PARALLEL_PIECES = 8
#: a folder is cut into at least this many pieces (when it is deep enough), whatever the
#: threads, so that the sample timed here is a small part of it: on 2 workers a 512³ work
#: folder came in 8 pieces, a whole array's chunks one of them, and the sample of one piece
#: took 47 ms while every worker waited; the workers take the pieces a bundle per thread
MIN_PIECES = 64
#: how deep a folder is searched for pieces to hand out
PIECES_DEPTH = 4
#: the files lying directly in one folder (a work folder's file per block) are cut into
#: shares of about this many
FILES_PER_SHARE = 256
#: what one task costs the client process (submitting, scheduling, taking its result in):
#: 2-3 ms a task at 16 workers (``bench_scale.py``'s client CPU per task); a folder goes to
#: the workers only when their share plus these costs beats deleting it here
TASK_S = 0.003
#: the pace of deleting here is timed on pieces spread over the folder until this long
SAMPLE_S = 0.005
#: a share sampled is cut this many ways and one part deleted (a sub-share: the names whose
#: CRC-32 modulo ``shares`` times this is the share's number, a subset of its files): a whole
#: share of 256 files took 25-60 ms here while every worker waited for the sample
SAMPLE_SUBSHARES = 16

#: A piece of a folder to delete: a folder or file path (deleted whole; a link is removed,
#: never followed), or ``(folder, share, shares)``: the files lying directly in ``folder``
#: whose names hash to ``share`` (CRC-32 modulo ``shares``)
Piece = str | tuple[str, int, int]


def pieces(folder: Path, want: int, max_depth: int = PIECES_DEPTH) -> list[Piece]:
    """Disjoint pieces of ``folder``'s contents to delete apart: its folders expanded
    breadth first (symbolic links are never followed) until there are at least ``want``
    pieces or ``max_depth`` levels; the files met on the way are pieces too, as shares of
    their folder (a work folder keeps a file per block beside its chunk trees), counted
    here but never listed: this process holds a number per folder, not a name per file.
    What is left is the empty folders above the pieces."""
    files: dict[str, int] = {}  # folder -> the files lying directly in it
    level = [str(folder)]
    for _ in range(max_depth):
        below: list[str] = []
        for d in level:
            try:
                with os.scandir(d) as entries:
                    for e in entries:
                        if e.is_dir(follow_symlinks=False):
                            below.append(e.path)
                        else:
                            files[d] = files.get(d, 0) + 1
            except OSError:
                continue
        level = below
        if not level or len(level) + len(files) >= want:
            break
    shares: list[Piece] = []
    for d, n in files.items():
        k = max(1, min(want, -(-n // FILES_PER_SHARE)))
        shares += [(d, i, k) for i in range(k)]
    return shares + level


def remove_pieces(parts: Sequence[Piece]) -> None:
    """Delete :func:`pieces` (a worker's share of :func:`remove_tree`)."""
    for part in parts:
        if isinstance(part, str):
            _remove(Path(part))
            continue
        folder, share, shares = part
        try:
            with os.scandir(folder) as entries:  # names first: unlinking while listing
                names = [e.name for e in entries if not e.is_dir(follow_symlinks=False)
                         and zlib.crc32(e.name.encode("utf-8", "surrogateescape"))
                         % shares == share]
        except OSError:
            continue
        for name in names:
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass


def remove_tree(path: Path, client: Any = None) -> None:
    """Delete ``path``, a folder (a finished run's work arrays, a replaced output) or a file.

    With ``client``, a folder of many pieces is deleted by the cluster's workers first, a
    task per thread (:func:`remove_on_workers`), then whatever is left here: unlinking the
    hundreds of thousands of chunk files of a terabyte volume one by one from the client
    takes minutes on a parallel file system, where each unlink is a round trip to its
    metadata server. The workers see the same paths, having written them; a worker that
    cannot, or a cluster that is gone, leaves the work to this process.
    """
    remove_on_workers(path, client)
    _remove(path)


def remove_on_workers(path: Path, client: Any) -> None:
    """The workers' part of :func:`remove_tree`: the :func:`pieces` of the folder ``path``,
    a task per worker thread, when there are enough of them and the workers would be done
    sooner than this process (at the pace of a sample of pieces spread over the folder,
    deleted here, against a thread's share of the rest plus :data:`TASK_S` a task);
    nothing without ``client`` or when the cluster is gone."""
    if client is None or not path.is_dir() or path.is_symlink():
        return
    from engine.runner import cluster_threads

    try:
        threads = cluster_threads(client)
        if threads < 2:
            return
        parts = pieces(path, max(4 * threads, MIN_PIECES))
        if len(parts) < PARALLEL_PIECES:
            return
        # a run's work arrays on a local disk are a few thousand files, gone here in about
        # a tenth of a second, the longest stretch of a 16-worker 512³ segment during which
        # no task ran; two workers delete them 1.2x as fast, sixteen 1.6x (bench_remove.py,
        # on 2 cores); on a parallel file system each unlink is a round trip to its
        # metadata server, and the sample says so
        sampled, done, t0 = 0.0, set(), time.perf_counter()
        for i in range(0, len(parts), 8):  # at most an eighth, spread: an array's pieces
            part = parts[i]                # come together
            if isinstance(part, str):
                remove_pieces([part])
                done.add(i)
                sampled += 1
            else:  # a share (hundreds of files) is sampled in part; the rest stays in it
                folder, share, shares = part
                remove_pieces([(folder, share, shares * SAMPLE_SUBSHARES)])
                sampled += 1 / SAMPLE_SUBSHARES
            if time.perf_counter() - t0 >= SAMPLE_S:
                break
        rest = [p for i, p in enumerate(parts) if i not in done]
        here = (time.perf_counter() - t0) / sampled * len(rest)
        tasks = min(threads, len(rest))
        if not tasks or here <= here / tasks + tasks * TASK_S:
            return  # the caller deletes the rest
        # interleaved: a thread's share mixes the arrays' pieces, big and small
        bundles = [rest[i::tasks] for i in range(tasks)]
        client.gather(client.map(remove_pieces, bundles, pure=False))
    except Exception:  # noqa: BLE001 - a lost cluster: the caller deletes it all
        pass


@dataclass
class OutputRun:
    """One command's outputs while they are being built (see :func:`output_run`).

    Attributes
    ----------
    outputs : tuple of Path
        The final destinations, locked for the run.
    record : provenance.RunRecord
        Collects the run's stages; its entry is stored with every output.
    states : tuple of RunState
        The done-markers of a resumable run (empty for a run that starts afresh each time).
    resumed : bool
        True when the partial outputs of an interrupted run with the same identity were
        kept to be resumed.
    scratch : tuple of Path
        Partial outputs rewritten whole by every run (never resumed), committed with the
        others when given to :meth:`commit`.
    client : distributed.Client, optional
        Whose workers delete the work folder and replaced outputs (:func:`remove_tree`).
    """

    outputs: tuple[Path, ...]
    record: provenance.RunRecord
    states: tuple[RunState, ...]
    resumed: bool
    scratch: tuple[Path, ...] = ()
    client: Any = None
    committed: bool = field(default=False, init=False)

    def partial(self, dst: Path | None = None) -> Path:
        """Where ``dst`` (default: the first output) is built."""
        return partial_path(self.outputs[0] if dst is None else Path(dst))

    @property
    def work(self) -> Path:
        """Scratch folder for intermediate arrays, inside the first partial output (so it
        goes with it on a user error, and is resumed with it)."""
        return self.partial() / ".work"

    @property
    def partials(self) -> list[Path]:
        return [partial_path(d) for d in (*self.outputs, *self.scratch)]

    def commit(self, outputs: Sequence[Path] | None = None,
               recorded: Sequence[Path] | None = None) -> None:
        """Store the provenance entry, drop the work folder and done-markers, and move the
        finished ``outputs`` (default: every locked output, in order) into place.

        Parameters
        ----------
        outputs : sequence of Path, optional
            Destinations to commit, in order; a scratch destination may be among them.
        recorded : sequence of Path, optional
            Groups that receive the provenance entry (default: each committed partial).
        """
        for partial in self.partials:  # this run's own outputs, read back, are not inputs
            readguard.release(partial)
        readguard.check()  # before the done-markers go: a refused run can still resume
        outputs = list(self.outputs if outputs is None else outputs)
        remove_tree(self.work, self.client)
        for state in self.states:
            state.clear()
        pairs = [(partial_path(d), d) for d in outputs]
        entry = self.record.entry()
        for group in (recorded if recorded is not None else [p for p, _ in pairs]):
            provenance.append(group, [entry])
        for partial, dst in pairs:
            commit(partial, dst, self.client)
        self.committed = True


@contextmanager
def output_run(op: str, outputs: Sequence[Path], *,
               state: RunState | Sequence[RunState] | None = None,
               identity: dict[str, Any] | None = None, scratch: Sequence[Path] = (),
               report: Callable[[str], None] = print, what: str | None = None,
               work: bool = True, client: Any = None,
               inputs: Sequence[Path] = ()) -> Iterator[OutputRun]:
    """The lifecycle of a command writing ``outputs``: lock, record, partial folders,
    resume or restart, cleanup on a user error; the body calls :meth:`OutputRun.commit`.

    Parameters
    ----------
    op : str
        The provenance operation (``"segment"``, ``"predict"`` …).
    outputs : sequence of Path
        Destinations; each is locked and built in its partial sibling.
    state : RunState or sequence of RunState, optional
        Done-markers (normally under the first partial output; several when the passes
        keep them apart). When the run hash of one of them is present the partial outputs
        are kept and resumed; otherwise they are removed and the run starts afresh. Each
        state is begun before the body runs and cleared on commit. Without a state every
        run starts afresh.
    identity : dict, optional
        The provenance parameters (default: the first state's ``identity``).
    scratch : sequence of Path
        Further destinations built whole by every run (not locked, never resumed).
    what : str, optional
        How the report names the run (``"a conversion"``; default ``op``).
    work : bool
        Create :attr:`OutputRun.work`.
    client : distributed.Client, optional
        The run's cluster, whose workers delete its work folder and the outputs it
        replaces (:func:`remove_tree`). Before anything else, its workers must see
        ``inputs`` and be able to write where ``outputs`` go
        (:func:`engine.workerpaths.check_workers_see`).
    inputs : sequence of Path
        What the workers read by path beyond the outputs' folders (an input file outside
        them, a model).

    A :class:`~engine.errors.VoxelmillError` raised in the body removes every partial
    output (a user error: nothing to resume); any other exception (an interruption, a lost
    cluster) keeps them when the run has a state, so the same command resumes from the
    finished blocks, and removes them when it has none (there is nothing to resume).
    """
    outputs = tuple(Path(d) for d in outputs)
    check_workers_see(client, inputs, outputs)
    states = (() if state is None else tuple(state) if isinstance(state, Sequence)
              else (state,))
    what = what or op
    failed = False  # a failure that leaves nothing to resume
    try:
        with ExitStack() as stack:
            for dst in outputs:
                stack.enter_context(output_lock(dst, report=report))
            record = stack.enter_context(provenance.RunRecord(
                op, identity if identity is not None else (states[0].identity if states else {})))
            resumed = any((s.directory / s.run_hash).exists() for s in states)
            run = OutputRun(outputs, record, states, resumed, tuple(Path(d) for d in scratch),
                            client)
            if resumed:
                report(f"resuming an interrupted {what} in {run.partial()}")
            for p in (run.partials[len(outputs):] if resumed else run.partials):
                if p.exists() and not resumed and p == run.partial() and states:
                    report(f"removing an unfinished {what} with other inputs or options: {p}")
                remove_tree(p, client)
            if work:
                run.work.mkdir(parents=True, exist_ok=True)
            for s in states:
                s.begin()
            try:
                yield run
            except BaseException as exc:
                if isinstance(exc, VoxelmillError) or not states:
                    for p in run.partials:
                        _remove(p)
                    failed = True
                raise
    finally:
        if failed:  # after the locks are gone: the folders made for them are empty now
            remove_made_folders()
