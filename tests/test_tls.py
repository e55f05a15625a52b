"""TLS with mutual authentication: certificates from ``voxelmill cluster certs``, a real
``dask scheduler`` / ``dask worker`` pair using them, clients with and without the right
certificate, ``voxelmill --tls`` end to end, and the embedded cluster on 127.0.0.1 only."""

from __future__ import annotations

import socket
import ssl
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine.cluster import ClusterOptions, connect
from engine.errors import DestinationError, OptionError
from engine.security import ROLES, CertificateSet, load_security, make_certificates
from tests.conftest import dask_processes, free_port, run_cli

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertificateSet:
    return make_certificates(tmp_path_factory.mktemp("tls") / "certs", hosts=["scheduler"])


@pytest.fixture(scope="module")
def tls_scheduler(tmp_path_factory, certs) -> Iterator[str]:
    with dask_processes(tmp_path_factory.mktemp("tls-logs"), [[]], certs=certs) as address:
        yield address


def test_certificates(tmp_path: Path):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    made = make_certificates(tmp_path / "c", hosts=["scheduler", "10.0.0.5"], days=30)
    assert {p.name for p in (tmp_path / "c").iterdir()} == {p.name for p in made.files}
    assert len(made.files) == 8
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    for role in ROLES:
        assert stat.S_IMODE(made.keys[role].stat().st_mode) == 0o600
        cert = x509.load_pem_x509_certificate(made.certs[role].read_bytes())
        cert.verify_directly_issued_by(ca)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usage)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "scheduler"}
        assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
            "127.0.0.1", "10.0.0.5"}
        assert 29 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 31
    assert stat.S_IMODE(made.ca_key.stat().st_mode) == 0o600

    before = made.ca_cert.read_bytes()
    with pytest.raises(DestinationError, match="--overwrite"):
        make_certificates(tmp_path / "c")
    assert made.ca_cert.read_bytes() == before
    again = make_certificates(tmp_path / "c", overwrite=True)
    assert again.ca_cert.read_bytes() != before
    assert stat.S_IMODE(again.keys["client"].stat().st_mode) == 0o600

    sec = load_security(tmp_path / "c")
    assert sec.require_encryption
    assert sec.tls_client_cert == str(again.certs["client"])
    assert sec.tls_scheduler_key == str(again.keys["scheduler"])
    assert sec.tls_worker_cert == str(again.certs["worker"])


def test_load_security_errors_name_the_file(tmp_path: Path):
    hint = "voxelmill cluster certs"
    with pytest.raises(OptionError, match=f"no such folder.*{hint}"):
        load_security(tmp_path / "nope")
    made = make_certificates(tmp_path / "c")
    made.certs["client"].unlink()
    with pytest.raises(OptionError, match=f"client.crt is missing.*{hint}"):
        load_security(tmp_path / "c")
    made.certs["client"].write_text("not a certificate\n")
    with pytest.raises(OptionError, match=f"client.crt is not a PEM certificate.*{hint}"):
        load_security(tmp_path / "c")
    good = made.keys["worker"].read_bytes()
    made.keys["worker"].write_text("garbage\n")
    with pytest.raises(OptionError, match=f"worker.key is not .*PEM private key.*{hint}"):
        load_security(tmp_path / "c", role="worker")
    made.keys["worker"].write_bytes(good)
    other = make_certificates(tmp_path / "other")
    made.certs["client"].write_bytes(other.certs["client"].read_bytes())
    made.keys["client"].write_bytes(other.keys["client"].read_bytes())
    with pytest.raises(OptionError, match=f"client.crt is not signed by .*ca.crt.*{hint}"):
        load_security(tmp_path / "c")
    made.ca_cert.chmod(0)
    try:
        readable = made.ca_cert.open("rb")  # root reads anything
        readable.close()
    except PermissionError:
        with pytest.raises(OptionError, match=f"cannot read .*ca.crt.*{hint}"):
            load_security(tmp_path / "c")


def test_client_with_certificate_computes(tls_scheduler, certs):
    from distributed import Client

    with Client(tls_scheduler, security=load_security(certs.directory), timeout="10s") as c:
        assert c.submit(lambda x: x + 1, 41).result(timeout=30) == 42
        (worker,) = c.scheduler_info()["workers"]
        assert worker.startswith("tls://127.0.0.1:")


