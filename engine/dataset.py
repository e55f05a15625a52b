"""Training sets: a deterministic train / validation / verification split grouped by source.

Patches cut from one tomogram are correlated (same sample, same microscope session, often
overlapping), so a split by patch lets the validation score measure memorisation. Here
every item (a patch, or a curated sample) belongs to a *group*, the source volume it came
from, and all items of a group go to the same split. The result is laid out the way
MemBrain-seg's training data module reads it, plus a verification set for a person to
check by hand::

    DIR/imagesTr/<name>_0000.<ext>      DIR/labelsTr/<name>.<ext>
    DIR/imagesVal/<name>_0000.<ext>     DIR/labelsVal/<name>.<ext>
    DIR/imagesVerify/<name>_0000.<ext>  DIR/labelsVerify/<name>.<ext>
    DIR/split.csv                       one row per item: name, group, split, paths
    DIR/split.json                      seed, fractions, counts, the sources

MemBrain-seg (and nnU-Net) pair ``labelsTr/<name>.nii.gz`` with
``imagesTr/<name>_0000.nii.gz`` (channel 0), hence the ``_0000`` on image files; other
formats keep their suffix. Files are copied (byte-identical) or, with ``link``, symlinked
to the absolute source paths.

Sources
-------
A *patch folder* from ``voxelmill patches extract``: ``imagesCorr/``, ``labelsCorr/`` (or
another label folder, e.g. the output of ``patches merge`` placed there) and
``patches.csv``, whose ``image`` column (the source volume's absolute path) is the group.
Without ``patches.csv`` (a MemBrain-seg folder), the group is parsed from the file name
``<ds>_<token>_patch<N>``: everything before ``_patch<N>``, i.e. ``<ds>_<token>`` (the
split of ``<ds>`` from ``<token>`` is ambiguous when either holds ``_``, and both name
the source). A *samples folder* holds ``samples.csv`` (see
:func:`engine.io.layouts.read_samples`); each sample (an OME-Zarr holding image and labels,
or any file) goes whole into ``images<Split>/`` and the label folders stay empty for it.
A *PartSeg project* (``.tgz``/``.tbz2``/``.tar.gz``/``.tar.bz2``, given as a file or found
in a folder of projects) is one item and its own group (one project = one field of view);
like a sample it goes whole into ``images<Split>/`` (it holds image, ROI and alternative
maps), where ``voxelmill train`` reads it with the source's ``labels:``/``classes:``.

Assignment
----------
Groups are sorted by name and shuffled with ``numpy.random.default_rng(seed)``, so the
split depends only on the seed and the set of groups (with their item counts), never on
the order files are listed or manifest rows are written. Then, in that order, each group
goes to the split with the largest *deficit* ``fraction × n_items − items so far`` among
the splits with a non-zero fraction (ties: train, then val, then verify). With ``m`` the
item count of the largest group and ``k`` the number of non-zero fractions, every split
ends within ``|n_split − fraction × n_items| < m``: a split only receives a group while
its deficit is positive (the deficits sum to the items left), so it overshoots by less
than one group, and an undershoot ``D`` leaves every other split a deficit of at least
``D − m``, which with deficits summing to zero gives ``D ≤ (k − 1) m / k``.

Greedy can leave a split empty when groups are uneven (3 volumes of 2 items each and
fractions 0.7, 0.2, 0.1 give train 4, val 2, verify 0). A verification set with nothing to
verify is of no use, so each empty split then receives the one group, taken from a split
that keeps at least one, whose move leaves the smallest total ``Σ |n_split − fraction ×
n_items|`` (ties: the first group by name). Such a repair can double the bound above, to
``< 2 m``; a split left with two groups or more was never repaired. Fewer groups than
non-zero fractions is an error.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import InputError, OptionError
from engine.io.budget import check_output_size
from engine.io.layouts import (
    LABELS_DIR,
    SPLIT_COLUMNS,
    SPLIT_CSV,
    SPLIT_DIRS,
    SPLIT_JSON,
    SPLITS,
    Item,
    collect_items,
)
from engine.output import check_destination, commit, partial_path

DEFAULT_FRACTIONS = (0.7, 0.2, 0.1)


@dataclass(frozen=True)
class SplitOptions:
    """Options of :func:`plan_split` (see ``voxelmill dataset split --help``).

    Parameters
    ----------
    fractions : sequence of float
        Train, validation (and verification) fractions of the items, each >= 0, summing to
        1; two values mean no verification set.
    seed : int
        Seed of ``numpy.random.default_rng``, >= 0.
    link : bool
        Symlink the files (absolute paths) instead of copying them.
    labels_dir : str
        Folder of label patches inside each patch SOURCE.
    overwrite : bool
        Replace an existing destination.
    """

    fractions: Sequence[float] = DEFAULT_FRACTIONS
    seed: int = 0
    link: bool = False
    labels_dir: str = LABELS_DIR
    overwrite: bool = False


@dataclass
class SplitPlan:
    """What :func:`write_split` will write: every item with its split, all checked."""

    sources: tuple[Path, ...]
    destination: Path
    options: SplitOptions
    fractions: tuple[float, float, float]
    items: list[Item]
    assignment: dict[str, str]
    notes: list[str] = field(default_factory=list)

    def split_of(self, item: Item) -> str:
        return self.assignment[item.group]

    def counts(self) -> dict[str, dict[str, int]]:
        """Items and groups per split."""
        out = {s: {"items": 0, "groups": 0} for s in SPLITS}
        for item in self.items:
            out[self.split_of(item)]["items"] += 1
        for split in self.assignment.values():
            out[split]["groups"] += 1
        return out


@dataclass(frozen=True)
class SplitResult:
    """What :func:`write_split` wrote."""

    destination: Path
    counts: dict[str, dict[str, int]]
    notes: list[str]


# --------------------------------------------------------------------------- validation

def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Train, validation and verification fractions, checked.

    Parameters
    ----------
    fractions : sequence of 2 or 3 float
        Each finite and >= 0, summing to 1 (within 1e-6); two values leave verification
        at 0.

    Returns
    -------
    tuple of 3 float

    Raises
    ------
    OptionError
        Naming the values when they are not so.
    """
    vals = tuple(float(v) for v in fractions)
    text = ",".join(f"{v:g}" for v in vals)
    if len(vals) == 2:
        vals = (*vals, 0.0)
    if len(vals) != 3:
        raise OptionError(f"--fractions {text}: give train,val,verify (or train,val)")
    if not all(math.isfinite(v) and v >= 0 for v in vals):
        raise OptionError(f"--fractions {text}: every fraction must be a number >= 0")
    if abs(sum(vals) - 1.0) > 1e-6:
        raise OptionError(f"--fractions {text}: the fractions sum to {sum(vals):g}, not 1")
    return vals  # type: ignore[return-value]


