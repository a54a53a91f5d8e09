"""Settings: the only module that reads the environment.

Every setting has a default that runs the embedded service (local engine, SQLite in
./facegate-data); each can be set by an environment variable, FACEGATE_ and the setting's
name in capitals (`workers`: FACEGATE_WORKERS), and `facegate serve` flags override the
environment. `insecure` is the exception: the `serve --insecure` flag only.

The values are typed (pydantic-settings): each arrives as its field's type, whatever the
annotation (`int | None` included), and the rules are field constraints. `load_settings`
is the one reader: `Settings()` is the defaults alone, whatever the environment holds.

An empty variable counts as unset (the default applies). Variables that start with
FACEGATE_ but name no setting are ignored, not warned about: the prefix is shared with the
client (FACEGATE_TARGET, FACEGATE_TOKEN, FACEGATE_CA, ...) and the tests
(FACEGATE_TEST_FACES), so a server warning would fire on every machine that runs both.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
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

# The values of routing/router.py's Policy and Agreement (test_config keeps them equal);
# the enums live with the router, which config must not import (the router imports the
# engines, which import config).
RoutingPolicy = Literal["cloud-first", "local-first", "local-only"]
Disagreement = Literal["deny-on-conflict", "require-agreement"]
# engines/worker.py's Encoder (tests/test_encoder.py keeps them equal; config imports no
# engine).
Encoder = Literal["onnx", "dlib"]


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

    @field_validator("store")
    @classmethod
    def _store_url(cls, url: str) -> str:
        if url and not url.startswith(("postgresql://", "postgres://")):
            raise PydanticCustomError(
                "store_url", "must be empty (SQLite in data_dir) or a postgresql:// URL"
            )
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
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """The environment (`env`; os.environ when None), then `overrides` that are not
        None. Raises SettingsError (a ValueError), one line naming the variable."""
        values = _Environment(cls, os.environ if env is None else env)()
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as error:
            raise SettingsError(describe(cls, error)) from None

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


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from the environment (`env`; os.environ when None, `{}` for none), then
    `overrides` (None values are ignored). Raises SettingsError, a ValueError."""
    return Settings.load(env, **overrides)


def describe(settings_cls: type[BaseSettings], error: ValidationError) -> str:
    """A ValidationError as one line: `FACEGATE_WORKERS=abc: not a whole number; ...`."""
    fields = settings_cls.model_fields
    return "; ".join(_describe_one(fields, d) for d in error.errors(include_url=False))


def _describe_one(fields: Mapping[str, FieldInfo], detail: ErrorDetails) -> str:
    problem = _problem(detail)
    if not detail["loc"]:  # a rule across fields: the message names the variables
        return problem
    field = str(detail["loc"][0])
    if field not in fields:
        return f"{field}: not a setting"
    name = field if _flag_only(fields[field]) else env_name(field)
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
