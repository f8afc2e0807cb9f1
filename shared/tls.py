"""TLS client contexts built from settings: one place that turns CA / certificate / key paths into an
``ssl.SSLContext`` for aiokafka, Faust, paho-mqtt and the InfluxDB client.

>>> ctx = client_ssl_context(None)
>>> ctx.verify_mode.name, ctx.check_hostname
('CERT_REQUIRED', True)
"""

from __future__ import annotations

import ssl
from pathlib import Path

from bpstream.shared.errors import BpstreamError


class TlsConfigError(BpstreamError):
    """A CA, certificate or key setting that cannot be used."""

    reason = "tls_config"


def client_ssl_context(ca_file: str | Path | None, cert_file: str | Path | None = None,
                       key_file: str | Path | None = None) -> ssl.SSLContext:
    """A verifying client context (TLS 1.2+, hostname checked): trusts ``ca_file`` (the system store when
    None) and presents ``cert_file``/``key_file`` when both are given (mutual TLS)."""
    if (cert_file is None) != (key_file is None):
        raise TlsConfigError("a client certificate needs both a certificate file and a key file")
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file is not None and key_file is not None:
            ctx.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load TLS files: {exc}") from exc
    return ctx
