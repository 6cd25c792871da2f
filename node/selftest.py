"""`mammo-node selftest`: a synthetic study through the running node's real path, for monitoring.

The study is built here (node/synthetic.py), sent by C-STORE to the node's own listener as one of
its allowed callers, received, completed, queued, scored by a worker and sent to the
destinations like any other; the self-test then waits for that study's run record to reach
`done/` with every object stored at the destinations it was asked to check. It reads the spool,
so it runs on the node's host, with the node's configuration.

The study says what it is, so a PACS can filter it out: PatientName `SELFTEST^MAMMO-NODE`,
PatientID `MAMMO-NODE-SELFTEST`, a study description naming the self-test; a fresh seed each
time gives new UIDs, so each self-test is a new study rather than a resend of the last one.
"""

from __future__ import annotations

import ipaddress
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread

from node.errors import TransientError
from node.runs import RunRecord, read_record
from node.scu import send_files
from node.settings import Destination, Settings
from node.spool import Spool, study_key
from node.synthetic import make_study

SELFTEST_PATIENT_NAME = "SELFTEST^MAMMO-NODE"
SELFTEST_PATIENT_ID = "MAMMO-NODE-SELFTEST"
SELFTEST_ACCESSION = "SELFTEST"
# Small images: the self-test checks the path, not the model; 512 x 416 keeps it a few seconds.
SELFTEST_ROWS, SELFTEST_COLS = 512, 416
LOOPBACK = "127.0.0.1"


class SelftestError(ValueError):
    """The self-test cannot run with this configuration (a usage problem, not a node failure)."""


@dataclass(frozen=True)
class SelftestResult:
    """What the self-test saw; `ok` is the answer for monitoring."""

    ok: bool
    study_uid: str
    lines: tuple[str, ...] = field(default=())
    run_id: str | None = None


def listener_address(settings: Settings) -> str:
    """Where to reach our own listener from this host: its address, or loopback when it binds all."""
    address = ipaddress.ip_address(settings.node.bind_address)
    if address.is_unspecified:
        return LOOPBACK if address.version == 4 else "::1"
    return str(address)


def calling_ae_for(settings: Settings, host: str, wanted: str | None = None) -> str:
    """An allowed caller the listener admits from `host` (the one named, or the first that fits)."""
    admitted = [c.ae_title for c in settings.allowed_callers
                if c.host is None or ipaddress.ip_address(c.host) == ipaddress.ip_address(host)]
    if wanted is not None:
        if wanted not in admitted:
            raise SelftestError(f"--calling-ae {wanted}: not an allowed caller from {host} "
                                f"(allowed_callers admits {', '.join(admitted) or 'none'} from there)")
        return wanted
    if not admitted:
        raise SelftestError(f"no allowed caller is admitted from {host}: add one to allowed_callers "
                            "(e.g. SELFTEST with host 127.0.0.1) and pass --calling-ae")
    return admitted[0]


def chosen_destinations(settings: Settings, names: Sequence[str]) -> list[str]:
    """The destinations to check: the ones named, or every configured one."""
    known = [d.name for d in settings.destinations]
    if not known:
        raise SelftestError("no destinations configured: nothing to check results against")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SelftestError(f"unknown destination(s) {', '.join(unknown)} "
                            f"(configured: {', '.join(known)})")
    return list(names) or known


def build_selftest_study(out_dir: Path, seed: int) -> list[Path]:
    """Four screening views marked as a self-test; `seed` makes the UIDs new."""
    return make_study(out_dir, rows=SELFTEST_ROWS, cols=SELFTEST_COLS, seed=seed,
                      patient_name=SELFTEST_PATIENT_NAME, patient_id=SELFTEST_PATIENT_ID,
                      accession=SELFTEST_ACCESSION)


def judge_record(record: RunRecord, destinations: Sequence[str]) -> tuple[bool, list[str]]:
    """Whether a finished run delivered to every checked destination, and one line per destination."""
    ok = record.state == "done"
    lines = [] if ok else [f"run {record.run_id} failed: {record.error}"]
    for name in destinations:
        sends = [s for s in record.sends or () if s.destination == name]
        stored = sum(1 for s in sends if s.ok)
        if not sends or stored < len(sends):
            ok = False
        lines.append(f"{name}: {stored}/{len(sends)} result object(s) stored")
    return ok, lines


def run_selftest(
    settings: Settings,
    destinations: Sequence[str] = (),
    timeout_s: float = 300.0,
    calling_ae: str | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    poll_s: float = 0.5,
    pipeline: str = "",
) -> SelftestResult:
    """Send the study, then wait for its record; raises SelftestError for a usage problem."""
    checked = chosen_destinations(settings, destinations)
    host = listener_address(settings)
    caller = calling_ae_for(settings, host, calling_ae)
    if settings.node.tls is not None:
        raise SelftestError("the listener speaks TLS (node.tls): the self-test sends plain DICOM "
                            "and cannot reach it")
    started = clock()
    with tempfile.TemporaryDirectory(prefix="mammo-node-selftest-") as work:
        paths = build_selftest_study(Path(work), seed=secrets.randbelow(10**9))
        study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        listener = Destination(name="selftest-listener", ae_title=settings.node.ae_title, host=host,
                               port=settings.node.port, timeout_s=30)
        as_caller = settings.model_copy(
            update={"node": settings.node.model_copy(update={"ae_title": caller})})
        try:
            outcomes = send_files(as_caller, listener, paths)
        except (OSError, TransientError) as error:
            return SelftestResult(False, study_uid, (f"C-STORE to the listener failed: {error}",))
    sent = f"{caller} -> {settings.node.ae_title}@{host}:{settings.node.port}"
    refused = [o for o in outcomes if not o.ok]
    if refused:
        statuses = ", ".join("no answer" if o.status is None else f"0x{o.status:04X}" for o in refused)
        return SelftestResult(False, study_uid, (
            f"C-STORE {sent}: {len(refused)}/{len(outcomes)} image(s) not stored ({statuses})",))
    lines = [f"sent {len(outcomes)} synthetic images ({sent}), study {study_uid}"]
    spool = Spool(settings.spool.dir)
    while clock() - started < timeout_s:
        found = spool.runs_of_study(study_key(study_uid, pipeline), ("done", "failed"))
        if found:
            state, run_id = found[-1]
            record = read_record(spool.state_dir(state) / run_id)
            if record is not None:
                ok, verdicts = judge_record(record, checked)
                lines.append(f"run {run_id} reached {state}/ after {clock() - started:.1f} s")
                return SelftestResult(ok, study_uid, (*lines, *verdicts), run_id)
        time.sleep(poll_s)
    lines.append(f"no finished run for the study after {timeout_s:g} s "
                 "(is a worker running? `mammo-node runs list --state queued`)")
    return SelftestResult(False, study_uid, tuple(lines))
