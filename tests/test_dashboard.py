"""The Dask dashboard of voxelmill's clusters: it answers on 127.0.0.1 during a run and its
task stream names the passes; opening it to the network needs --tls (HTTPS) or
--insecure-dashboard."""

from __future__ import annotations

import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from engine.cluster import (
    KEY_CACHE_CLEAR_S,
    LOW_LEVEL_LOG_LENGTH,
    SYSTEM_MONITOR_SAMPLES,
    ClusterOptions,
    check_dashboard_address,
    connect,
)
from engine.errors import OptionError
from engine.pipelines.convert import ConvertOptions, convert
from tests.conftest import run_cli, write_mrc


def _get(url: str, context: ssl.SSLContext | None = None) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as res:
            return res.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _names_in_task_stream(dask_scheduler=None) -> list[str]:
    """The names the dashboard's task stream plot draws (one per task rectangle)."""
    from distributed.diagnostics.task_stream import rectangles

    plugin = dask_scheduler.plugins["task-stream"]
    return sorted(set(rectangles(list(plugin.buffer))["name"]))


def _log_length(dask_scheduler=None) -> int:
    return dask_scheduler.transition_log.maxlen


def _monitor_samples(dask_scheduler=None) -> int:
    return dask_scheduler.monitor.maxlen


def _key_cache_emptied(timeout: float) -> bool:
    """Whether dask's ``key_split`` cache (of this process, where the embedded scheduler
    lives) forgets a key within ``timeout`` seconds."""
    from dask.utils import key_split

    probe = "voxelmill_probe-key-cache"
    key_split(probe)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        misses = key_split.cache_info().misses
        key_split(probe)
        if key_split.cache_info().misses > misses:  # it had been dropped
            return True
        time.sleep(0.05)
    return False


def test_status_and_task_stream_during_an_embedded_run(tmp_path: Path):
    """While a conversion runs, /status and the task stream page answer on 127.0.0.1, and
    the task stream holds the passes by name (``image_pass0`` for the pass image-pass0 …)."""
    src = write_mrc(tmp_path / "v.mrc", np.random.default_rng(0).random((64, 128, 128),
                                                                        np.float32))
    opts = ClusterOptions(workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0")
    with connect(opts, report=lambda line: None) as client:
        # the developers' logs of the scheduler and of this client's connection are capped
        # (they live in this process and grow with the tasks until full)
        assert client.run_on_scheduler(_log_length) == LOW_LEVEL_LOG_LENGTH
        assert client.scheduler_comm.recent_message_log.maxlen == LOW_LEVEL_LOG_LENGTH
        # so are the system monitor's history and dask's cache of task keys (issue 17)
        assert client.run_on_scheduler(_monitor_samples) == SYSTEM_MONITOR_SAMPLES
        assert _key_cache_emptied(5 * KEY_CACHE_CLEAR_S)
        link = client.dashboard_link
        assert link.startswith("http://127.0.0.1:") and link.endswith("/status")
        base = link.rsplit("/", 1)[0]
        # the task stream page makes the scheduler record the stream the plot shows
        assert _get(f"{base}/tasks") == 200
        answers: list[tuple[float, int]] = []
        running = threading.Event()

        def poll() -> None:
            while running.is_set():
                answers.append((time.monotonic(), _get(link)))
                time.sleep(0.1)

        running.set()
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        start = time.monotonic()
        convert(src, tmp_path / "v.ome.zarr", ConvertOptions(chunks=(16, 32, 32)), client,
                report=lambda line: None)
        end = time.monotonic()
        running.clear()
        poller.join()
        assert any(start <= t <= end and code == 200 for t, code in answers), answers
        names = client.run_on_scheduler(_names_in_task_stream)
    assert {"image_pass0", "image_pass1"} <= set(names), names


def test_dashboard_beyond_this_machine_needs_tls_or_consent(tmp_path: Path):
    """0.0.0.0 (or any non-loopback address) is refused without --tls or
    --insecure-dashboard: one line, exit 2, nothing written; with --tls the dashboard is
    served over HTTPS with the scheduler's certificate."""
    for local in ("127.0.0.1:8787", "localhost:0", "[::1]:8787"):
        check_dashboard_address(ClusterOptions(dashboard_address=local))
    for remote in ("0.0.0.0:8787", ":8787", "192.0.2.7:8787", "eth0:8787"):
        with pytest.raises(OptionError, match="--insecure-dashboard"):
            check_dashboard_address(ClusterOptions(dashboard_address=remote))
        check_dashboard_address(ClusterOptions(dashboard_address=remote,
                                               insecure_dashboard=True))
    src = write_mrc(tmp_path / "v.mrc", np.zeros((8, 16, 16), np.float32))
    out = tmp_path / "v.ome.zarr"
    res = run_cli("--dashboard-address", "0.0.0.0:8787", "convert", str(src), str(out))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--dashboard-address 0.0.0.0:8787" in res.stderr and "--tls" in res.stderr
    assert not out.exists() and not list(tmp_path.glob(".v.ome.zarr*"))

    from engine.security import make_certificates

    certs = make_certificates(tmp_path / "certs")
    opts = ClusterOptions(workers=1, threads_per_worker=1, dashboard_address="0.0.0.0:0",
                          tls=str(certs.directory))
    with connect(opts, report=lambda line: None) as client:
        # the developers' logs of the scheduler and of this client's connection are capped
        # (they live in this process and grow with the tasks until full)
        assert client.run_on_scheduler(_log_length) == LOW_LEVEL_LOG_LENGTH
        assert client.scheduler_comm.recent_message_log.maxlen == LOW_LEVEL_LOG_LENGTH
        link = client.dashboard_link
        assert link.startswith("https://"), link
        context = ssl.create_default_context(cafile=str(certs.ca_cert))
        assert _get(link.replace(link.split("/")[2].split(":")[0], "127.0.0.1", 1),
                    context) == 200


def test_no_dashboard(tmp_path: Path):
    """``--dashboard-address none`` (or VOXELMILL_DASHBOARD_ADDRESS=none): the run works and
    says it has no dashboard; distributed is given no dashboard address."""
    from engine.cluster import dashboard_listen

    assert dashboard_listen("none") is None and dashboard_listen("NONE ") is None
    assert dashboard_listen("127.0.0.1:8787") == "127.0.0.1:8787"
    check_dashboard_address(ClusterOptions(dashboard_address="none"))
    lines: list[str] = []
    with connect(ClusterOptions(workers=1, threads_per_worker=1, dashboard_address="none"),
                 report=lines.append) as client:
        assert client.submit(sum, [1, 2]).result(timeout=30) == 3
    assert "no dashboard" in lines[0]
