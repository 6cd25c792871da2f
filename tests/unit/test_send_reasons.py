"""Why a send got no association, in words: each failed connect names its cause."""

from __future__ import annotations

import socket
import ssl

import pytest

from node.scu import connect_failure


@pytest.mark.parametrize(("error", "tls", "words"), [
    (ConnectionRefusedError(111, "Connection refused"), False,
     "connection refused (nothing listens on the destination's port)"),
    (TimeoutError("timed out"), False, "no connection within 7.5 s (connect timed out)"),
    (socket.gaierror(-2, "Name or service not known"), False,
     "the destination's host name did not resolve (Name or service not known)"),
    (OSError(113, "No route to host"), False, "no connection (EHOSTUNREACH: No route to host)"),
    (OSError("something odd"), False, "no connection (OSError)"),
    # With TLS a reset or an EOF in connect() is the handshake's; without, it is the network's.
    (ConnectionResetError(104, "Connection reset by peer"), True,
     "the connection was dropped in the TLS handshake (a port without TLS does that)"),
    (ConnectionResetError(104, "Connection reset by peer"), False,
     "no connection (ECONNRESET: Connection reset by peer)"),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), True,
     "the connection was dropped in the TLS handshake (a port without TLS does that)"),
    (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), True,
     "TLS handshake failed ([SSL: WRONG_VERSION_NUMBER] wrong version number)"),
])
def test_a_failed_connect_names_its_cause(error: OSError, tls: bool, words: str) -> None:
    assert connect_failure(error, 7.5, tls) == words


def test_an_untrusted_certificate_names_the_verification_failure() -> None:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "self-signed certificate"
    assert connect_failure(error, 5, True) == (
        "TLS: the destination's certificate was not trusted (self-signed certificate)")