def assign_groups(sizes: dict[str, int], fractions: Sequence[float], seed: int
                  ) -> dict[str, str]:
    """Assign each group to a split (see the module docstring for the algorithm).

    Parameters
    ----------
    sizes : dict of str to int
        Item count of every group (> 0).
    fractions : sequence of 3 float
        Train, val, verify fractions, as :func:`check_fractions` returns them.
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    dict of str to str
        Group → ``"train"``, ``"val"`` or ``"verify"``; only splits with a non-zero
        fraction receive groups.
    """
    names = sorted(sizes)  # independent of the caller's (file-system) order
    order = np.random.default_rng(seed).permutation(len(names))
    total = sum(sizes.values())
    active = [i for i, f in enumerate(fractions) if f > 0]
    counts = [0] * len(SPLITS)
    out: dict[str, str] = {}
    for k in order:
        name = names[int(k)]
        # max() keeps the first of equal deficits: ties go to train, then val, then verify
        best = max(active, key=lambda i: fractions[i] * total - counts[i])
        counts[best] += sizes[name]
        out[name] = SPLITS[best]
    for empty in (i for i in active if counts[i] == 0):
        _fill(empty, out, sizes, counts, fractions, total)
    return out


def _fill(empty: int, out: dict[str, str], sizes: dict[str, int], counts: list[int],
          fractions: Sequence[float], total: int) -> None:
    """Move into the empty split ``empty`` the group (from a split keeping at least one)
    whose move leaves the smallest total deviation from the fractions."""
    groups_in = {s: sum(v == s for v in out.values()) for s in SPLITS}
    best: tuple[float, str] | None = None
    for name in sorted(out):
        donor = SPLITS.index(out[name])
        if groups_in[out[name]] < 2:
            continue
        moved = list(counts)
        moved[donor] -= sizes[name]
        moved[empty] += sizes[name]
        cost = sum(abs(c - f * total) for c, f in zip(moved, fractions, strict=True))
        if best is None or cost < best[0]:  # strict: the first name wins ties
            best = (cost, name)
    if best is not None:  # callers ensure there are at least as many groups as splits
        name = best[1]
        counts[SPLITS.index(out[name])] -= sizes[name]
        counts[empty] += sizes[name]
        out[name] = SPLITS[empty]


# ------------------------------------------------------------------------------ planning

