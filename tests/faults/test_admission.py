"""Who gets in: allow-listed calling AE from its host, our called AE, and at most
`node.max_associations` at once (beyond: rejected-transient, local-limit-exceeded). Every refusal
is one log line and one audit record; a burst of 200 associations is served and nothing hangs.

Requests are packed by hand (tests/support/dicom_wire.py) so the exact A-ASSOCIATE-RJ
(result, source, reason) is checked, and so 200 clients cost 200 blocked threads, not 200
polling reactors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.audit import read_audit
from node.scp import StoreSCP
from tests.support.dicom_wire import (
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    Pdu,
    associate,
    associate_rq,
    connect,
    echo_on,
    echoscu,
    read_pdu,
    release,
    running_listener,
    wait_closed,
    wait_until,
)
from tests.support.settings import make_settings

pytestmark = [pytest.mark.requires_bin("echoscu"), pytest.mark.timeout(300)]

REJECTED_PERMANENT_CALLING_AE = (0x01, 0x01, 0x03)
REJECTED_PERMANENT_CALLED_AE = (0x01, 0x01, 0x07)
REJECTED_TRANSIENT_LOCAL_LIMIT = (0x02, 0x03, 0x02)


def _listener(tmp_path: Path, max_associations: int, **node: object) -> Iterator[StoreSCP]:
    settings = make_settings(
        tmp_path, listener=True,
        node={"max_associations": max_associations, "network_timeout_s": 60,
              "acse_timeout_s": 60, **node},
        allowed_callers=[{"ae_title": "STORESCU", "host": "127.0.0.1"},
                         {"ae_title": "PINNED", "host": "127.0.0.2"}],
    )
    with running_listener(settings) as scp:
        yield scp


@pytest.fixture
def node(tmp_path: Path) -> Iterator[StoreSCP]:
    yield from _listener(tmp_path, max_associations=3)


def _port(node: StoreSCP) -> int:
    return node.settings.node.port


def _assert_still_serving(node: StoreSCP) -> None:
    result = echoscu(_port(node))
    assert result.returncode == 0, result.stdout + result.stderr


def _rejections(node: StoreSCP, reason: str) -> list[dict]:
    return [r for r in read_audit(node.audit.path)
            if r["event"] == "association_rejected" and r.get("reason") == reason]


def test_unknown_calling_ae_is_rejected_with_one_log_line_and_an_audit_record(
    node: StoreSCP, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    sock, answer = associate(_port(node), calling="STRANGER")
    sock.close()
    assert answer.rejection() == REJECTED_PERMANENT_CALLING_AE
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "STRANGER" in line]
    assert len(lines) == 1 and "association_rejected" in lines[0], lines
    [record] = _rejections(node, "calling_ae_title_not_recognised")
    assert record["calling_ae"] == "STRANGER" and record["host"] == "127.0.0.1"
    assert record["called_ae"] == "MAMMO_NODE"
    _assert_still_serving(node)


def test_an_allowed_ae_title_from_the_wrong_address_is_refused(node: StoreSCP) -> None:
    wrong = connect(_port(node), source="127.0.0.1")  # PINNED is allowed from 127.0.0.2 only
    wrong.sendall(associate_rq("PINNED", "MAMMO_NODE"))
    assert read_pdu(wrong).rejection() == REJECTED_PERMANENT_CALLING_AE
    wrong.close()
    right = connect(_port(node), source="127.0.0.2")
    right.sendall(associate_rq("PINNED", "MAMMO_NODE"))
    assert read_pdu(right).type == A_ASSOCIATE_AC
    assert echo_on(right) == 0x0000
    assert release(right)
    [refused] = _rejections(node, "calling_host_not_allowed")
    assert refused["calling_ae"] == "PINNED" and refused["host"] == "127.0.0.1"
    accepted = [r for r in read_audit(node.audit.path) if r["event"] == "association_accepted"]
    assert any(r["calling_ae"] == "PINNED" and r["host"] == "127.0.0.2" for r in accepted)
    _assert_still_serving(node)


def test_wrong_called_ae_is_refused(node: StoreSCP) -> None:
    sock, answer = associate(_port(node), called="SOMEONE_ELSE")
    sock.close()
    assert answer.rejection() == REJECTED_PERMANENT_CALLED_AE
    [record] = _rejections(node, "called_ae_title_not_recognised")
    assert record["called_ae"] == "SOMEONE_ELSE"
    _assert_still_serving(node)


def test_beyond_max_associations_requests_are_rejected_as_transient(node: StoreSCP) -> None:
    held = []
    for _ in range(3):
        sock, answer = associate(_port(node))
        assert answer.type == A_ASSOCIATE_AC
        held.append(sock)
    sock, answer = associate(_port(node))
    sock.close()
    assert answer.rejection() == REJECTED_TRANSIENT_LOCAL_LIMIT
    [record] = _rejections(node, "too_many_associations")
    assert (record["result"], record["source"], record["diagnostic"]) == ("0x02", "0x03", "0x02")
    # A slot freed is a slot given again.
    assert release(held.pop())
    assert wait_until(lambda: node.limiter.active == 2, 10)
    sock, answer = associate(_port(node))
    assert answer.type == A_ASSOCIATE_AC
    held.append(sock)
    for sock in held:
        assert echo_on(sock) == 0x0000
        assert release(sock)
    assert wait_until(lambda: node.limiter.active == 0, 10)
    _assert_still_serving(node)


def _burst(port: int, clients: int) -> list[tuple[Pdu | None, int | None, str]]:
    """`clients` associations requested at once; all hold their answer until every client has
    one (so the accepted ones are open simultaneously), then accepted ones echo and release.
    Returns (answer, echo status, error) per client."""
    barrier = threading.Barrier(clients, timeout=240)
    results: list[tuple[Pdu | None, int | None, str]] = [(None, None, "not run")] * clients

    def client(index: int) -> None:
        answer: Pdu | None = None
        try:
            sock, answer = associate(port, timeout_s=120)
            barrier.wait()
            status = None
            if answer.type == A_ASSOCIATE_AC:
                status = echo_on(sock, timeout_s=120)
                release(sock, timeout_s=120)
            else:
                sock.close()
            results[index] = (answer, status, "")
        except Exception as error:  # reported by the assertions, never swallowed
            barrier.abort()
            results[index] = (answer, None, repr(error))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(280)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return results


@pytest.mark.slow
def test_200_simultaneous_associations_are_served(tmp_path: Path) -> None:
    # Room for the whole burst to be connected before any request is read (default 128).
    for node in _listener(tmp_path, max_associations=200, max_pending_connections=250):
        results = _burst(_port(node), 200)
        errors = [error for _, _, error in results if error]
        assert not errors, errors[:5]
        assert all(a is not None and a.type == A_ASSOCIATE_AC for a, _, _ in results)
        assert [status for _, status, _ in results] == [0x0000] * 200
        assert wait_until(lambda node=node: node.limiter.active == 0, 30)
        accepted = [r for r in read_audit(node.audit.path) if r["event"] == "association_accepted"]
        assert len(accepted) == 200
        _assert_still_serving(node)


@pytest.mark.slow
def test_a_burst_beyond_the_limit_gets_transient_rejections_and_nothing_hangs(
    tmp_path: Path,
) -> None:
    for node in _listener(tmp_path, max_associations=20):
        results = _burst(_port(node), 60)
        errors = [error for _, _, error in results if error]
        assert not errors, errors[:5]
        accepted = [s for a, s, _ in results if a is not None and a.type == A_ASSOCIATE_AC]
        rejected = [a for a, _, _ in results if a is not None and a.type == A_ASSOCIATE_RJ]
        assert len(accepted) == 20 and accepted == [0x0000] * 20
        assert len(rejected) == 40
        assert {a.rejection() for a in rejected} == {REJECTED_TRANSIENT_LOCAL_LIMIT}
        assert len(_rejections(node, "too_many_associations")) == 40
        assert wait_until(lambda node=node: node.limiter.active == 0, 30)
        _assert_still_serving(node)


def test_a_flood_of_silent_connections_evicts_the_oldest_and_real_clients_get_in(
    tmp_path: Path,
) -> None:
    for node in _listener(tmp_path, max_associations=3, max_pending_connections=4):
        silent = [connect(_port(node)) for _ in range(4)]  # never send a byte (acse_timeout 60 s)
        assert wait_until(lambda node=node: len(node.pending) == 4, 10)
        newcomer = connect(_port(node))  # one more: the oldest is closed for it
        assert wait_closed(silent[0], 10)
        for sock in silent[1:]:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):  # the others are still open
                sock.recv(1)
        _assert_still_serving(node)  # a real client during the flood gets in
        assert wait_closed(silent[1], 10)  # ...by pushing out the next oldest
        evictions = _rejections(node, "too_many_pending_connections")
        assert len(evictions) == 2 and all(r["action"] == "closed" for r in evictions)
        for sock in [*silent, newcomer]:
            sock.close()
