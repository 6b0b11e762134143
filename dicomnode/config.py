"""Node configuration (`conf/node.yaml`): typed, with errors that name the offending key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 printable chars, no backslash


# L1-S1 below the first is hypolordosis, above the second hyperlordosis (seed 003); sites may set their own.
# Here, not beside ResultOptions: this module stays free of numpy and pydicom, which the receivers import.
LORDOSIS_THRESHOLDS_DEG = (39.0, 53.0)


def lordosis_class(l1_s1_deg: float, thresholds: tuple[float, float] = LORDOSIS_THRESHOLDS_DEG) -> str:
    """SPEC's class of an L1-S1 angle (results.json, the phantom's truth): hypolordosis, normal or hyperlordosis."""
    lo, hi = thresholds
    return "hypolordosis" if l1_s1_deg < lo else "hyperlordosis" if l1_s1_deg > hi else "normal"


# The rule the lumbar pipelines ship with (conf/node.yaml and the demo): one job per study on its
# best sagittal MR series, so T2, T1 and STIR of one study give one result, not three.
LUMBAR_RULE: dict[str, Any] = {"name": "lumbar-sagittal", "scope": "study",
                               "match": {"Modality": "MR", "orientation": "sagittal"},
                               "pipelines": ["spine-seg", "lordosis"], "send_to": ["sender"]}


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _ae(v: str) -> str:
    if not AE_TITLE.match(v) or not v.strip():
        raise ValueError(f"{v!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return v.strip()


class TlsSection(_Strict):
    """DICOM TLS for the listener: PEM certificate and key; with `ca_file`, callers must present a
    certificate that this CA signed."""

    certfile: Path
    keyfile: Path
    ca_file: Path | None = None


class NodeSection(_Strict):
    ae_title: str = "DICOMNODE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    storage: Path = Path("./var")
    max_pdu: int = Field(0, ge=0, description="0: unlimited")
    receivers: int = Field(1, ge=1, le=64, description="processes receiving on the port (one per core spreads "
                           "simultaneous associations over the cores, evenly by open associations)")
    tls: TlsSection | None = None

    _check_ae = field_validator("ae_title")(_ae)


class AcceptSection(_Strict):
    calling_ae_titles: list[str] = Field(default_factory=list, description="empty: accept any")
    duplicates: Literal["keep_first", "replace"] = "keep_first"


class ClientTls(_Strict):
    """DICOM TLS towards a destination: trust `ca_file` (default: the system's CAs); present
    `certfile`/`keyfile` when the destination asks for a client certificate."""

    ca_file: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None


class DicomDestination(_Strict):
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: ClientTls | None = None

    _check_ae = field_validator("ae_title")(_ae)


class RestDestination(_Strict):
    url: str
    username: str | None = None
    password: str | None = Field(None, description="${NAME}: read from the environment variable NAME")


class Rule(_Strict):
    name: str
    match: dict[str, Any] = Field(default_factory=dict)
    pipelines: list[str]
    send_to: list[str] = Field(default_factory=list)
    scope: Literal["series", "study"] = Field(
        "series", description="series: a job per matching series; study: one job on the whole study when any series matches")


class AssemblySection(_Strict):
    series_quiet_seconds: float = Field(5.0, gt=0)
    study_quiet_seconds: float = Field(15.0, gt=0, description="for rules with scope: study")


class JobsSection(_Strict):
    cpu_workers: int = Field(2, ge=1)
    max_attempts: int = Field(4, ge=1)
    backoff_seconds: float = Field(2.0, gt=0)
    send_max_attempts: int = Field(6, ge=1)
    backend: Literal["in_process", "celery"] = Field(
        "in_process", description="celery: jobs run in `dicomnode worker` processes that share the storage folder")
    broker: str = Field("redis://127.0.0.1:6379/0", description="Celery broker and result backend (Redis)")
    queue: str = "dicomnode"
    visibility_timeout_seconds: float = Field(
        600, gt=0, description="a task a killed worker held goes to another worker after this long; longer than any job")
    task_timeout_seconds: float = Field(3600, gt=0, description="a task no worker finished by then fails (and is retried)")


class RetentionSection(_Strict):
    days: float | None = Field(None, gt=0, description="delete instances older than this")
    max_bytes: int | None = Field(None, gt=0, description="delete the oldest instances above this")
    interval_seconds: float = Field(300, gt=0)


class ResultsSection(_Strict):
    """How result objects are encoded (viewers differ in what they show) and graded (sites differ)."""

    seg_fractional: bool = Field(False, description="probabilities instead of a binary SEG")
    seg_omit_empty_frames: bool = Field(True, description="false: one frame per source image and segment")
    explanations: Literal["parametric_map", "secondary_capture"] = "parametric_map"
    lordosis_thresholds_deg: tuple[float, float] = Field(
        LORDOSIS_THRESHOLDS_DEG, description="L1-S1 below the first: hypolordosis; above the second: hyperlordosis")

    @field_validator("lordosis_thresholds_deg")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] < v[1] < 180:
            raise ValueError(f"{list(v)} are not lordosis thresholds: [hypolordosis below, hyperlordosis above] in "
                             f"degrees, the first smaller than the second, both between 0 and 180")
        return v


class ApiSection(_Strict):
    """The REST API and the administrators' web page, on their own port."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8043, ge=1, le=65535)
    token_file: Path | None = Field(None, description="lines `user token` (or a bare token); mode 600. "
                                                      "DICOMNODE_API_TOKEN in the environment adds one")
    local_reads: bool = Field(True, description="GET from this machine needs no token; writes always do")
    certfile: Path | None = Field(None, description="PEM certificate: HTTPS instead of HTTP")
    keyfile: Path | None = None


class NodeConfig(_Strict):
    node: NodeSection = Field(default_factory=NodeSection)
    accept: AcceptSection = Field(default_factory=AcceptSection)
    destinations: dict[str, DicomDestination | RestDestination] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    rule_mode: Literal["first", "all"] = "first"
    assembly: AssemblySection = Field(default_factory=AssemblySection)
    jobs: JobsSection = Field(default_factory=JobsSection)
    retention: RetentionSection = Field(default_factory=RetentionSection)
    results: ResultsSection = Field(default_factory=ResultsSection)
    plugins: list[str] = Field(default_factory=list, description="modules that register extra pipelines")
    api: ApiSection = Field(default_factory=ApiSection)

    def check_references(self) -> None:
        for rule in self.rules:
            for dest in rule.send_to:
                if dest != "sender" and dest not in self.destinations:
                    raise ConfigError(f"rules: rule {rule.name!r} sends to {dest!r}, which is not under destinations "
                                      f"(known: {', '.join(self.destinations) or 'none'}, or 'sender')")


def parse_config(data: dict[str, Any] | None, source: str = "configuration") -> NodeConfig:
    try:
        cfg = NodeConfig.model_validate(data or {})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("DicomDestination", "RestDestination")))
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{source}: unknown key {where!r}") from None
        raise ConfigError(f"{source}: {where}: {err['msg']}") from None
    cfg.check_references()
    return cfg


def load_config(path: Path | None) -> NodeConfig:
    """The configuration in `path`, or the embedded defaults when `path` is None."""
    if path is None:
        return parse_config({}, "defaults")
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (node, accept, ...)")
    return parse_config(data, str(path))
