"""A small certificate authority for the local servers, the demo and the tests.

The local servers run with TLS like a deployment does. ``ensure_ca`` creates (once) a CA under
``.local/servers/pki/``; ``issue`` signs server certificates for the loopback names and client certificates
for users. Private keys are written with mode 0600. A deployment brings its own CA and certificates; the
settings (``BPSTREAM_*_CA_FILE`` and friends) take the paths either way.

>>> import tempfile
>>> from pathlib import Path
>>> folder = Path(tempfile.mkdtemp())
>>> ca = ensure_ca(folder)
>>> files = issue(ca, "kafka", hosts=("127.0.0.1", "localhost"))
>>> sorted(p.name for p in (files.ca, files.cert, files.key))
['ca.crt', 'kafka.crt', 'kafka.key']
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
_VALID_DAYS = 825


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """Where the CA's certificate and key lie."""

    folder: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A certificate, its key and the CA that signed it (PEM files)."""

    ca: Path
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key")
    return key


def ensure_ca(folder: Path, *, name: str = "bpstream local CA") -> CertificateAuthority:
    """The CA in ``folder``, created with a fresh key the first time."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority(folder, folder / "ca.crt", folder / "ca.key")
    if ca.cert.exists() and ca.key.exists():
        return ca
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(ca.key, key)
    ca.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca


def issue(ca: CertificateAuthority, name: str, *, hosts: Sequence[str] = LOOPBACK_HOSTS,
          client: bool = False, folder: Path | None = None) -> TlsFiles:
    """Sign a certificate ``<name>.crt`` with key ``<name>.key`` (kept if both exist and are signed by ``ca``).

    Server certificates carry ``hosts`` as subject alternative names; client certificates (``client=True``)
    carry ``name`` as their common name, which brokers may take as the user name.
    """
    out = folder or ca.folder
    out.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(ca.cert, out / f"{name}.crt", out / f"{name}.key")
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    if files.cert.exists() and files.key.exists():
        existing = x509.load_pem_x509_certificate(files.cert.read_bytes())
        if existing.issuer == ca_cert.subject:
            return files
    ca_key = _load_key(ca.key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    else:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = (builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(files.key, key)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files
