"""DICOM TLS (PS3.15 B.1, BCP 195): the contexts for the listener and for sending.

TLS 1.2 is the floor on both sides: TLS 1.0 and 1.1 peers fail the handshake. When sending, the
destination's certificate is always verified against the configured CA file (and its name against
the destination's host unless `check_hostname: false`). On the listener, client certificates are
verified against `node.tls.ca_file` when given, and required when `require_client_cert`.

A file that cannot be loaded is a ConfigError naming the key, raised when the listener starts or
a send begins, so `mammo-node serve` stops at startup instead of failing every handshake.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from node.errors import ConfigError
from node.settings import DestinationTLS, NodeTLS

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def _load_chain(context: ssl.SSLContext, key: str, cert_file: Path, key_file: Path) -> None:
    try:
        context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"{key}.cert_file/key_file: cannot load {cert_file} with {key_file}: "
                          f"{getattr(error, 'strerror', None) or error}") from None


def _load_ca(context: ssl.SSLContext, key: str, ca_file: Path) -> None:
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"{key}.ca_file: cannot load {ca_file}: "
                          f"{getattr(error, 'strerror', None) or error}") from None


def server_context(tls: NodeTLS, key: str = "node.tls") -> ssl.SSLContext:
    """A listener's context (DICOM, or the monitoring endpoint with `key="monitoring.tls"`): our
    certificate, TLS >= 1.2, client certificates as configured."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_chain(context, key, tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        _load_ca(context, key, tls.ca_file)
        # A client certificate that is presented must verify, even when one is not required.
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(tls: DestinationTLS, key: str = "destinations[].tls") -> ssl.SSLContext:
    """The context for sending: the peer's certificate is verified, never skipped."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname on
    context.minimum_version = MINIMUM_VERSION
    _load_ca(context, key, tls.ca_file)
    context.check_hostname = tls.check_hostname
    if tls.cert_file is not None and tls.key_file is not None:
        _load_chain(context, key, tls.cert_file, tls.key_file)
    return context


def describe_tls_error(error: BaseException) -> str:
    """A short, PHI-free reason for a failed handshake (OpenSSL's reason code when there is one)."""
    if isinstance(error, TimeoutError):
        return "handshake_timeout"
    if isinstance(error, ssl.SSLError):
        return str(error.reason or error.__class__.__name__)
    if isinstance(error, OSError):
        return error.strerror or error.__class__.__name__
    return error.__class__.__name__
