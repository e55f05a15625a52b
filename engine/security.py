"""TLS with mutual authentication for voxelmill's Dask clusters.

:func:`make_certificates` writes a small private certificate authority (CA) and one
certificate per role (scheduler, worker, client) signed by it; :func:`load_security` turns
such a folder into a ``distributed.Security`` that encrypts every connection and accepts only
peers whose certificate the same CA signed.

Layout of the folder (keys are written with mode 0600)::

    ca.crt  ca.key                  the certificate authority
    scheduler.crt  scheduler.key    dask scheduler --tls-ca-file ca.crt --tls-cert … --tls-key …
    worker.crt  worker.key          dask worker tls://… --tls-ca-file ca.crt --tls-cert … …
    client.crt  client.key          voxelmill --tls DIR …
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import DestinationError, OptionError

if TYPE_CHECKING:
    from distributed import Security

#: roles that get a certificate, in the order they are written
ROLES = ("scheduler", "worker", "client")
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
#: hosts every certificate is valid for, besides those given
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class CertificateSet:
    """The files of a certificate folder made by :func:`make_certificates`.

    Parameters
    ----------
    directory : Path
        The folder.
    ca_cert, ca_key : Path
        The certificate authority's certificate and private key.
    certs, keys : dict of str to Path
        Certificate and private key per role (``scheduler``, ``worker``, ``client``).
    """

    directory: Path
    ca_cert: Path
    ca_key: Path
    certs: dict[str, Path] = field(default_factory=dict)
    keys: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def at(cls, directory: Path) -> CertificateSet:
        """The file names a certificate folder at ``directory`` has (absolute paths)."""
        directory = Path(directory).expanduser().absolute()
        return cls(
            directory=directory,
            ca_cert=directory / CA_CERT,
            ca_key=directory / CA_KEY,
            certs={r: directory / f"{r}.crt" for r in ROLES},
            keys={r: directory / f"{r}.key" for r in ROLES},
        )

    @property
    def files(self) -> list[Path]:
        """Every file of the set: the CA's certificate and key, then each role's."""
        out = [self.ca_cert, self.ca_key]
        for role in ROLES:
            out += [self.certs[role], self.keys[role]]
        return out


def _hint(directory: Path) -> str:
    return f"run 'voxelmill cluster certs {directory}' to create the certificates"


def _san(hosts: Sequence[str]) -> list[object]:
    from cryptography import x509

    names: list[object] = []
    seen: set[str] = set()
    for host in (*DEFAULT_HOSTS, *hosts):
        host = host.strip()
        if not host:
            raise OptionError("--host '': expected a host name or an IP address")
        if host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write a new file; private files are created with mode 0600 (never readable by others,
    not even for an instant)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    try:
        if private:
            os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def make_certificates(
    directory: Path,
    hosts: Sequence[str] = (),
    days: int = 365,
    overwrite: bool = False,
) -> CertificateSet:
    """Create a certificate authority and certificates for scheduler, worker and client.

    Every certificate is signed by the new CA, carries both the ``serverAuth`` and the
    ``clientAuth`` extended key usage (each process both listens and connects) and is valid
    for ``localhost``, ``127.0.0.1`` and ``hosts``. Keys are ECDSA P-256, written unencrypted
    with mode 0600: protect the folder like a password.

    Parameters
    ----------
    directory : Path
        Folder to write into (created if missing).
    hosts : sequence of str
        Extra host names or IP addresses the certificates are valid for (the names the
        scheduler and workers are reached under, e.g. ``scheduler`` in docker compose).
    days : int
        Validity in days, from now.
    overwrite : bool
        Replace existing certificate files; without it, existing files are an error.

    Returns
    -------
    CertificateSet
        The files written.

    Raises
    ------
    OptionError
        For ``days`` < 1 or an empty host name.
    DestinationError
        If a file exists (without ``overwrite``) or the folder cannot be written.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise OptionError(f"--days {days}: expected a number of days ≥ 1")
    san = x509.SubjectAlternativeName(_san(hosts))
    certs = CertificateSet.at(directory)
    existing = [p.name for p in certs.files if p.exists()]
    if existing and not overwrite:
        raise DestinationError(
            f"{certs.directory} already holds {', '.join(existing)}; pass --overwrite to "
            "replace them (then restart the scheduler and workers with the new files)"
        )
    try:
        certs.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise DestinationError(f"cannot create {certs.directory}: {exc.strerror}") from None

    now = _dt.datetime.now(_dt.UTC)
    start = now - _dt.timedelta(minutes=5)  # tolerate clocks a little behind
    end = now + _dt.timedelta(days=days)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "voxelmill"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("voxelmill CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files: list[tuple[Path, bytes, bool]] = [
        (certs.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), False),
        (certs.ca_key, pem_key(ca_key), True),
    ]
    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(f"voxelmill {role}")).issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .add_extension(san, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        files.append((certs.certs[role], cert.public_bytes(serialization.Encoding.PEM), False))
        files.append((certs.keys[role], pem_key(key), True))
    try:
        for path, data, private in files:
            _write(path, data, private)
    except OSError as exc:
        raise DestinationError(f"cannot write {exc.filename or certs.directory}: "
                               f"{exc.strerror}") from None
    return certs


def _read(path: Path, directory: Path) -> bytes:
    if not path.is_file():
        raise OptionError(f"--tls {directory}: {path} is missing; {_hint(directory)}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise OptionError(f"--tls {directory}: cannot read {path} ({exc.strerror}); "
                          f"{_hint(directory)}") from None


def _load_cert(path: Path, directory: Path) -> object:
    from cryptography import x509

    data = _read(path, directory)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise OptionError(f"--tls {directory}: {path} is not a PEM certificate; "
                          f"{_hint(directory)}") from None


def _load_key(path: Path, directory: Path) -> object:
    from cryptography.hazmat.primitives import serialization

    data = _read(path, directory)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise OptionError(f"--tls {directory}: {path} is not an unencrypted PEM private key; "
                          f"{_hint(directory)}") from None


def _check_pair(cert: object, key: object, ca: object, cert_path: Path, key_path: Path,
                directory: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    def public(k: object) -> bytes:
        return k.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                              serialization.PublicFormat.SubjectPublicKeyInfo)

    if public(cert.public_key()) != public(key.public_key()):  # type: ignore[attr-defined]
        raise OptionError(f"--tls {directory}: {key_path} is not the key of {cert_path}; "
                          f"{_hint(directory)}")
    try:
        cert.verify_directly_issued_by(ca)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - ValueError, TypeError or InvalidSignature
        raise OptionError(f"--tls {directory}: {cert_path} is not signed by "
                          f"{directory / CA_CERT}; {_hint(directory)}") from None
    expires = cert.not_valid_after_utc  # type: ignore[attr-defined]
    if expires < _dt.datetime.now(_dt.UTC):
        raise OptionError(f"--tls {directory}: {cert_path} expired on {expires:%Y-%m-%d}; "
                          f"{_hint(directory)} (with --overwrite)")


def load_security(
    directory: Path,
    role: str = "client",
    require: Sequence[str] = (),
) -> Security:
    """A ``distributed.Security`` from a folder made by :func:`make_certificates`.

    The result requires encryption and mutual authentication: this process presents the
    certificate of ``role`` when it connects, and accepts only peers whose certificate the
    folder's CA signed. The scheduler's and the worker's certificates are included when the
    folder holds them (an embedded cluster needs both; pass ``require=("scheduler",
    "worker")``), so a client machine needs only ``ca.crt`` and its own pair.

    Parameters
    ----------
    directory : Path
        The certificate folder.
    role : {"client", "scheduler", "worker"}
        Whose certificate and key this process presents as a client.
    require : sequence of str
        Further roles whose certificate and key must be present.

    Returns
    -------
    distributed.Security
        With ``tls_ca_file``, ``tls_client_cert``/``key`` and, where present, the
        scheduler's and the worker's certificate and key (absolute paths).

    Raises
    ------
    OptionError
        For a missing folder; a missing, unreadable or malformed file; a key that does not
        belong to its certificate, a certificate another CA signed or one that expired. The
        message names the file and says to run ``voxelmill cluster certs DIR``.
    """
    from distributed import Security

    if role not in ROLES:
        raise OptionError(f"TLS role {role!r}: expected one of {', '.join(ROLES)}")
    certs = CertificateSet.at(directory)
    shown = Path(directory)
    if not certs.directory.is_dir():
        raise OptionError(f"--tls {shown}: no such folder; {_hint(shown)}")
    ca = _load_cert(certs.ca_cert, shown)
    needed = {role, *require}
    kwargs: dict[str, str] = {"tls_ca_file": str(certs.ca_cert)}
    for r in ROLES:
        cert_path, key_path = certs.certs[r], certs.keys[r]
        if r not in needed and not (cert_path.exists() or key_path.exists()):
            continue
        cert = _load_cert(cert_path, shown)
        key = _load_key(key_path, shown)
        _check_pair(cert, key, ca, cert_path, key_path, shown)
        if r in ("scheduler", "worker"):
            kwargs[f"tls_{r}_cert"] = str(cert_path)
            kwargs[f"tls_{r}_key"] = str(key_path)
    kwargs["tls_client_cert"] = str(certs.certs[role])
    kwargs["tls_client_key"] = str(certs.keys[role])
    return Security(require_encryption=True, **kwargs)
