"""The node's configuration: one YAML file, one frozen pydantic model, loaded once, passed explicitly.

Secrets never live in the YAML: the broker password is read from the environment variable the
config names (`broker.password_env`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from node.errors import ConfigError
from node.uids import is_valid_uid

_AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no controls


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE_RE.match(value) or not value.strip():
        raise ValueError("must be 1-16 printable characters, not all spaces, without backslash")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeTLS(_Frozen):
    """DICOM TLS on the listener (TLS 1.2 or newer). Paths are relative to the config file."""

    cert_file: Path  # our certificate chain (PEM)
    key_file: Path  # its private key (PEM, unencrypted; keep it readable by the node only)
    ca_file: Path | None = None  # CAs that sign client certificates (PEM bundle)
    require_client_cert: bool = False  # refuse peers without a certificate signed by ca_file

    @model_validator(mode="after")
    def _ca_for_client_certs(self) -> NodeTLS:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CAs to verify clients against)")
        return self


class DestinationTLS(_Frozen):
    """DICOM TLS when sending to a destination: its certificate is always verified."""

    ca_file: Path  # CAs that sign the destination's certificate (PEM bundle)
    cert_file: Path | None = None  # our client certificate, when the destination asks for one
    key_file: Path | None = None
    check_hostname: bool = True  # the certificate must name `host` (DNS name or IP address)

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> DestinationTLS:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


_TLS = TypeVar("_TLS", NodeTLS, DestinationTLS)


class NodeSection(_Frozen):
    """Our own DICOM identity and listener."""

    ae_title: AETitle = "MAMMO_NODE"
    bind_address: str = "127.0.0.1"
    port: int = Field(default=11112, ge=1, le=65535)
    max_pdu_bytes: int = Field(default=131072, ge=4096, le=4 * 1024 * 1024)
    max_associations: int = Field(default=16, ge=1, le=1000)
    network_timeout_s: float = Field(default=60.0, gt=0)
    # From TCP connect to A-ASSOCIATE-RQ (TLS handshake included), and the wait for an A-RELEASE-RP.
    acse_timeout_s: float = Field(default=30.0, gt=0)
    # Connections not yet admitted (TLS handshake, no A-ASSOCIATE-RQ yet); beyond, the oldest closes.
    max_pending_connections: int = Field(default=128, ge=1, le=10000)
    # Largest DICOM message (one C-STORE data set) we receive; beyond it the association is aborted.
    max_message_bytes: int = Field(default=4 * 1024**3, ge=1024 * 1024)
    # Presentation contexts one A-ASSOCIATE-RQ may propose (PS3.8: at most 128 odd context IDs).
    max_presentation_contexts: int = Field(default=128, ge=1, le=128)
    tls: NodeTLS | None = None

    @field_validator("bind_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value


class AllowedCaller(_Frozen):
    """A peer allowed to open associations to us: its calling AE title, optionally pinned to a host."""

    ae_title: AETitle
    host: str | None = None

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_address(value)
        return value


# The kinds of result object a destination can ask for (node/runs.py OutputFile.kind).
ResultObject = Literal["sr", "cad_sr", "seg", "sc"]


class Destination(_Frozen):
    """A peer that receives our results by C-STORE."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    timeout_s: float = Field(default=30.0, gt=0)
    tls: DestinationTLS | None = None
    # Which result objects it gets; None (the default): every object the node writes.
    objects: tuple[ResultObject, ...] | None = Field(default=None, min_length=1)

    def wants(self, kind: str) -> bool:
        return self.objects is None or kind in self.objects


