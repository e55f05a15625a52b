"""Run events and provenance: what a run reports while it works and stores with its output;
block submission is throttled (the scheduler never holds the whole grid)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import numpy as np
import pytest
import zarr

from engine import events, provenance
from engine.blocks import BlockGrid
from engine.pipelines.convert import ConvertOptions, convert
from engine.runner import run_blocks
from tests.conftest import run_cli, write_mrc


def test_conversion_events_and_provenance(client, tmp_path):
    data = np.random.default_rng(0).normal(size=(40, 48, 56)).astype(np.float32)
    src = write_mrc(tmp_path / "a.mrc", data, voxel_size=2.0)
    seen: list[dict] = []
    with events.listen(seen.append):
        result = convert(src, tmp_path / "a.ome.zarr", ConvertOptions(chunks=(16,)), client,
                         report=lambda _: None)
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "run-start" and kinds[-1] == "run-end"
    ends = [e for e in seen if e["event"] == "stage-end"]
    assert [e["stage"] for e in ends] == [r.name for r in result.reports]
    assert kinds.count("stage-start") == len(ends)
    first = ends[0]
    assert first["blocks"] == first["computed"] == result.reports[0].total
    assert first["voxels"] == data.size  # pass 0 writes every level-0 voxel once
    assert first["block_seconds"]["count"] == first["computed"]
    assert sum(first["block_seconds"]["histogram"]["counts"]) == first["computed"]
    json.dumps(seen)  # every event is JSON

    entries = provenance.read(result.destination)
    assert len(entries) == 1
    entry = entries[0]
    assert entry["op"] == "convert" and entry["command"] is None  # not from the CLI
    assert entry["parameters"]["input"]["path"] == str(src.resolve())
    assert entry["stages"] == [{k: v for k, v in e.items() if k not in ("event", "time")}
                               for e in ends]
    # and the data is still exactly the input
    np.testing.assert_array_equal(zarr.open_group(str(result.destination))["0"][...], data)


def test_cli_stores_the_command_line(tmp_path):
    src = write_mrc(tmp_path / "b.mrc", np.ones((8, 16, 16), np.float32))
    dst = tmp_path / "b.ome.zarr"
    res = run_cli("convert", str(src), str(dst), "--chunks", "8", "--workers", "1")
    assert res.returncode == 0, res.stderr
    entry = provenance.read(dst)[-1]
    assert entry["command"] == f"voxelmill convert {src} {dst} --chunks 8 --workers 1"


@dataclass(frozen=True)
class Count:
    """No-op block task that records nothing; the test watches the scheduler instead."""

    def __call__(self, block) -> int:
        return block.write_size


def test_submission_is_throttled(client):
    """A pass of 3,000 blocks never has more than ``max_in_flight`` tasks on the scheduler."""
    grid = BlockGrid((3000,), 1)
    peak = {"tasks": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            n = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
            peak["tasks"] = max(peak["tasks"], n)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        report = run_blocks(client, grid, Count(), name="noop", max_in_flight=8)
    finally:
        stop.set()
        watcher.join()
    assert report.computed == 3000 and sum(report.results.values()) == 3000
    assert report.voxels == 3000
    # in flight, finished ones waiting to be gathered together (at most a window's), and
    # gathered ones the scheduler has not forgotten yet
    assert 0 < peak["tasks"] <= 3 * 8


def test_block_time_summary_histogram():
    times = [0.01] * 5 + [0.1] * 3 + [1.0] * 2
    s = provenance.block_time_summary(times, bins=4)
    assert s["count"] == 10 and s["min"] == 0.01 and s["max"] == 1.0
    assert s["median"] == pytest.approx(0.055)
    assert sum(s["histogram"]["counts"]) == 10
    assert s["histogram"]["counts"][0] == 5 and s["histogram"]["counts"][-1] == 2
    assert provenance.block_time_summary([]) == {"count": 0}


def test_cli_log_json(tmp_path):
    src = write_mrc(tmp_path / "c.mrc", np.ones((8, 16, 16), np.float32))
    log = tmp_path / "run.jsonl"
    res = run_cli("--log-json", str(log), "convert", str(src), str(tmp_path / "c.ome.zarr"),
                  "--chunks", "8", "--workers", "1")
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [r["event"] for r in records]
    assert kinds[0] == "run-start" and kinds[-1] == "run-end"
    ends = [r for r in records if r["event"] == "stage-end"]
    assert ends and ends[0]["computed"] == ends[0]["blocks"] and "mvoxels_per_s" in ends[0]
    # a user error is logged too, and the command still exits 2 with one line
    res = run_cli("--log-json", str(log), "convert", str(tmp_path / "missing.mrc"),
                  str(tmp_path / "d.ome.zarr"))
    assert res.returncode == 2
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["event"] == "error" and "missing.mrc" in last["message"]
    bad = run_cli("--log-json", str(tmp_path / "no" / "dir.jsonl"), "info", str(src))
    assert bad.returncode == 2 and "--log-json" in bad.stderr
    assert "Traceback" not in bad.stderr
