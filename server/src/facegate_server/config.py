"""Settings: the only module that reads the environment and the configuration file.

Every setting has a default that runs the embedded service (local engine, SQLite in
./facegate-data). Each can be set, from lowest to highest precedence:
1. in a TOML file (`facegate serve --config FILE`, or FACEGATE_CONFIG), a top-level key
   named as the setting (`workers = 2`); a key that names no setting is an error;
2. by an environment variable, FACEGATE_ and the setting's name in capitals (`workers`:
   FACEGATE_WORKERS); a secret (a field with repr=False) also by FACEGATE_<NAME>_FILE, the
   path of a file holding it (a mounted secret; one trailing newline is dropped);
3. by a `facegate serve` flag.
`insecure` is the exception: the `serve --insecure` flag only. `load_with_sources` also
says where each value came from (`facegate config check` prints it).

The values are typed (pydantic-settings): each arrives as its field's type, whatever the
annotation (`int | None` included), and the rules are field constraints. `load_settings`
is the one reader: `Settings()` is the defaults alone, whatever the environment holds.

An empty variable counts as unset (the default applies). Variables that start with
FACEGATE_ but name no setting are ignored, not warned about: the prefix is shared with the
client (FACEGATE_TARGET, FACEGATE_TOKEN, FACEGATE_CA, ...) and the tests
(FACEGATE_TEST_FACES), so a server warning would fire on every machine that runs both.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from facegate_server.zones import UnknownTimeZone, load_zone

MIB = 1024 * 1024
ENV_PREFIX = "FACEGATE_"
CONFIG_VARIABLE = "FACEGATE_CONFIG"  # the TOML file's path, when --config is not given
SECRET_FILE_SUFFIX = "_FILE"

# The values of routing/router.py's Policy and Agreement (test_config keeps them equal);
# the enums live with the router, which config must not import (the router imports the
# engines, which import config).
RoutingPolicy = Literal["cloud-first", "local-first", "local-only"]
Disagreement = Literal["deny-on-conflict", "require-agreement"]
# engines/worker.py's Encoder (tests/test_encoder.py keeps them equal; config imports no
# engine).
Encoder = Literal["onnx", "dlib"]


URL_SCHEMES = ("postgresql://", "postgres://")
MASK = "********"


class SettingsError(ValueError):
    """An invalid setting; the message is one line that names the variable and the problem."""


class FlagOnly:
    """Field marker: no environment variable sets this field (a command-line flag does)."""


def _default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


class Settings(BaseSettings):
    """FaceGate's configuration, frozen. Secrets (`tokens`, `azure_key`) stay out of repr."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,
        frozen=True,
        extra="forbid",
        allow_inf_nan=False,
        hide_input_in_errors=True,  # a secret never reaches a log through an error
    )

    listen: str = "127.0.0.1:50051"
    # Callers and transport (auth.py, tls.py read the files). No callers: open, loopback only.
    tokens_file: Path | None = None
    tokens: str = Field(default="", repr=False)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    insecure: Annotated[bool, FlagOnly()] = False  # `serve --insecure` only
    identify_rate: float = Field(default=10.0, ge=0)  # per caller, per second; 0: off
    identify_burst: int = Field(default=20, ge=1)
    enroll_rate: float = Field(default=1.0, ge=0)
    enroll_burst: int = Field(default=20, ge=1)
    data_dir: Path = Path("facegate-data")
    # The chain's shared store (issue 16, store/postgres.py, store/chain.py): empty for the
    # embedded SQLite file in data_dir; a postgresql:// URL to share one PostgreSQL
    # database between servers (each keeps its local copy of the gallery in data_dir).
    store: str = Field(default="", repr=False)
    # How long a decision's access event may wait for PostgreSQL before it is kept locally
    # and shipped later (the WAN never holds a door; store/chain.py).
    store_event_wait_s: float = Field(default=0.3, gt=0)
    workers: int = Field(default_factory=_default_workers, ge=1)
    # The local engine's encoder: dlib's network on ONNX Runtime, or dlib itself (the
    # reference); the same embeddings (engines/encoder.py, tests/test_encoder.py).
    encoder: Encoder = "onnx"
    # The local engine's decision policy (engines/policy.py; README: How the local engine
    # decides). Defaults measured on ../shared/faces.
    match_threshold: float = Field(default=0.55, gt=0, lt=2)
    match_margin: float = Field(default=0.10, ge=0, lt=2)
    verify_threshold: float = Field(default=0.55, gt=0, lt=2)  # Verify (1:1); README: Verify
    dominant_face_ratio: float = Field(default=4.0, ge=1)
    min_face_px: int = Field(default=36, ge=0)
    max_yaw: float = Field(default=0.30, gt=0)
    min_pitch: float = Field(default=0.40, ge=0)
    min_brightness: float = Field(default=40.0, ge=0)
    min_sharpness: float = Field(default=15.0, ge=0)
    identify_budget_ms: int = Field(default=1200, ge=1)
    enroll_timeout_s: float = 60.0
    keep_photos: bool = False
    max_image_bytes: int = Field(default=6 * MIB, ge=1)  # a frame (Identify, SearchFaces)
    max_photo_bytes: int = Field(default=48 * MIB, ge=1)  # an enrolment photo: phone-sized
    # The longest side decoded: larger images are scaled down to it, not refused
    # (engines/images.py; its pixel bounds refuse decompression bombs).
    max_image_side: int = Field(default=4096, ge=1)
    max_photos: int = Field(default=10, ge=1)
    grace_period_s: float = 5.0
    log_level: str = "INFO"
    # The cloud engine (Azure Face): primary when endpoint and key are both set.
    azure_endpoint: str = ""
    azure_key: str = Field(default="", repr=False)
    # The LargePersonGroup: lower-case letters, digits, '-' and '_', at most 64 (the Face
    # API's rule). Each store tags its persons, so stores may share a group.
    azure_group_id: str = Field(default="facegate", pattern=r"^[a-z0-9_-]{1,64}$")
    azure_recognition_model: str = "recognition_04"
    azure_detection_model: str = "detection_03"
    azure_timeout_s: float = 10.0
    # The cloud's decision (cloud/engine.py): a grant needs the top candidate at or above
    # the threshold and the runner-up at least the margin below it.
    azure_threshold: float = Field(default=0.5, gt=0, le=1)
    azure_margin: float = Field(default=0.10, ge=0, lt=1)
    # The resource's tier (S0: 10 calls/s; F0: 20 calls/min) and this server's share of
    # its rate, calls a second (unset: the tier's; 0: no client-side limit).
    azure_tier: Literal["S0", "F0"] = "S0"
    azure_rate: float | None = Field(default=None, ge=0)
    # Prices (USD) for the cost estimate (cloud/cost.py has the dated source).
    azure_price_per_1000: float = Field(default=1.0, ge=0)
    azure_storage_price_per_1000_faces: float = Field(default=0.01, ge=0)
    azure_free_transactions: int = Field(default=30_000, ge=0)
    routing_policy: RoutingPolicy | None = None  # None: cloud-first when the cloud is set
    on_disagreement: Disagreement = "deny-on-conflict"
    local_confident: float = 0.75
    breaker_failures: int = Field(default=3, ge=1)
    breaker_cooldown_s: float = Field(default=10.0, gt=0)
    cloud_slots: int = Field(default=4, ge=1)
    sync_interval_s: float = 2.0
    # Where this server's turnstiles are (membership.py): the branch a member's `sites`
    # name (not the cloud's store identity), and the IANA zone of access hours.
    site_id: str = Field(default="", pattern=r"^[A-Za-z0-9._:-]{0,64}$")
    site_time_zone: str = "UTC"
    # Retention and purging (issue 15, operations; retention.py, store/sqlite.py): access
    # events older than this many days are deleted hourly (0: kept forever); a pending
    # purge of deleted data from the SQLite WAL is retried this often.
    event_retention_days: int = Field(default=400, ge=0)
    retention_interval_s: float = Field(default=3600.0, gt=0)
    purge_interval_s: float = Field(default=1.0, gt=0)
    # Metrics (metrics.py; README: Metrics): Prometheus' exposition format on HOST:PORT of
    # its own, unauthenticated (keep it on loopback or a private network); unset: off.
    metrics_listen: str = ""

    @field_validator("metrics_listen")
    @classmethod
    def _host_port(cls, listen: str) -> str:
        host, _, port = listen.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        if listen and not (
            host
            and port.isdigit()
            and int(port) <= 65535
            and (bracketed or not any(c in host for c in ":[] \t"))
        ):
            raise PydanticCustomError(
                "host_port", "must be HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464)"
            )
        return listen

    # Live entry events (WatchAccessEvents): how many followers at once, each held by a
    # coroutine (no thread); how often a follower re-reads the log unwoken (events
    # written by another process sharing the store); how often a caller may start one.
    max_followers: int = Field(default=64, ge=1)
    follow_poll_s: float = Field(default=1.0, gt=0)
    follow_rate: float = Field(default=1.0, ge=0)  # streams started per caller a second; 0: off
    follow_burst: int = Field(default=20, ge=1)
    # Bounded memory before authentication (prelimit; rpc/server.py): health probes on a
    # plaintext listener of their own (HOST:PORT), whose small receive limit refuses a large
    # message from its length prefix alone. With it set, the health service on `listen`
    # needs credentials like every other method. Empty: health on `listen`, open.
    health_listen: str = ""
    # The recognition pipeline (issue 12; engines/admission.py, engines/pool.py): the queue in
    # front of the workers and how hung workers are found. An image waits at most its
    # caller's deadline (the Identify budget, or enroll_timeout_s) counted from arrival.
    recognition_queue: int | None = Field(default=None, ge=1)  # images waiting; None: 8 a worker
    # Images one caller (credential, or peer and turnstile) runs at once; None: all workers
    # but one (at least 1), so one caller can never hold every worker.
    recognition_per_caller: int | None = Field(default=None, ge=1)
    # A waiting image is refused at once when its estimated finish times this lies past
    # its deadline (estimates are averages: an answer late by a little is still late).
    recognition_margin: float = Field(default=1.15, ge=1)
    worker_hang_s: float = Field(default=2.0, gt=0)  # silent this long: killed, replaced
    worker_job_limit_s: float = Field(default=60.0, gt=0)  # longest one image may run
    worker_start_timeout_s: float = Field(default=120.0, gt=0)  # to load the models
    # Pin each worker to a core of its own (when there are no more workers than cores).
    worker_pin: bool = False
    # One cloud replayer for a chain (cloud/lease.py): several servers sharing an outbox
    # replay it one at a time under a lease in PostgreSQL (empty: this server alone
    # replays, as with SQLite). A holder that stops renewing loses it after the ttl.
    cloud_lease_url: str = Field(default="", repr=False)
    cloud_lease_ttl_s: float = Field(default=15.0, ge=1)

    @field_validator("store", "cloud_lease_url")
    @classmethod
    def _store_url(cls, url: str) -> str:
        if url and not url.startswith(URL_SCHEMES):
            raise PydanticCustomError(
                "store_url", "must be empty (SQLite in data_dir) or a postgresql:// URL"
            )
        problem = postgres_url_problem(url) if url else ""
        if problem:
            raise PydanticCustomError("store_url", problem)
        return url

    @field_validator("site_time_zone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            load_zone(name)
        except UnknownTimeZone:
            raise PydanticCustomError(
                "time_zone", "not an IANA time zone name (e.g. Europe/Berlin)"
            ) from None
        return name

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only the values given: `load` reads the environment, from the mapping it is given.
        return (init_settings,)

    @classmethod
    def load(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        config: Path | None = None,
        flags: bool = False,
        **overrides: Any,
    ) -> Self:
        """The TOML file (`config`, else the environment's FACEGATE_CONFIG), then the
        environment (`env`; os.environ when None), then `overrides` that are not None.
        Raises SettingsError (a ValueError), one line naming the variable or file and key
        (an override by its variable; with `flags`, by its flag: `--workers`)."""
        return cls.load_with_sources(env, config=config, flags=flags, **overrides)[0]

    @classmethod
    def load_with_sources(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        config: Path | None = None,
        flags: bool = False,
        **overrides: Any,
    ) -> tuple[Self, dict[str, str]]:
        """`load`, and where each field's value came from: `default`, `file PATH`,
        `env VARIABLE` or `flag` (an override)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        names: dict[str, str] = {}  # how an error names a field, when not by its variable
        if config is None and env.get(CONFIG_VARIABLE):
            config = Path(env[CONFIG_VARIABLE])
        if config is not None:
            for field, value in _read_toml(cls, config).items():
                values[field], sources[field] = value, f"file {config}"
                names[field] = f"{config}: {field}"
        for field, value in _Environment(cls, env)().items():
            values[field], sources[field] = value, f"env {env_name(field)}"
            names.pop(field, None)
        for field, (value, variable) in _secret_files(cls, env).items():
            if sources.get(field) == f"env {env_name(field)}":
                raise SettingsError(f"set {env_name(field)} or {variable}, not both")
            values[field], sources[field] = value, f"env {variable}"
            names[field] = variable
        for field, value in overrides.items():
            if value is not None:
                values[field], sources[field] = value, "flag"
                names.pop(field, None)
                if flags:  # `facegate serve`'s (and `config check`'s) flags: named as typed
                    names[field] = flag_name(field)
        try:
            settings = cls(**values)
        except ValidationError as error:
            raise SettingsError(describe(cls, error, names)) from None
        return settings, {field: sources.get(field, "default") for field in cls.model_fields}

    @model_validator(mode="after")
    def _cloud_needs_both(self) -> Self:
        if bool(self.azure_endpoint) != bool(self.azure_key):
            raise PydanticCustomError(
                "azure_pair", "set both FACEGATE_AZURE_ENDPOINT and FACEGATE_AZURE_KEY, or neither"
            )
        return self

    @property
    def cloud_enabled(self) -> bool:
        return bool(self.azure_endpoint and self.azure_key)

    @property
    def policy(self) -> RoutingPolicy:
        """The routing policy in force: cloud-first by default when the cloud is configured."""
        if not self.cloud_enabled:
            return "local-only"
        return self.routing_policy or "cloud-first"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "facegate.sqlite3"

    @property
    def max_message_bytes(self) -> int:
        """gRPC's receive limit: an Enroll with the most photos of the largest size fits
        (and a frame of the largest size, should frames be allowed more than photos)."""
        return max(self.max_photos * self.max_photo_bytes, self.max_image_bytes) + MIB


def flag_name(field: str) -> str:
    """The `facegate serve` flag that sets `field` (--data-dir for `data_dir`)."""
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    """The environment variable that sets `field` (FACEGATE_WORKERS for `workers`)."""
    return ENV_PREFIX + field.upper()


def _flag_only(field: FieldInfo) -> bool:
    return any(isinstance(marker, FlagOnly) for marker in field.metadata)


class _Environment(EnvSettingsSource):
    """The FACEGATE_* variables in `env`, a mapping rather than os.environ (pydantic-settings
    reads os.environ in `_load_env_vars`; test_config pins this), and not the flag-only
    fields. Names match case-insensitively (pydantic-settings' default); empty is unset."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._env = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {
            name if self.case_sensitive else name.lower(): value
            for name, value in self._env.items()
            if not (self.env_ignore_empty and value == "")
        }

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if _flag_only(field):
            return None, field_name, False
        return super().get_field_value(field, field_name)


def secret_fields(settings_cls: type[BaseSettings]) -> list[str]:
    """The fields kept out of repr: never printed, and readable from FACEGATE_<NAME>_FILE
    (unless `<name>_file` is a setting of its own: `tokens_file` is the callers' file)."""
    return [name for name, field in settings_cls.model_fields.items() if field.repr is False]


def _secret_files(
    settings_cls: type[BaseSettings], env: Mapping[str, str]
) -> dict[str, tuple[str, str]]:
    """{field: (the file's text, its variable)} for the secrets given as files."""
    lowered = {name.lower(): value for name, value in env.items() if value != ""}
    found = {}
    for field in secret_fields(settings_cls):
        if field + "_file" in settings_cls.model_fields:
            continue
        variable = env_name(field) + SECRET_FILE_SUFFIX
        path = lowered.get(variable.lower())
        if path is None:
            continue
        try:
            text = Path(path).read_bytes().decode("utf-8")  # as written: no newline translation
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise SettingsError(
                f"{variable}={shlex.quote(path)}: cannot read it: {reason or error}"
            ) from None
        text = text.removesuffix("\n").removesuffix("\r")  # one line ending, as editors add
        found[field] = (text, variable)
    return found


def _read_toml(settings_cls: type[BaseSettings], path: Path) -> dict[str, Any]:
    """The settings of a TOML file: top-level keys, each a field (others are errors)."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise SettingsError(
            f"cannot read the configuration file {shlex.quote(str(path))}: "
            f"{error.strerror or error}"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SettingsError(f"{path}: not valid TOML: {error}") from None
    fields = settings_cls.model_fields
    for key in document:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SettingsError(f"{path}: {key!r} is not a setting{hint}")
        if _flag_only(fields[key]):
            raise SettingsError(f"{path}: {key!r} is set by a `facegate serve` flag only")
    return document


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    config: Path | None = None,
    flags: bool = False,
    **overrides: Any,
) -> Settings:
    """Settings from the TOML file (`config`, else FACEGATE_CONFIG), the environment
    (`env`; os.environ when None, `{}` for none), then `overrides` (None values are
    ignored; with `flags`, errors name them as `facegate serve`'s flags). Raises
    SettingsError, a ValueError."""
    return Settings.load(env, config=config, flags=flags, **overrides)


# PostgreSQL URLs (the `store` and `cloud_lease_url` settings). libpq's own parser
# (psycopg.conninfo) decides what a URL means; these only find the password's place in
# the text as typed, so that no message and no listing ever shows it.
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PERCENT_HINT = (
    "percent-encode it ('%' is %25, '@' %40, ':' %3A, '/' %2F, '?' %3F, '#' %23, ' ' %20),"
    " or leave the password out of the URL and keep it in a password file (PGPASSFILE, or"
    " ?passfile=PATH)"
)


@dataclass(frozen=True)
class _UrlParts:
    """A postgresql:// URL cut as libpq cuts it (conninfo_uri_parse_options), undecoded:
    each part's text and where it starts in the URL."""

    user: tuple[int, str]
    password: tuple[int, str]
    hosts: str
    dbname: str
    query: tuple[int, str]


def _url_parts(url: str) -> _UrlParts:
    start = len(next(scheme for scheme in URL_SCHEMES if url.startswith(scheme)))
    end = len(url)
    stop = min((i for i in (url.find("@", start), url.find("/", start)) if i >= 0), default=end)
    user, password = (start, ""), (start, "")
    at = start
    if stop < end and url[stop] == "@":
        info = url[start:stop]
        name, colon, secret = info.partition(":")
        user = (start, name)
        if colon:
            password = (start + len(name) + 1, secret)
        at = stop + 1
    host_end = min((i for i in (url.find("/", at), url.find("?", at)) if i >= 0), default=end)
    hosts = url[at:host_end]
    query_at = url.find("?", host_end)
    db_end = end if query_at < 0 else query_at
    dbname = url[host_end + 1 : db_end] if url[host_end : host_end + 1] == "/" else ""
    query = (db_end + 1, url[db_end + 1 :]) if query_at >= 0 else (end, "")
    return _UrlParts(user, password, hosts, dbname, query)


def _password_spans(url: str) -> list[tuple[int, int]]:
    """Where passwords are in `url`: the user info's, and any `password=` in its query."""
    parts = _url_parts(url)
    spans = []
    if parts.password[1]:
        spans.append((parts.password[0], parts.password[0] + len(parts.password[1])))
    at, query = parts.query
    for pair in query.split("&"):
        key, equals, value = pair.partition("=")
        if equals and key == "password" and value:
            spans.append((at + len(key) + 1, at + len(pair)))
        at += len(pair) + 1
    return spans


def mask_url(url: str) -> str:
    """`url` with its password (if any) masked, all else as given: what `facegate config
    check` shows. Not a postgresql:// URL: masked whole."""
    if not url.startswith(URL_SCHEMES):
        return MASK if url else ""
    masked = url
    for start, end in sorted(_password_spans(url), reverse=True):
        masked = masked[:start] + MASK + masked[end:]
    return masked


def postgres_url_problem(url: str) -> str:
    """What is wrong with a postgresql:// URL ("" when nothing), in words that never
    quote its password: it must parse (libpq's rules: psycopg.conninfo) and name a host
    (or a Unix socket directory) and a database."""
    import psycopg  # only when a URL is set

    parts = _url_parts(url)
    for what, text in (
        ("the user name", parts.user[1]),
        ("the password", parts.password[1]),
        ("the host", parts.hosts),
        ("the database name", parts.dbname),
        ("the query (after '?')", parts.query[1]),
    ):
        if _BAD_PERCENT.search(text):
            hint = _PERCENT_HINT if what == "the password" else "percent-encode it ('%' is %25)"
            return f"{what} has a '%' not followed by two hex digits: {hint}"
    try:
        given = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as error:
        message = " ".join(str(error).split())
        secrets = [url[a:b] for a, b in _password_spans(url)]
        for quoted in re.findall(r'"([^"]*)"', message):
            if any(quoted and (quoted in secret or secret in quoted) for secret in secrets):
                message = message.replace(f'"{quoted}"', '"..."')
        return f"not a valid PostgreSQL URL: {message}"
    if not (given.get("host") or given.get("hostaddr")):
        return (
            "names no host: postgresql://USER@HOST:5432/DATABASE"
            " (a Unix socket: postgresql://USER@/DATABASE?host=/var/run/postgresql)"
        )
    if not given.get("dbname"):
        return (
            "names no database: postgresql://USER@HOST:5432/DATABASE, a database made for"
            " FaceGate (createdb -O USER DATABASE)"
        )
    for port in str(given.get("port") or "").split(","):
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            return f"port {port!r} is not a port number (1 to 65535)"
    return ""


def describe(
    settings_cls: type[BaseSettings],
    error: ValidationError,
    names: Mapping[str, str] | None = None,
) -> str:
    """A ValidationError as one line: `FACEGATE_WORKERS=abc: not a whole number; ...`.
    `names` names fields whose value came from elsewhere (`facegate.toml: workers`)."""
    fields = settings_cls.model_fields
    return "; ".join(_describe_one(fields, d, names or {}) for d in error.errors(include_url=False))


def _describe_one(
    fields: Mapping[str, FieldInfo], detail: ErrorDetails, names: Mapping[str, str]
) -> str:
    problem = _problem(detail)
    if not detail["loc"]:  # a rule across fields: the message names the variables
        return problem
    field = str(detail["loc"][0])
    if field not in fields:
        return f"{field}: not a setting"
    name = names.get(field) or (flag_name(field) if _flag_only(fields[field]) else env_name(field))
    if fields[field].repr is False:  # a secret: never its value
        return f"{name}: {problem}"
    return f"{name}={shlex.quote(str(detail['input']))}: {problem}"


def _problem(detail: ErrorDetails) -> str:
    kind, ctx = detail["type"], detail.get("ctx", {})
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return "not a whole number"
    if kind in ("float_parsing", "float_type"):
        return "not a number"
    if kind == "string_type":
        return "not text"
    if kind == "path_type":
        return "not a path"
    if kind == "finite_number":
        return "not a finite number"
    if kind in ("bool_parsing", "bool_type"):
        return "not true or false (1/0, yes/no, on/off)"
    if kind == "greater_than":
        return "must be greater than " + _number(ctx["gt"])
    if kind == "greater_than_equal":
        return "must be at least " + _number(ctx["ge"])
    if kind == "less_than":
        return "must be less than " + _number(ctx["lt"])
    if kind == "less_than_equal":
        return "must be at most " + _number(ctx["le"])
    if kind == "string_pattern_mismatch":
        return "must be up to 64 letters, digits or . _ : -"
    if kind == "literal_error":
        return "must be " + str(ctx["expected"]).replace("'", "")
    return str(detail["msg"])


def _number(bound: Any) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)
