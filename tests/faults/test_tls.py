"""DICOM TLS: verified both ways, TLS 1.1 refused, handshakes off the accept thread.

A throw-away CA and certificates are made with the `openssl` CLI in a temporary folder: one
trusted CA with a server and a client certificate, and a rogue CA that signs an impostor of
each. The listener runs in this process; dcmtk's `echoscu`/`storescp` with `+tls` are the
independent peers.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from node.audit import read_audit
from node.errors import TransientError
from node.pynetdicom_internals import RequestorAE
from node.scp import StoreSCP
from node.scu import echo, send_files
from node.settings import Settings, load_settings
from node.tls import client_context
from tests.support.dicom_wire import connect, running_listener, wait_closed, wait_until
from tests.support.settings import make_settings, write_config
from tools.stack.make_study import make_study
from tools.stack.services import find_binary, free_port

pytestmark = [pytest.mark.requires_bin("echoscu", "storescp"), pytest.mark.timeout(180)]

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
ACSE_TIMEOUT_S = 8.0


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: tuple[Path, Path]  # (certificate, key), signed by `ca`, for 127.0.0.1
    client: tuple[Path, Path]
    rogue_server: tuple[Path, Path]  # signed by a CA nobody trusts
    rogue_client: tuple[Path, Path]


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
             "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _make_leaf(folder: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    cert, key, csr = folder / f"{name}.crt", folder / f"{name}.key", folder / f"{name}.csr"
    extensions = folder / f"{name}.ext"
    extensions.write_text("basicConstraints=CA:FALSE\n"
                          "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                          "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", extensions)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make the test certificates", pytrace=False)
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = _make_ca(folder, "ca"), _make_ca(folder, "rogue-ca")
    return Pki(ca=ca[0], server=_make_leaf(folder, "server", ca),
               client=_make_leaf(folder, "client", ca),
               rogue_server=_make_leaf(folder, "rogue-server", rogue_ca),
               rogue_client=_make_leaf(folder, "rogue-client", rogue_ca))


@pytest.fixture(scope="module")
def node(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    settings = make_settings(
        tmp_path_factory.mktemp("tls-node"), listener=True,
        node={"acse_timeout_s": ACSE_TIMEOUT_S,
              "tls": {"cert_file": str(pki.server[0]), "key_file": str(pki.server[1]),
                      "ca_file": str(pki.ca), "require_client_cert": True}},
    )
    with running_listener(settings) as scp:
        yield scp


def _client_context(pki: Pki, chain: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if chain is not None:
        context.load_cert_chain(str(chain[0]), str(chain[1]))
    return context


def _tls_echoscu(port: int, pki: Pki, timeout_s: int = 5) -> subprocess.CompletedProcess[str]:
    """dcmtk's echoscu over TLS with our client certificate: an independent TLS peer."""
    return subprocess.run(
        [find_binary("echoscu"), "-aet", "STORESCU", "-aec", "MAMMO_NODE", "-to", str(timeout_s),
         "-ta", str(timeout_s), "-td", str(timeout_s), "+tls", str(pki.client[1]),
         str(pki.client[0]), "+cf", str(pki.ca), "127.0.0.1", str(port)],
        capture_output=True, text=True, check=False, timeout=timeout_s * 4,
    )


def _assert_still_serving(node: StoreSCP, pki: Pki) -> None:
    result = _tls_echoscu(node.settings.node.port, pki)
    assert result.returncode == 0, result.stdout + result.stderr


def _handshake_failures(node: StoreSCP) -> list[dict]:
    return [r for r in read_audit(node.audit.path)
            if r["event"] == "association_rejected" and r["reason"] == "tls_handshake_failed"]


def _associate(node: StoreSCP, context: ssl.SSLContext) -> AE:
    ae = RequestorAE(ae_title="STORESCU")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context(MG_FOR_PRESENTATION, ["1.2.840.10008.1.2.1"])
    return ae.associate("127.0.0.1", node.settings.node.port, ae_title="MAMMO_NODE",
                        tls_args=(context, "127.0.0.1"))


def test_echo_and_store_over_tls_with_verified_certificates(node: StoreSCP, pki: Pki,
                                                            tmp_path: Path) -> None:
    [path] = make_study(tmp_path / "study", views=["L-CC"], rows=64, cols=48, seed=7)
    assoc = _associate(node, _client_context(pki, pki.client))
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()
    [study] = node.spool.incoming_studies()
    assert [entry.sop_uid for entry in study.instances] == [
        str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)]
    accepted = [r for r in read_audit(node.audit.path) if r["event"] == "association_accepted"]
    assert accepted and all(r["tls"] is True for r in accepted)
    _assert_still_serving(node, pki)  # dcmtk agrees: verified both ways


