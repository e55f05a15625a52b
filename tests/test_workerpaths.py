"""check_workers_see's rule on answers from workers (the real worker in its own mount
namespace is in tests/test_distributed.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.errors import InputError
from engine.workerpaths import check_workers_see, nearest_folder


class Answers:
    """A client whose workers answer ``check_workers_see``'s question: ``lacks`` maps a
    worker's address to the paths it lacks (the rest it sees as this machine does)."""

    def __init__(self, lacks: dict[str, set[str]], fail: bool = False) -> None:
        self.lacks, self.fail = lacks, fail

    def run(self, fn, read, write, *relative_and_cwd):
        if self.fail:
            raise OSError("a worker went away")
        here = fn(read, write, *relative_and_cwd)
        return {w: here + [(p, "missing") for p in sorted(gone)]
                for w, gone in self.lacks.items()}


def test_a_worker_lacking_a_path_is_named(tmp_path: Path):
    image = tmp_path / "in.ome.zarr"
    image.mkdir()
    out = tmp_path / "out" / "x.ome.zarr"
    check_workers_see(Answers({"tcp://a:1": set(), "tcp://b:2": set()}), [image], [out])
    with pytest.raises(InputError, match=rf"^{image}: the worker tcp://b:2 does not see it"):
        check_workers_see(Answers({"tcp://a:1": set(), "tcp://b:2": {str(image)}}),
                          [image], [out])
    three = {"tcp://a:1": {str(image)}, "tcp://b:2": {str(image)}, "tcp://c:3": set()}
    with pytest.raises(InputError, match=r"tcp://a:1 \(1 other worker\(s\) too\) does not"):
        check_workers_see(Answers(three), [image], [out])


def test_outputs_are_checked_where_they_will_be_made(tmp_path: Path):
    """The nearest existing folder above an output that does not exist yet."""
    out = tmp_path / "a" / "b" / "x.ome.zarr"
    assert nearest_folder(out) == tmp_path
    with pytest.raises(InputError, match=rf"^{tmp_path}: the worker tcp://a:1 does not"):
        check_workers_see(Answers({"tcp://a:1": {str(tmp_path)}}), [], [out])


def test_what_this_machine_lacks_too_or_no_answer_is_left_to_the_run(tmp_path: Path):
    gone = tmp_path / "nowhere.npy"
    check_workers_see(Answers({"tcp://a:1": {str(gone)}}), [gone], [])
    check_workers_see(Answers({"tcp://a:1": {str(tmp_path)}}, fail=True), [tmp_path], [])
    check_workers_see(None, [gone], [])


def test_the_embedded_cluster_is_not_asked(client, tmp_path: Path):
    """Its workers are this machine's processes: no round trip (``client.run`` unused)."""
    calls = []
    original = client.run
    client.run = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        check_workers_see(client, [tmp_path], [tmp_path / "x"])
    finally:
        client.run = original
    assert calls == []


def test_a_relative_path_is_refused_where_a_worker_runs_in_another_folder(tmp_path: Path,
                                                                         monkeypatch):
    """Workers open paths in their own working folder: a relative path given here names
    another file there (a FileNotFoundError traceback from every block, or worse, another
    file of the same name). Where a worker runs elsewhere it is one line; where all run in
    this folder (SLURM jobs start in the submission folder) it is fine."""
    from distributed import Client

    from tests.conftest import dask_processes

    (tmp_path / "in.mrc").write_bytes(b"")
    logs = tmp_path / "logs"
    logs.mkdir()
    with dask_processes(logs, [[]]) as address, Client(address) as c:
        monkeypatch.chdir(tmp_path)  # the worker was started in the folder before
        check_workers_see(Answers({"tcp://a:1": set()}), [Path("in.mrc")], [Path("out.zarr")])
        [(worker, folder)] = c.run(os.getcwd).items()
        assert not os.path.samefile(folder, tmp_path)
        with pytest.raises(InputError, match=(
                rf"^in\.mrc: a relative path, but the worker {worker} runs in {folder} "
                rf"\(this command in {tmp_path}\) and would open it there: give the "
                r"absolute path$")):
            check_workers_see(c, [Path("in.mrc")], [tmp_path / "out.zarr"])
        with pytest.raises(InputError, match=r"^out\.zarr: a relative path"):
            check_workers_see(c, [tmp_path / "in.mrc"], [Path("out.zarr")])
        check_workers_see(c, [tmp_path / "in.mrc"], [tmp_path / "out.zarr"])
        c.run(os.chdir, str(tmp_path))  # a worker started in this folder
        check_workers_see(c, [Path("in.mrc")], [Path("out.zarr")])