def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def plan_split(sources: Iterable[str | Path], destination: str | Path,
               options: SplitOptions | None = None) -> SplitPlan:
    """Collect the items of every SOURCE and assign each group a split; write nothing.

    Parameters
    ----------
    sources : iterable of str or Path
        Patch folders, samples folders, PartSeg projects and folders of them, merged; the
        same source volume in two folders is one group.
    destination : str or Path
        Folder to create (see the module docstring).
    options : SplitOptions, optional

    Returns
    -------
    SplitPlan

    Raises
    ------
    OptionError
        For bad fractions or seed, or fewer groups than non-zero fractions.
    InputError
        For a source that is not a patch or samples folder, or an output name found in
        two sources (naming both files).
    DestinationError
        When the destination exists (without ``overwrite``) or overlaps a source.
    """
    opts = options or SplitOptions()
    fractions = check_fractions(opts.fractions)
    if not isinstance(opts.seed, (int, np.integer)) or opts.seed < 0:
        raise OptionError(f"--seed {opts.seed}: must be a whole number >= 0")
    srcs = tuple(Path(s) for s in sources)
    if not srcs:
        raise OptionError("give at least one SOURCE folder")
    dst = Path(destination)
    for src in srcs:
        a, b = src.resolve(), dst.resolve()
        if _inside(a, b) or _inside(b, a):
            raise OptionError(f"{dst}: the destination overlaps the source {src}; choose "
                              "another folder")
    items: list[Item] = []
    by_name: dict[str, Item] = {}
    for src in srcs:
        for item in collect_items(src, opts.labels_dir):
            other = by_name.get(item.name)
            if other is not None:
                raise InputError(f"{other.image} and {item.image}: two items named "
                                 f"{item.name!r}; rename one (e.g. another --ds-token)")
            by_name[item.name] = item
            items.append(item)
    sizes: dict[str, int] = {}
    for item in items:
        sizes[item.group] = sizes.get(item.group, 0) + 1
    active = sum(f > 0 for f in fractions)
    if len(sizes) < active:
        raise OptionError(
            f"{len(sizes)} source volume(s) for {active} non-zero fractions "
            f"{','.join(f'{f:g}' for f in fractions)}: every split needs a volume of its own "
            "(patches of one volume never go to two splits); add sources or set a fraction "
            "to 0")
    check_destination(dst, opts.overwrite, sources=srcs, manifests=(SPLIT_JSON,))
    if not opts.link:  # copies: the destination grows by every file copied
        check_output_size(dst, sum(_file_bytes(p) for it in items for p in (it.image, it.labels)
                                   if p is not None),
                          f"--copy of {len(items)} item{'s' if len(items) != 1 else ''} "
                          "(--link copies nothing)", copies=True)
    items.sort(key=lambda it: it.name)
    plan = SplitPlan(srcs, dst, opts, fractions, items,
                     assign_groups(sizes, fractions, int(opts.seed)))
    counts = plan.counts()
    for split, frac in zip(SPLITS, fractions, strict=True):
        share = counts[split]["items"] / len(items)
        if frac > 0 and abs(share - frac) > 0.5 * frac:  # volumes too uneven for the ask
            plan.notes.append(
                f"warning: the {split} split holds {share:.0%} of the items, asked for "
                f"{frac:.0%}: the source volumes hold too uneven numbers of items; try "
                "another --seed or more sources")
    return plan


# ------------------------------------------------------------------------------- writing

def _file_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (a zarr patch)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _place(src: Path, dst: Path, link: bool) -> None:
    if link:
        dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=False)
    else:
        shutil.copy2(src, dst)


def write_split(plan: SplitPlan) -> SplitResult:
    """Copy or link every item into its split's folders, write ``split.csv`` and
    ``split.json``; all in a hidden ``.DIR.partial`` folder renamed to ``DIR`` at the end.

    Returns
    -------
    SplitResult
    """
    dst = plan.destination
    partial = partial_path(dst)
    if partial.exists():
        shutil.rmtree(partial)
    try:
        partial.mkdir()
        for images, labels in SPLIT_DIRS.values():
            (partial / images).mkdir()
            (partial / labels).mkdir()
        rows = []
        for item in plan.items:
            split = plan.split_of(item)
            images, labels = SPLIT_DIRS[split]
            out_image = f"{images}/{item.out_image()}"
            _place(item.image, partial / out_image, plan.options.link)
            out_labels = ""
            if item.labels is not None:
                out_labels = f"{labels}/{item.out_labels()}"
                _place(item.labels, partial / out_labels, plan.options.link)
            rows.append([item.name, item.group, split, str(item.source.resolve()),
                         str(item.image.resolve()),
                         "" if item.labels is None else str(item.labels.resolve()),
                         out_image, out_labels])
        with open(partial / SPLIT_CSV, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(SPLIT_COLUMNS)
            w.writerows(rows)
        counts = plan.counts()
        meta = {
            "seed": int(plan.options.seed),
            "fractions": dict(zip(SPLITS, plan.fractions, strict=True)),
            "algorithm": "groups sorted by name, shuffled with numpy.random.default_rng(seed),"
                         " each assigned to the split with the largest item deficit",
            "mode": "link" if plan.options.link else "copy",
            "sources": [str(s.resolve()) for s in plan.sources],
            "counts": counts,
            "folders": SPLIT_DIRS,
        }
        (partial / SPLIT_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        commit(partial, dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return SplitResult(dst, counts, list(plan.notes))


def split_dataset(sources: Iterable[str | Path], destination: str | Path,
                  options: SplitOptions | None = None) -> SplitResult:
    """Split patches or samples into train / val / verify folders grouped by source volume.

    :func:`plan_split` then :func:`write_split`; see the module docstring for the layout
    and the algorithm.
    """
    return write_split(plan_split(sources, destination, options))