def _handshake(node: StoreSCP, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", node.settings.node.port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
    tls.settimeout(10)
    return tls


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_a_client_offering_only_tls_1_1_is_refused(node: StoreSCP, pki: Pki) -> None:
    def context(maximum: ssl.TLSVersion) -> ssl.SSLContext:
        ctx = _client_context(pki, pki.client)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let OpenSSL 3 offer the old protocols at all
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = maximum
        return ctx

    before = len(_handshake_failures(node))
    with pytest.raises(ssl.SSLError):
        _handshake(node, context(ssl.TLSVersion.TLSv1_1))
    # The same client allowed TLS 1.2 gets through: it is the version that was refused.
    good = _handshake(node, context(ssl.TLSVersion.TLSv1_2))
    assert good.version() == "TLSv1.2"
    good.close()
    failures = _handshake_failures(node)[before:]
    assert len(failures) == 1
    assert "PROTOCOL" in failures[0]["detail"].upper(), failures[0]
    _assert_still_serving(node, pki)


@pytest.mark.parametrize("who", ["untrusted_certificate", "no_certificate"])
def test_a_client_without_a_trusted_certificate_is_refused(node: StoreSCP, pki: Pki,
                                                            who: str) -> None:
    chain = pki.rogue_client if who == "untrusted_certificate" else None
    before = len(_handshake_failures(node))
    assoc = _associate(node, _client_context(pki, chain))
    assert not assoc.is_established
    # With TLS 1.3 the client may learn of the refusal before the node's connection thread has
    # written its audit record: wait for it (bounded), then check there is exactly one.
    assert wait_until(lambda: len(_handshake_failures(node)) > before, timeout_s=10)
    failures = _handshake_failures(node)[before:]
    assert len(failures) == 1 and failures[0]["host"] == "127.0.0.1"
    _assert_still_serving(node, pki)


@pytest.mark.slow
def test_idle_connections_on_the_tls_port_do_not_stall_the_listener(node: StoreSCP,
                                                                    pki: Pki) -> None:
    before = len(_handshake_failures(node))
    idle = [connect(node.settings.node.port) for _ in range(3)]  # TCP only, no ClientHello
    time.sleep(0.2)
    result = _tls_echoscu(node.settings.node.port, pki, timeout_s=5)
    assert result.returncode == 0, result.stdout + result.stderr
    for sock in idle:  # still open: the echo did not get through because they were dropped
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)
    for sock in idle:  # and the handshake timeout (acse_timeout_s) closes them
        assert wait_closed(sock, ACSE_TIMEOUT_S + 15)
    timeouts = [r for r in _handshake_failures(node)[before:] if r["detail"] == "handshake_timeout"]
    assert len(timeouts) == 3
    _assert_still_serving(node, pki)


