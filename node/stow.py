"""Sending by DICOMweb STOW-RS (PS3.18 10.5) to a `dicomweb_destinations` entry.

The counterpart of `node/scu.py:send_files` for a web archive (Orthanc's DICOMweb plugin, a
cloud PACS): one POST of every file to `<url>/studies`, and one `SendOutcome` per file read from
the response's Referenced SOP Sequence (stored: 0x0000, or its Warning Reason) and Failed SOP
Sequence (its Failure Reason). No response, a refused connection or an HTTP error without a
readable body gives no status (None), exactly like an association that never opened, so the
caller's retries, backoff and `failed/` parking (pipelines/scoring.py) are the same for both
protocols. dicomweb-client's own retries are switched off: one policy, the node's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread

from node.errors import TransientError
from node.logs import get_logger
from node.scu import SendOutcome
from node.settings import DicomWebDestination

log = get_logger("node.stow")

FAILED_SOP_SEQUENCE = "FailedSOPSequence"
REFERENCED_SOP_SEQUENCE = "ReferencedSOPSequence"
# Failure Reason "Processing failure" (PS3.7 C.4.2): a failed instance listed without a reason.
PROCESSING_FAILURE = 0x0110


def _headers(destination: DicomWebDestination) -> dict[str, str]:
    if destination.token_env:
        token = os.environ.get(destination.token_env)
        if token:
            return {"Authorization": f"Bearer {token}"}
    return {}


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment: the URL says where results go
    return session


def _client(destination: DicomWebDestination) -> DICOMwebClient:
    client = DICOMwebClient(url=destination.url, session=_session(), headers=_headers(destination),
                            timeout=destination.timeout_s)
    client.set_http_retry_params(retry=False)
    return client


def _no_answer(destination: DicomWebDestination, error: requests.RequestException) -> str:
    """Why a request got no HTTP answer, in words (no URL query, no token)."""
    if isinstance(error, requests.ConnectionError):
        return "no connection"
    if isinstance(error, requests.Timeout):
        return f"no answer within {destination.timeout_s:g} s"
    return type(error).__name__


def probe(destination: DicomWebDestination) -> int:
    """The HTTP status of a QIDO-RS `GET <url>/studies?limit=1` with the destination's token:
    what `mammo-node echo` does for a web archive (the URL, TLS and the token, as C-ECHO checks
    the address and the AE titles). TransientError when no answer came."""
    try:
        response = _session().get(
            f"{destination.url.rstrip('/')}/studies", params={"limit": "1"},
            headers={**_headers(destination), "Accept": "application/dicom+json"},
            timeout=destination.timeout_s)
    except requests.RequestException as error:
        raise TransientError(f"destination {destination.name}: "
                             f"{_no_answer(destination, error)}") from None
    response.close()
    return int(response.status_code)


def _statuses(response: Dataset) -> dict[str, int]:
    """SOP Instance UID -> status, from a STOW-RS response body (PS3.18 10.5.3)."""
    statuses: dict[str, int] = {}
    for item in response.get(REFERENCED_SOP_SEQUENCE, []):
        statuses[str(item.ReferencedSOPInstanceUID)] = int(item.get("WarningReason", 0) or 0)
    for item in response.get(FAILED_SOP_SEQUENCE, []):
        reason = item.get("FailureReason")
        statuses[str(item.ReferencedSOPInstanceUID)] = int(reason) if reason is not None \
            else PROCESSING_FAILURE
    return statuses


def _error_body(error: requests.HTTPError) -> Dataset:
    """The DICOM JSON body of a failed STOW-RS (409 carries a Failed SOP Sequence), if any."""
    response = error.response
    if response is None or "json" not in response.headers.get("Content-Type", ""):
        return Dataset()
    try:
        return Dataset.from_json(response.json())
    except ValueError:
        return Dataset()


def stow_files(destination: DicomWebDestination, paths: list[Path],
               on_stored: Callable[[SendOutcome], None] | None = None) -> list[SendOutcome]:
    """STOW-RS every file in one request; never raises for a per-object failure. `on_stored`
    as for `node.scu.send_files`: each object the server stored, once its answer is read."""
    if not paths:
        return []
    datasets = [dcmread(p) for p in paths]
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    unanswered = None
    try:
        response = _client(destination).store_instances(datasets)
    except requests.HTTPError as error:
        code = error.response.status_code if error.response is not None else None
        log.warning("stow_failed", destination=destination.name, http_status=code)
        response = _error_body(error)
        unanswered = f"HTTP {code}"  # e.g. 401: the token; 413: the server's size limit
    except requests.RequestException as error:
        log.warning("stow_failed", destination=destination.name, reason=type(error).__name__)
        why = _no_answer(destination, error)
        return [SendOutcome(uid, None, unanswered=why) for uid in uids]
    statuses = _statuses(response)
    outcomes = [SendOutcome(uid, statuses.get(uid),
                            unanswered=None if uid in statuses else unanswered) for uid in uids]
    for outcome in outcomes:
        if on_stored is not None and outcome.ok:
            on_stored(outcome)
    return outcomes