class DicomWebDestination(_Frozen):
    """A peer that receives our results by DICOMweb STOW-RS (node/stow.py), e.g. Orthanc's
    DICOMweb plugin; same retries, `failed/` parking and objects choice as a C-STORE one."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # The DICOMweb root: results are POSTed to <url>/studies. https verifies the server's
    # certificate against the system's CAs.
    url: str = Field(pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
    timeout_s: float = Field(default=30.0, gt=0)
    # A bearer token, read from this environment variable (never from the YAML, never logged).
    token_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    objects: tuple[ResultObject, ...] | None = Field(default=None, min_length=1)

    def wants(self, kind: str) -> bool:
        return self.objects is None or kind in self.objects


class SpoolSection(_Frozen):
    dir: Path
    min_free_bytes: int = Field(default=1_000_000_000, ge=0)
    retention_days: float = Field(default=30.0, gt=0)


class CompletionSection(_Frozen):
    """When a study counts as complete (see node/completion.py)."""

    quiet_period_s: float = Field(default=30.0, gt=0)
    deadline_s: float = Field(default=300.0, gt=0)
    poll_interval_s: float = Field(default=1.0, gt=0, le=60)

    @model_validator(mode="after")
    def _deadline_after_quiet(self) -> CompletionSection:
        if self.deadline_s < self.quiet_period_s:
            raise ValueError(
                f"deadline_s ({self.deadline_s}) must not be shorter than quiet_period_s "
                f"({self.quiet_period_s})"
            )
        return self


class BrokerSection(_Frozen):
    """Celery transport. The password comes from the environment variable `password_env`."""

    url: str = "redis://127.0.0.1:6379/0"
    password_env: str = Field(default="MAMMO_BROKER_PASSWORD", pattern=r"^[A-Z_][A-Z0-9_]*$")
    queue: str = Field(default="mammo", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    publish_timeout_s: float = Field(default=5.0, gt=0)
    task_time_limit_s: float = Field(default=900.0, gt=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("must be a redis:// or rediss:// URL")
        if parts.password:
            raise ValueError("must not contain a password: set it in the environment (password_env)")
        return value

    def url_with_password(self) -> str:
        """The URL with the password from the environment inserted (never logged)."""
        password = os.environ.get(self.password_env)
        if not password:
            return self.url
        parts = urlsplit(self.url)
        netloc = f":{quote(password, safe='')}@{parts.hostname}"
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class ModelSection(_Frozen):
    """A model bundle and how it is run. `operating_point`: which of the bundle's operating
    points (metadata.json `operating_points`, e.g. `balanced`, `high_sensitivity`) makes a
    view, breast or exam "suspicious" and draws the region marks; the worker refuses to start
    with a name the bundle does not declare."""

    bundle_dir: Path = Path("models/mias-baseline")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    operating_point: str = Field(default="balanced", pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class SeriesOutput(_Frozen):
    enabled: bool = True
    series_number: int = Field(ge=1, le=2**31 - 1)
    series_description: str = Field(min_length=1, max_length=64)


class SegOutput(SeriesOutput):
    """The heatmap SEGs, one per scored image. `binary` (default): the findings' regions at the
    operating point (what OHIF draws; an empty segment when there is none); `fractional`: the
    full map, in its own series (fractional_series_*); `both`."""

    series_number: int = Field(default=9902, ge=1, le=2**31 - 1)
    series_description: str = Field(default="AI suspicious regions", min_length=1, max_length=64)
    kind: Literal["binary", "fractional", "both"] = "binary"
    fractional_series_number: int = Field(default=9904, ge=1, le=2**31 - 1)
    fractional_series_description: str = Field(default="AI suspicion heatmap", min_length=1,
                                               max_length=64)


class OverlayOutput(SeriesOutput):
    """The Secondary Capture overlay (opt-in): heatmap and marks burned into a reduced copy of
    each view, for PACS that show nothing else."""

    enabled: bool = False
    series_number: int = Field(default=9905, ge=1, le=2**31 - 1)
    series_description: str = Field(default="AI overlay", min_length=1, max_length=64)
    max_side_px: int = Field(default=1024, ge=256, le=4096)


class OutputsSection(_Frozen):
    """Which result objects are written, in which series, and the UID root for their UIDs."""

    sr: SeriesOutput = SeriesOutput(series_number=9901, series_description="AI mammography report")
    seg: SegOutput = SegOutput()
    sc: OverlayOutput = OverlayOutput()
    cad_sr: SeriesOutput = SeriesOutput(series_number=9903,
                                        series_description="AI mammography CAD report")
    uid_root: str | None = None

    @field_validator("uid_root")
    @classmethod
    def _check_root(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.endswith(".") or not is_valid_uid(value[:-1]) or len(value) > 40:
            raise ValueError("must be a valid UID root ending with '.', at most 40 characters")
        return value


class SendSection(_Frozen):
    attempts: int = Field(default=5, ge=1, le=100)
    backoff_s: float = Field(default=2.0, ge=0)
    backoff_max_s: float = Field(default=60.0, ge=0)


class ScoringSection(_Frozen):
    """Which objects are scored; tomosynthesis is accepted and recorded as not scored.

    `outside_domain`: what becomes of an image outside the live bundle's declared domain
    (metadata.json `domain`: modality, pixel size, view, ...). `score` (default): it is scored,
    flagged `outside_domain:<reason>` and every result object says so. `skip`: it is not
    scored; the run's record gives it as skipped (`outside_domain:<reasons>`), the study's
    other views are scored, and a study with none left ends done without results (`not_scored`).
    """

    max_attempts: int = Field(default=3, ge=1, le=100)
    outside_domain: Literal["score", "skip"] = "score"


class WorkerSection(_Frozen):
    """How one `mammo-node worker` process scores (pipelines/batching.py).

    Defaults: one study at a time per pool process, each study's views one forward pass. With
    `threads` > 1 one process scores that many studies at once (Celery's threads pool) through
    one shared model, batching views across studies up to `batch_views` per forward pass; a
    batch closes at `batch_views` views or `batch_wait_ms` after its oldest view arrived.
    """

    # Studies in flight in one worker process; None: 1 without batching, else enough studies of
    # four views to fill a batch and decode the next (batch_views // 4 + 1, at least 2).
    threads: int | None = Field(default=None, ge=1, le=64)
    # Views per forward pass across the studies in flight (a study is never split; one with
    # more views goes alone); 0: each study's views alone. Needs more than one thread.
    batch_views: int = Field(default=0, ge=0, le=1024)
    batch_wait_ms: float = Field(default=0.0, ge=0, le=10_000)

    @property
    def thread_count(self) -> int:
        if self.threads is not None:
            return self.threads
        return max(2, self.batch_views // 4 + 1) if self.batch_views else 1


class ReconcileSection(_Frozen):
    """The service's periodic repair pass over the spool (see docs/RELIABILITY.md)."""

    interval_s: float = Field(default=10.0, gt=0, le=3600)
    # A queued run whose message is not in the broker queue this long after publishing is
    # published again (Redis restarted empty, a worker died between taking and claiming it).
    republish_after_s: float = Field(default=60.0, gt=0)
    # A run in work/ whose lock has been free this long was abandoned by a dead worker.
    abandoned_after_s: float = Field(default=10.0, ge=0)
    # How often finished runs older than spool.retention_days are purged.
    purge_interval_s: float = Field(default=3600.0, gt=0)


class ClaimsSection(_Frozen):
    """How a worker claims a run (docs/ARCHITECTURE.md, *Workers on other hosts*).

    `mode: local` (default): a flock on work/<run_id>/lock, which needs every worker on the
    node's host. `mode: redis`: a lease in the broker's Redis (`SET NX PX`, renewed by the worker
    while it holds the run) and fenced writes, for workers on other hosts sharing the spool over
    NFS. The node and every worker must use the same mode.
    """

    mode: Literal["local", "redis"] = "local"
    # A worker that cannot renew its lease for this long loses the run: the reconciler gives it
    # to another worker and the late one's writes are refused. Longer than any Redis stall a
    # live worker should ride out; recovery after a worker host dies takes this long plus
    # reconcile.abandoned_after_s.
    lease_seconds: float = Field(default=30.0, ge=1, le=3600)


DEFAULT_AUDIT_NAME = "audit.jsonl"  # in spool.dir, when audit.path is not set


class AuditSection(_Frozen):
    """The append-only audit trail (JSON lines, in the spirit of DICOM PS3.15 A.5)."""

    path: Path | None = None  # default: Settings.audit_path


class MonitoringSection(_Frozen):
    """The HTTP endpoint of `serve` and of each worker: /healthz, /readyz, /metrics.

    Absent: no endpoint (and no worker heartbeat). Loopback by default. The bearer token, when
    wanted, comes from the environment variable `token_env` names (never from the YAML, never
    logged); TLS reuses the listener's certificate settings (`ca_file` + `require_client_cert`
    ask scrapers for a client certificate).
    """

    bind_address: str = "127.0.0.1"
    port: int = Field(default=9464, ge=1, le=65535)  # `serve`
    # A worker takes the first free port of worker_port .. worker_port + worker_port_count - 1
    # (several workers on one host); its heartbeat says which.
    worker_port: int = Field(default=9465, ge=1, le=65535)
    worker_port_count: int = Field(default=8, ge=1, le=1000)
    token_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    tls: NodeTLS | None = None
    heartbeat_interval_s: float = Field(default=10.0, gt=0, le=3600)
    # A worker whose last heartbeat is older than this is silent (readyz, `mammo-node status`).
    worker_silent_after_s: float = Field(default=60.0, gt=0)

    @field_validator("bind_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value

    @model_validator(mode="after")
    def _ports_apart(self) -> MonitoringSection:
        if self.worker_port + self.worker_port_count - 1 > 65535:
            raise ValueError("worker_port + worker_port_count - 1 must be a port (<= 65535)")
        if self.worker_port <= self.port < self.worker_port + self.worker_port_count:
            raise ValueError(f"port ({self.port}) falls in the workers' range starting at "
                             f"worker_port ({self.worker_port})")
        if self.worker_silent_after_s <= self.heartbeat_interval_s:
            raise ValueError("worker_silent_after_s must be longer than heartbeat_interval_s")
        return self


class DriftSection(_Frozen):
    """Score drift per source against the bundle's reference (node/drift.py): the rolling
    window under `<spool.dir>/drift/`, the `mammo_score_drift_*` gauges, `mammo-node drift`."""

    window: int = Field(default=200, ge=10, le=100_000)  # the last N exams of each source
    min_exams: int = Field(default=50, ge=1)  # fewer in a window: "too few exams" (report)
    max_sources: int = Field(default=64, ge=1, le=10_000)  # beyond: manufacturer "other"


class QualitySection(_Frozen):
    """Input-quality flags per image (pipelines/quality.py)."""

    # Flag `low_contrast` when the breast's 1st-99th percentile range is below this fraction of
    # the range BitsStored allows.
    low_contrast_fraction: float = Field(default=0.01, gt=0, lt=1)


IMPLICIT_PIPELINE = "default"  # the one pipeline of a config without `pipelines:`


class PipelineSection(_Frozen):
    """One called AE title on the listener and what happens to what it receives (what MONAI
    Deploy's gateway calls an application entity): its callers, the SOP classes it takes, its
    completion rule, its model bundle (and an optional shadow bundle) and its destinations."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")  # in run records and queue names
    ae_title: AETitle
    allowed_callers: list[AllowedCaller] = Field(min_length=1)
    # Storage SOP classes it takes, by pynetdicom keyword or UID (a subset of what the node
    # stores, node/vocabulary.py STORAGE_SOP_CLASSES); None: all of them.
    sop_classes: tuple[str, ...] | None = Field(default=None, min_length=1)
    completion: CompletionSection | None = None  # None: the top-level `completion`
    model: ModelSection
    # A bundle that scores the same studies without sending anything (`mammo-node shadow report`).
    shadow_model: ModelSection | None = None
    # Names from `destinations` / `dicomweb_destinations`; None: every destination.
    destinations: tuple[str, ...] | None = None
    # `scoring.outside_domain` for this pipeline's bundle; None: the top-level one.
    outside_domain: Literal["score", "skip"] | None = None


class Pipeline(_Frozen):
    """A pipeline as the node uses it, with the top-level defaults filled in (Settings.pipeline_list)."""

    name: str
    ae_title: str
    allowed_callers: tuple[AllowedCaller, ...]
    sop_classes: tuple[str, ...] | None
    completion: CompletionSection
    model: ModelSection
    shadow_model: ModelSection | None
    destinations: tuple[str, ...] | None
    queue: str  # the Celery queue its runs are published to
    outside_domain: Literal["score", "skip"]

    @property
    def implicit(self) -> bool:
        return self.name == IMPLICIT_PIPELINE


class Settings(_Frozen):
    node: NodeSection = NodeSection()
    # Several called AE titles on one listener, each its own pipeline; absent: one implicit
    # pipeline (node.ae_title, allowed_callers, completion, model, every destination). Declared
    # before allowed_callers, whose check looks at it.
    pipelines: list[PipelineSection] = Field(default_factory=list)
    # Callers of node.ae_title (the implicit pipeline); with `pipelines:` each has its own.
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)
    dicomweb_destinations: list[DicomWebDestination] = Field(default_factory=list)
    spool: SpoolSection
    completion: CompletionSection = CompletionSection()
    broker: BrokerSection = BrokerSection()
    model: ModelSection = ModelSection()
    outputs: OutputsSection = OutputsSection()
    send: SendSection = SendSection()
    scoring: ScoringSection = ScoringSection()
    worker: WorkerSection = WorkerSection()
    reconcile: ReconcileSection = ReconcileSection()
    claims: ClaimsSection = ClaimsSection()
    audit: AuditSection = AuditSection()
    monitoring: MonitoringSection | None = None
    drift: DriftSection = DriftSection()
    quality: QualitySection = QualitySection()
    # The implicit pipeline's shadow bundle (without `pipelines:`; see PipelineSection).
    shadow_model: ModelSection | None = None

    @field_validator("allowed_callers")
    @classmethod
    def _callers_needed(cls, value: list[AllowedCaller], info: ValidationInfo
                        ) -> list[AllowedCaller]:
        if not value and not info.data.get("pipelines"):
            raise ValueError("at least one caller is needed (or `pipelines`, each with its own "
                             "allowed_callers)")
        return value

    @model_validator(mode="after")
    def _pipelines_consistent(self) -> Settings:
        if not self.pipelines:
            return self
        if self.shadow_model is not None:
            raise ValueError("shadow_model: with `pipelines`, set shadow_model in the pipeline")
        for key in ("name", "ae_title"):
            values = [getattr(p, key) for p in self.pipelines]
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"pipelines: {key} must be unique, repeated: {repeated}")
        if IMPLICIT_PIPELINE in (p.name for p in self.pipelines):
            raise ValueError(f"pipelines: the name {IMPLICIT_PIPELINE!r} is reserved for the "
                             "implicit pipeline of a config without `pipelines`")
        known = {d.name for d in self.all_destinations}
        for index, pipeline in enumerate(self.pipelines):
            unknown = sorted(set(pipeline.destinations or ()) - known)
            if unknown:
                raise ValueError(f"pipelines[{index}].destinations: unknown destination(s) "
                                 f"{unknown} (configured: {sorted(known)})")
        return self

    @property
    def pipeline_list(self) -> list[Pipeline]:
        """Every pipeline, top-level defaults filled in; without `pipelines:` the implicit one."""
        if not self.pipelines:
            return [Pipeline(name=IMPLICIT_PIPELINE, ae_title=self.node.ae_title,
                             allowed_callers=tuple(self.allowed_callers), sop_classes=None,
                             completion=self.completion, model=self.model,
                             shadow_model=self.shadow_model, destinations=None,
                             queue=self.broker.queue,
                             outside_domain=self.scoring.outside_domain)]
        return [Pipeline(name=p.name, ae_title=p.ae_title,
                         allowed_callers=tuple(p.allowed_callers), sop_classes=p.sop_classes,
                         completion=p.completion or self.completion, model=p.model,
                         shadow_model=p.shadow_model, destinations=p.destinations,
                         queue=f"{self.broker.queue}.{p.name}",
                         outside_domain=p.outside_domain or self.scoring.outside_domain)
                for p in self.pipelines]

    def pipeline(self, name: str | None) -> Pipeline | None:
        """The pipeline called `name` (None or "": the implicit one), or None when unknown."""
        wanted = name or IMPLICIT_PIPELINE
        return next((p for p in self.pipeline_list if p.name == wanted), None)

    def pipeline_of_called_ae(self, called_ae: str) -> Pipeline | None:
        called = called_ae.strip()
        return next((p for p in self.pipeline_list if p.ae_title == called), None)

    def for_pipeline(self, name: str | None) -> Settings:
        """The settings a worker of one pipeline runs with: its model, shadow, completion rule,
        outside-domain policy and destinations in the top-level places, so the scoring code
        needs no pipeline logic. KeyError for an unknown name."""
        pipeline = self.pipeline(name)
        if pipeline is None:
            raise KeyError(name)
        if pipeline.implicit:
            return self
        wanted = pipeline.destinations
        return self.model_copy(update={
            "model": pipeline.model,
            "shadow_model": pipeline.shadow_model,
            "completion": pipeline.completion,
            "scoring": self.scoring.model_copy(update={"outside_domain": pipeline.outside_domain}),
            "destinations": [d for d in self.destinations if wanted is None or d.name in wanted],
            "dicomweb_destinations": [d for d in self.dicomweb_destinations
                                      if wanted is None or d.name in wanted],
        })

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        names = [d.name for d in self.all_destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique, repeated: {duplicates}")
        for destination in self.all_destinations:
            disabled = [kind for kind in destination.objects or ()
                        if not getattr(self.outputs, kind).enabled]
            if disabled:
                raise ValueError(f"destination {destination.name!r} asks for objects the node "
                                 f"does not write: {disabled} (outputs.<kind>.enabled is false)")
        return self

    @property
    def all_destinations(self) -> list[Destination | DicomWebDestination]:
        """C-STORE destinations, then STOW-RS ones: every peer that gets results."""
        return [*self.destinations, *self.dicomweb_destinations]

    @property
    def audit_path(self) -> Path:
        """The audit trail: `audit.path`, else `<spool.dir>/audit.jsonl` (the one default)."""
        return self.audit.path or self.spool.dir / DEFAULT_AUDIT_NAME


_URL_CREDENTIALS_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")
_SECRET_KEY_RE = re.compile(r"pass|secret|token|credential", re.IGNORECASE)


def redact_secrets(text: str) -> str:
    """`text` with the user and password of any URL in it replaced: errors may be shown and logged."""
    return _URL_CREDENTIALS_RE.sub(r"\g<scheme>***@", text)


def _format_errors(source: str, error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        value = item.get("input")
        # A value under a key that sounds secret (a password pasted where it does not belong) is
        # never shown; any other value has the credentials of URLs in it masked.
        secret = any(_SECRET_KEY_RE.search(str(p)) for p in item["loc"])
        shown = "" if isinstance(value, dict) or secret else f" (got {redact_secrets(repr(value))})"
        message = redact_secrets(item["msg"].removeprefix("Value error, "))
        lines.append(f"{source}: {key}: {message}{shown}")
    return lines


def parse_settings(data: object, source: str = "config") -> Settings:
    """Validate a parsed YAML document; ConfigError carries one line per problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: (top level): must be a mapping")
    try:
        return Settings.model_validate(data)
    except ValidationError as error:
        raise ConfigError("\n".join(_format_errors(source, error))) from None


def load_settings(path: str | Path) -> Settings:
    """Load and validate the YAML file; relative paths in it are taken relative to the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(redact_secrets(f"{path}: not valid YAML: {error}")) from None
    settings = parse_settings(data, str(path))
    return _resolve_paths(settings, path.resolve().parent)


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    spool_dir = (base / settings.spool.dir).resolve()
    bundle = (base / settings.model.bundle_dir).resolve()
    node = settings.node
    if node.tls is not None:
        node = node.model_copy(update={"tls": _resolve_tls_paths(node.tls, base)})
    destinations = [
        d.model_copy(update={"tls": _resolve_tls_paths(d.tls, base)}) if d.tls is not None else d
        for d in settings.destinations
    ]
    monitoring = settings.monitoring
    if monitoring is not None and monitoring.tls is not None:
        monitoring = monitoring.model_copy(
            update={"tls": _resolve_tls_paths(monitoring.tls, base)})
    resolved = settings.model_copy(
        update={
            "monitoring": monitoring,
            "node": node,
            "destinations": destinations,
            "spool": settings.spool.model_copy(update={"dir": spool_dir}),
            "model": settings.model.model_copy(update={"bundle_dir": bundle}),
            "shadow_model": _resolve_model(settings.shadow_model, base),
            "pipelines": [
                p.model_copy(update={"model": _resolve_model(p.model, base),
                                     "shadow_model": _resolve_model(p.shadow_model, base)})
                for p in settings.pipelines
            ],
        }
    )
    audit = (base / settings.audit.path).resolve() if settings.audit.path else resolved.audit_path
    return resolved.model_copy(update={"audit": settings.audit.model_copy(update={"path": audit})})


def _resolve_model(model: ModelSection | None, base: Path) -> ModelSection | None:
    if model is None:
        return None
    return model.model_copy(update={"bundle_dir": (base / model.bundle_dir).resolve()})


def _resolve_tls_paths(tls: _TLS, base: Path) -> _TLS:
    fields = ("cert_file", "key_file", "ca_file")
    update = {f: (base / getattr(tls, f)).resolve() for f in fields if getattr(tls, f) is not None}
    return tls.model_copy(update=update)
