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


class Destination(_Frozen):
    """A peer that receives our results by C-STORE."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    timeout_s: float = Field(default=30.0, gt=0)
    tls: DestinationTLS | None = None


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
    bundle_dir: Path = Path("models/mias-baseline")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class SeriesOutput(_Frozen):
    enabled: bool = True
    series_number: int = Field(ge=1, le=2**31 - 1)
    series_description: str = Field(min_length=1, max_length=64)


class OutputsSection(_Frozen):
    """Which result objects are written, in which series, and the UID root for their UIDs."""

    sr: SeriesOutput = SeriesOutput(series_number=9901, series_description="AI mammography report")
    seg: SeriesOutput = SeriesOutput(series_number=9902, series_description="AI suspicion heatmap")
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
    """Which objects are scored; tomosynthesis is accepted and recorded as not scored."""

    max_attempts: int = Field(default=3, ge=1, le=100)


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


DEFAULT_AUDIT_NAME = "audit.jsonl"  # in spool.dir, when audit.path is not set


class AuditSection(_Frozen):
    """The append-only audit trail (JSON lines, in the spirit of DICOM PS3.15 A.5)."""

    path: Path | None = None  # default: Settings.audit_path


class Settings(_Frozen):
    node: NodeSection = NodeSection()
    allowed_callers: list[AllowedCaller] = Field(min_length=1)
    destinations: list[Destination] = Field(default_factory=list)
    spool: SpoolSection
    completion: CompletionSection = CompletionSection()
    broker: BrokerSection = BrokerSection()
    model: ModelSection = ModelSection()
    outputs: OutputsSection = OutputsSection()
    send: SendSection = SendSection()
    scoring: ScoringSection = ScoringSection()
    reconcile: ReconcileSection = ReconcileSection()
    audit: AuditSection = AuditSection()

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique, repeated: {duplicates}")
        return self

    @property
    def audit_path(self) -> Path:
        """The audit trail: `audit.path`, else `<spool.dir>/audit.jsonl` (the one default)."""
        return self.audit.path or self.spool.dir / DEFAULT_AUDIT_NAME


def _format_errors(source: str, error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        message = item["msg"].removeprefix("Value error, ")
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
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
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
    resolved = settings.model_copy(
        update={
            "node": node,
            "destinations": destinations,
            "spool": settings.spool.model_copy(update={"dir": spool_dir}),
            "model": settings.model.model_copy(update={"bundle_dir": bundle}),
        }
    )
    audit = (base / settings.audit.path).resolve() if settings.audit.path else resolved.audit_path
    return resolved.model_copy(update={"audit": settings.audit.model_copy(update={"path": audit})})


def _resolve_tls_paths(tls: _TLS, base: Path) -> _TLS:
    fields = ("cert_file", "key_file", "ca_file")
    update = {f: (base / getattr(tls, f)).resolve() for f in fields if getattr(tls, f) is not None}
    return tls.model_copy(update=update)
