"""Chunked C-STORE receive that answers, rather than hangs, when the disk is full or nearly so.

With `STORE_RECV_CHUNKED_DATASET`, pynetdicom 3.0.4 writes each incoming data set fragment to a
temporary file from inside its DUL state machine (`DIMSEServiceProvider.receive_primitive` ->
`DIMSEMessage.decode_msg` -> `NamedTemporaryFile.write`). A write that fails (ENOSPC, EDQUOT,
EIO) raises out of `StateMachine.do_action`, which marks the DUL for death and re-raises;
`DULServiceProvider.run_reactor` calls `do_action` outside its own try block, so the DUL thread
dies with the exception. Nobody sends a C-STORE-RSP or an A-ABORT, nobody closes the socket, and
the partial temporary file stays behind: the sender waits for a response that never comes.

`SpoolingDIMSE` replaces the association's DIMSE provider (the library is not edited). When a
write fails, or when a C-STORE's data set starts while the spool is below its free-space
watermark, it deletes the temporary file, reads and drops the rest of that message's fragments,
and hands the C-STORE to the handler marked as refused, so the sender gets 0xA700 (out of
resources) on an association that stays usable. Nothing of the refused instance stays on disk.

`disk_rejection` is the same watermark at association negotiation: below it a new association
that proposes storage is rejected as transient (the sender retries later); one that proposes only
Verification is still admitted, so monitoring can tell a full node from a dead one.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ

from node.logs import get_logger
from node.uids import is_valid_uid

log = get_logger("node.receive")

VERIFICATION = "1.2.840.10008.1.1"
# A-ASSOCIATE-RJ rejected-transient, service-provider (presentation), local-limit-exceeded.
REJECT_TRANSIENT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
# Attribute set on a C-STORE primitive whose data set was not kept; its value is the reason.
REFUSAL_ATTRIBUTE = "mammo_refusal"


def disk_rejection(
    free_bytes: int, min_free_bytes: int, abstract_syntaxes: Iterable[str]
) -> tuple[int, int, int] | None:
    """The A-ASSOCIATE-RJ triple for a spool below its watermark, or None to go on (pure)."""
    if free_bytes >= min_free_bytes:
        return None
    if all(str(syntax) == VERIFICATION for syntax in abstract_syntaxes):
        return None
    return REJECT_TRANSIENT_LOCAL_LIMIT


def free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0  # the spool is unreachable: as good as full


def refusal_of(request: Any) -> str | None:
    """Why the receive of this C-STORE was abandoned (the data set is gone), or None."""
    value = getattr(request, REFUSAL_ATTRIBUTE, None)
    return str(value) if value else None


def _loggable_uid(value: Any) -> str:
    return str(value) if is_valid_uid(str(value)) else "(invalid)"


def _ends_data_set(primitive: Any) -> bool:
    """True when this P-DATA carries the last fragment of a message's data set."""
    for _context_id, data in primitive.presentation_data_value_list:
        if data and not data[0] & 1 and data[0] & 2:
            return True
    return False


class SpoolingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with a failing or refused chunked write turned into 0xA700."""

    def __init__(self, assoc: Any, spool_dir: Path, min_free_bytes: int) -> None:
        super().__init__(assoc)
        self._spool_dir = Path(spool_dir)
        self._min_free_bytes = min_free_bytes
        self._refusal: str | None = None  # set while the rest of a message is being dropped

    def receive_primitive(self, primitive: Any) -> None:
        if self._refusal is not None and self.message is not None:
            if _ends_data_set(primitive):
                self._deliver_refused()
            return
        writing_before = self.message is not None and self.message._data_set_file is not None
        try:
            super().receive_primitive(primitive)
        except OSError as error:
            if not isinstance(self.message, C_STORE_RQ):
                raise
            self._refuse(errno.errorcode.get(error.errno or 0, type(error).__name__).lower())
            if _ends_data_set(primitive):
                self._deliver_refused()
            return
        message = self.message
        started_now = (
            message is not None and not writing_before and message._data_set_file is not None
        )
        if started_now and free_bytes(self._spool_dir) < self._min_free_bytes:
            self._refuse("disk_below_watermark")

    def _refuse(self, reason: str) -> None:
        """Delete what was written of the current C-STORE; drop the rest of its fragments."""
        message = self.message
        assert message is not None
        handle = message._data_set_file
        if handle is not None:
            try:
                handle.close()  # flushing the buffer may fail again on a full disk: the fd closes
            except OSError:
                pass
            Path(handle.name).unlink(missing_ok=True)
        self._refusal = reason
        log.warning(
            "instance_receive_abandoned",
            reason=reason,
            sop_uid=_loggable_uid(message.command_set.get("AffectedSOPInstanceUID", "")),
        )

    def _deliver_refused(self) -> None:
        """Queue the C-STORE for its handler, marked refused, exactly as a complete one would be."""
        message = self.message
        assert message is not None and self._refusal is not None
        request = message.message_to_primitive()
        setattr(request, REFUSAL_ATTRIBUTE, self._refusal)
        self.msg_queue.put((message.context_id, request))  # type: ignore[arg-type]
        self._refusal = None
        self.message = None
