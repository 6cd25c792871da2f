"""UID validation and deterministic UID derivation."""

from __future__ import annotations

import hashlib
import re

from pydicom.uid import generate_uid

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid DICOM UID (PS3.5 9.1): digits and dots, no leading zeros, <= 64."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.match(value) is not None


def derive_uid(uid_root: str | None, *parts: str) -> str:
    """A UID that depends only on `parts`, so re-running the same inputs gives the same UID.

    With no root, a 2.25 UUID-derived UID (PS3.5 B.2) is made from a hash of the parts.
    """
    if uid_root is None:
        digest = hashlib.sha256("\x1f".join(["mammo-node", *parts]).encode("utf-8")).digest()
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"
    return str(generate_uid(prefix=uid_root, entropy_srcs=["mammo-node", *parts]))