def test_clients_without_the_right_certificate_are_refused(tls_scheduler, certs, tmp_path):
    from distributed import Client

    port = int(tls_scheduler.rsplit(":", 1)[1])
    # plain TCP to the TLS port
    with pytest.raises((OSError, TimeoutError)):
        Client(f"tcp://127.0.0.1:{port}", timeout="3s")
    # a TLS client that trusts the CA but presents no certificate: the scheduler hangs up
    # (with the client certificate, the same socket receives the scheduler's handshake)
    def first_bytes(with_certificate: bool) -> bytes:
        ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
        ctx.check_hostname = False
        if with_certificate:
            ctx.load_cert_chain(certs.certs["client"], certs.keys["client"])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            try:
                with ctx.wrap_socket(raw) as tls:
                    return tls.recv(1024)
            except (ssl.SSLError, ConnectionError):
                return b""

    assert first_bytes(with_certificate=True) != b""
    assert first_bytes(with_certificate=False) == b""
    # a certificate signed by another CA
    other = make_certificates(tmp_path / "other")
    with pytest.raises((OSError, TimeoutError)):
        Client(tls_scheduler, security=load_security(other.directory), timeout="3s")


def _volume(tmp_path: Path) -> tuple[Path, np.ndarray]:
    data = np.arange(16 * 24 * 20, dtype=np.uint16).reshape(16, 24, 20)
    np.save(tmp_path / "vol.npy", data)
    return tmp_path / "vol.npy", data


def test_cli_convert_on_tls_scheduler(tls_scheduler, certs, tmp_path):
    src, data = _volume(tmp_path)
    res = run_cli("--tls", str(certs.directory), "--dashboard-address", "127.0.0.1:8787",
                  "convert", str(src), "--assume-voxel-size",
                  str(tmp_path / "out.ome.zarr"), "--chunks", "8",
                  "--scheduler", tls_scheduler, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"connected to scheduler {tls_scheduler}" in res.stderr
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "out.ome.zarr"),
                                                  mode="r")["0"][...], data)

    tcp = tls_scheduler.replace("tls://", "tcp://")
    res = run_cli("--tls", str(certs.directory), "--dashboard-address", "127.0.0.1:8787",
                  "convert", str(src), "--assume-voxel-size",
                  str(tmp_path / "tcp.ome.zarr"), "--scheduler", tcp, timeout=120)
    assert res.returncode == 2
    assert "must start with tls://" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_cli_tls_missing_folder_is_a_user_error(tmp_path):
    src, _ = _volume(tmp_path)
    missing = tmp_path / "no-certs"
    res = run_cli("--tls", str(missing), "convert", str(src), "--assume-voxel-size",
                  str(tmp_path / "o.ome.zarr"),
                  "--scheduler", f"tls://127.0.0.1:{free_port()}", timeout=120)
    assert res.returncode == 2
    assert str(missing) in res.stderr and "voxelmill cluster certs" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "o.ome.zarr").exists()


def test_cli_cluster_certs(tmp_path):
    out = tmp_path / "certs"
    res = run_cli("cluster", "certs", str(out), "--host", "scheduler", "--days", "10")
    assert res.returncode == 0, res.stderr
    for name in ("ca.crt", "scheduler.crt", "scheduler.key", "worker.key", "client.crt"):
        assert (out / name).is_file() and str(out / name) in res.stdout
    assert "--tls-ca-file" in res.stdout and f"voxelmill --tls {out}" in res.stdout
    assert stat.S_IMODE((out / "client.key").stat().st_mode) == 0o600
    res = run_cli("cluster", "certs", str(out))
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert "Traceback" not in res.stderr
    assert run_cli("cluster", "certs", str(out), "--overwrite").returncode == 0


def test_embedded_cluster_with_tls_listens_on_localhost(certs, tmp_path):
    opts = ClusterOptions(workers=1, threads_per_worker=1, tls=str(certs.directory))
    lines: list[str] = []
    with connect(opts, report=lines.append) as client:
        assert client.scheduler.address.startswith("tls://127.0.0.1:")
        assert all(w.startswith("tls://127.0.0.1:") for w in client.scheduler_info()["workers"])
        assert "127.0.0.1" in client.dashboard_link
        assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
    assert "dashboard: http://127.0.0.1:" in lines[0]

    src, data = _volume(tmp_path)
    res = run_cli("--tls", str(certs.directory), "--dashboard-address", "127.0.0.1:8787",
                  "convert", str(src), "--assume-voxel-size",
                  str(tmp_path / "e.ome.zarr"), "--chunks", "8", "--workers", "1",
                  "--threads-per-worker", "1", timeout=120)
    assert res.returncode == 0, res.stderr
    assert "dashboard: http://127.0.0.1:" in res.stderr
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "e.ome.zarr"),
                                                  mode="r")["0"][...], data)


def test_embedded_cluster_without_tls_listens_on_localhost():
    opts = ClusterOptions(workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0")
    with connect(opts, report=lambda _: None) as client:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert all(w.startswith("tcp://127.0.0.1:") for w in client.scheduler_info()["workers"])
        assert client.dashboard_link.startswith("http://127.0.0.1:")
