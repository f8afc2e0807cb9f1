"""The local CA's certificates complete a verified TLS handshake, and keys are private to their owner."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest

from bpstream.localservers.pki import ensure_ca, issue


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, host: str) -> str:
    """Run a TLS handshake over a socket pair; return the client's view of the server's common name."""
    left, right = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(right, server_side=True) as tls:
                tls.recv(1)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(left, server_hostname=host) as tls:
            peer = tls.getpeercert()
            tls.send(b"x")
    finally:
        thread.join(5)
    assert not errors, errors
    subject = dict(item[0] for item in peer["subject"])
    return str(subject["commonName"])


def test_a_server_certificate_verifies_against_the_ca_for_loopback_names(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path)
    server = issue(ca, "mosquitto")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(server.cert, server.key)
    client_ctx = ssl.create_default_context(cafile=str(ca.cert))
    assert _handshake(server_ctx, client_ctx, "127.0.0.1") == "mosquitto"
    assert _handshake(server_ctx, client_ctx, "localhost") == "mosquitto"
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, client_ctx, "example.org")
    assert stat.S_IMODE(server.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.key.stat().st_mode) == 0o600


def test_another_ca_is_not_trusted(tmp_path: Path) -> None:
    ours = issue(ensure_ca(tmp_path / "ours"), "kafka")
    theirs = ensure_ca(tmp_path / "theirs")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(ours.cert, ours.key)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, ssl.create_default_context(cafile=str(theirs.cert)), "127.0.0.1")


def test_the_ca_and_certificates_are_created_once(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path)
    first = issue(ca, "influxdb").cert.read_bytes()
    assert ensure_ca(tmp_path).cert.read_bytes() == ca.cert.read_bytes()
    assert issue(ca, "influxdb").cert.read_bytes() == first


def test_client_context_from_settings_trusts_the_ca_and_presents_a_client_certificate(tmp_path: Path) -> None:
    from bpstream.shared.tls import TlsConfigError, client_ssl_context

    ca = ensure_ca(tmp_path)
    server = issue(ca, "kafka")
    client = issue(ca, "bpstream-bridge", client=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca.cert))
    server_ctx.load_cert_chain(server.cert, server.key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    assert _handshake(server_ctx, client_ssl_context(ca.cert, client.cert, client.key), "127.0.0.1") == "kafka"
    with pytest.raises(TlsConfigError):
        client_ssl_context(ca.cert, client.cert, None)
    with pytest.raises(TlsConfigError):
        client_ssl_context(tmp_path / "missing.crt")