# --- sending to a TLS PACS -----------------------------------------------------------------------
@pytest.fixture
def tls_pacs(tmp_path: Path, pki: Pki, request: pytest.FixtureRequest
             ) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp over TLS, requiring our client certificate; param: its server chain."""
    chain = pki.rogue_server if getattr(request, "param", "") == "rogue" else pki.server
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    process = subprocess.Popen(
        [find_binary("storescp"), "-aet", "ARCHIVE", "-od", str(out), "+tls", str(chain[1]),
         str(chain[0]), "+cf", str(pki.ca), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # listening (a TCP connect is enough to know)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield port, out
    process.terminate()
    process.wait(10)


def _sender_settings(tmp_path: Path, port: int, pki: Pki) -> Settings:
    return make_settings(
        tmp_path,
        destinations=[{"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1",
                       "port": port, "timeout_s": 5,
                       "tls": {"ca_file": str(pki.ca), "cert_file": str(pki.client[0]),
                               "key_file": str(pki.client[1])}}],
        send={"attempts": 2, "backoff_s": 0.1, "backoff_max_s": 0.2},
    )


def test_sending_to_a_tls_pacs_verifies_it_and_delivers(tmp_path: Path, pki: Pki,
                                                        tls_pacs: tuple[int, Path]) -> None:
    port, out = tls_pacs
    settings = _sender_settings(tmp_path, port, pki)
    files = make_study(tmp_path / "objs", views=["R-CC", "L-CC"], rows=64, cols=48, seed=8)
    assert echo(settings, settings.destinations[0]) == 0x0000
    outcomes = send_files(settings, settings.destinations[0], files)
    assert [o.ok for o in outcomes] == [True, True]
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.iterdir()}
    assert received == {o.sop_uid for o in outcomes}


@pytest.mark.parametrize("tls_pacs", ["rogue"], indirect=True)
def test_a_tls_pacs_with_an_untrusted_certificate_gets_nothing(
    tmp_path: Path, pki: Pki, tls_pacs: tuple[int, Path]
) -> None:
    port, out = tls_pacs
    settings = _sender_settings(tmp_path, port, pki)
    destination_tls = settings.destinations[0].tls
    assert destination_tls is not None
    with pytest.raises(ssl.SSLCertVerificationError):  # the reason, checked on its own
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        client_context(destination_tls).wrap_socket(raw, server_hostname="127.0.0.1").close()
    files = make_study(tmp_path / "objs", views=["R-CC"], rows=64, cols=48, seed=9)
    outcomes = send_files(settings, settings.destinations[0], files)
    assert [o.status for o in outcomes] == [None]  # never associated, so never delivered
    # The run's send step retries it, then gives up with the reason (the run goes to failed/).
    from pipelines.scoring import send_outputs  # imports the worker side: only here

    sends, failure = send_outputs(settings, files)
    assert failure == ("archive: 1 object(s) not stored after 2 attempts (status None: "
                       "no association: TLS: the destination's certificate was not trusted "
                       "(unable to get local issuer certificate))")
    assert [s["ok"] for s in sends] == [False]
    assert not any(out.iterdir())
    with pytest.raises(TransientError):
        echo(settings, settings.destinations[0])


def test_a_tls_pacs_that_wants_our_certificate_says_so_in_the_failure(
    tmp_path: Path, pki: Pki, tls_pacs: tuple[int, Path]
) -> None:
    """The destination's `tls` names its CA but not our certificate, and the PACS requires one:
    with TLS 1.3 our side of the handshake completes, and the PACS's refusal arrives as an alert
    on the first read. The reason names the alert, not a generic "no association"."""
    port, out = tls_pacs
    settings = make_settings(
        tmp_path,
        destinations=[{"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1",
                       "port": port, "timeout_s": 5, "tls": {"ca_file": str(pki.ca)}}])
    files = make_study(tmp_path / "objs", views=["R-CC"], rows=64, cols=48, seed=10)
    outcomes = send_files(settings, settings.destinations[0], files)
    assert [(o.status, o.unanswered) for o in outcomes] == [
        (None, "no association: the destination ended the TLS connection "
               "(TLSV13_ALERT_CERTIFICATE_REQUIRED)")]
    assert not any(out.iterdir())


def test_a_tls_destination_on_a_port_without_tls_says_so(tmp_path: Path, pki: Pki) -> None:
    """`tls` set for a PACS port that speaks plain DICOM (a mix-up of ports): the PACS reads our
    ClientHello as a broken PDU and drops the connection; the reason says it was the handshake."""
    port = free_port()
    process = subprocess.Popen([find_binary("storescp"), "-aet", "ARCHIVE", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run([find_binary("echoscu"), "-aec", "ARCHIVE", "127.0.0.1", str(port)],
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "storescp never answered C-ECHO"
            time.sleep(0.1)
        settings = make_settings(tmp_path, destinations=[
            {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": port,
             "timeout_s": 5, "tls": {"ca_file": str(pki.ca)}}])
        files = make_study(tmp_path / "objs", views=["R-CC"], rows=64, cols=48, seed=11)
        outcomes = send_files(settings, settings.destinations[0], files)
    finally:
        process.terminate()
        process.wait(10)
    assert [(o.status, o.unanswered) for o in outcomes] == [
        (None, "no association: the connection was dropped in the TLS handshake (a port "
               "without TLS does that)")]


def test_tls_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "etc" / "node.yaml",
        node={"tls": {"cert_file": "tls/node.crt", "key_file": "tls/node.key",
                      "ca_file": "tls/ca.crt", "require_client_cert": True}},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.1", "port": 2762,
                       "tls": {"ca_file": "tls/pacs-ca.crt"}}],
    )
    settings = load_settings(path)
    assert settings.node.tls is not None and settings.destinations[0].tls is not None
    assert settings.node.tls.cert_file == tmp_path / "etc" / "tls" / "node.crt"
    assert settings.node.tls.ca_file == tmp_path / "etc" / "tls" / "ca.crt"
    assert settings.destinations[0].tls.ca_file == tmp_path / "etc" / "tls" / "pacs-ca.crt"
