"""Settings: the only module that reads the environment.

Every setting has a default that runs the embedded service (local engine, SQLite in
./facegate-data); each can be set by an environment variable, and `facegate serve` flags
override the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def _default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


@dataclass(frozen=True)
class Settings:
    """FaceGate's configuration. Field metadata names the environment variable."""

    listen: str = field(default="127.0.0.1:50051", metadata={"env": "FACEGATE_LISTEN"})
    # Callers and transport (auth.py, tls.py read the files). No callers: open, loopback only.
    tokens_file: Path | None = field(default=None, metadata={"env": "FACEGATE_TOKENS_FILE"})
    tokens: str = field(default="", repr=False, metadata={"env": "FACEGATE_TOKENS"})
    tls_cert: Path | None = field(default=None, metadata={"env": "FACEGATE_TLS_CERT"})
    tls_key: Path | None = field(default=None, metadata={"env": "FACEGATE_TLS_KEY"})
    tls_client_ca: Path | None = field(default=None, metadata={"env": "FACEGATE_TLS_CLIENT_CA"})
    insecure: bool = field(default=False, metadata={"env": None})  # `serve --insecure` only
    identify_rate: float = field(default=10.0, metadata={"env": "FACEGATE_IDENTIFY_RATE"})
    identify_burst: int = field(default=20, metadata={"env": "FACEGATE_IDENTIFY_BURST"})
    enroll_rate: float = field(default=1.0, metadata={"env": "FACEGATE_ENROLL_RATE"})
    enroll_burst: int = field(default=20, metadata={"env": "FACEGATE_ENROLL_BURST"})
    data_dir: Path = field(default=Path("facegate-data"), metadata={"env": "FACEGATE_DATA_DIR"})
    workers: int = field(default_factory=_default_workers, metadata={"env": "FACEGATE_WORKERS"})
    # The local engine's decision policy (engines/policy.py; README: How the local engine
    # decides). Defaults measured on ../shared/faces.
    match_threshold: float = field(default=0.55, metadata={"env": "FACEGATE_MATCH_THRESHOLD"})
    match_margin: float = field(default=0.10, metadata={"env": "FACEGATE_MATCH_MARGIN"})
    dominant_face_ratio: float = field(
        default=4.0, metadata={"env": "FACEGATE_DOMINANT_FACE_RATIO"}
    )
    min_face_px: int = field(default=60, metadata={"env": "FACEGATE_MIN_FACE_PX"})
    max_yaw: float = field(default=0.30, metadata={"env": "FACEGATE_MAX_YAW"})
    min_pitch: float = field(default=0.40, metadata={"env": "FACEGATE_MIN_PITCH"})
    min_brightness: float = field(default=40.0, metadata={"env": "FACEGATE_MIN_BRIGHTNESS"})
    min_sharpness: float = field(default=30.0, metadata={"env": "FACEGATE_MIN_SHARPNESS"})
    identify_budget_ms: int = field(default=1200, metadata={"env": "FACEGATE_IDENTIFY_BUDGET_MS"})
    enroll_timeout_s: float = field(default=60.0, metadata={"env": "FACEGATE_ENROLL_TIMEOUT_S"})
    keep_photos: bool = field(default=False, metadata={"env": "FACEGATE_KEEP_PHOTOS"})
    max_image_bytes: int = field(default=6 * MIB, metadata={"env": "FACEGATE_MAX_IMAGE_BYTES"})
    max_image_side: int = field(default=4096, metadata={"env": "FACEGATE_MAX_IMAGE_SIDE"})
    max_photos: int = field(default=10, metadata={"env": "FACEGATE_MAX_PHOTOS"})
    grace_period_s: float = field(default=5.0, metadata={"env": "FACEGATE_GRACE_PERIOD_S"})
    log_level: str = field(default="INFO", metadata={"env": "FACEGATE_LOG_LEVEL"})
    # The cloud engine (Azure Face): primary when endpoint and key are both set.
    azure_endpoint: str = field(default="", metadata={"env": "FACEGATE_AZURE_ENDPOINT"})
    azure_key: str = field(default="", repr=False, metadata={"env": "FACEGATE_AZURE_KEY"})
    azure_group_id: str = field(default="facegate", metadata={"env": "FACEGATE_AZURE_GROUP_ID"})
    azure_recognition_model: str = field(
        default="recognition_04", metadata={"env": "FACEGATE_AZURE_RECOGNITION_MODEL"}
    )
    azure_detection_model: str = field(
        default="detection_03", metadata={"env": "FACEGATE_AZURE_DETECTION_MODEL"}
    )
    azure_timeout_s: float = field(default=10.0, metadata={"env": "FACEGATE_AZURE_TIMEOUT_S"})
    routing_policy: str = field(default="", metadata={"env": "FACEGATE_ROUTING_POLICY"})
    on_disagreement: str = field(
        default="deny-on-conflict", metadata={"env": "FACEGATE_ON_DISAGREEMENT"}
    )
    local_confident: float = field(default=0.75, metadata={"env": "FACEGATE_LOCAL_CONFIDENT"})
    breaker_failures: int = field(default=3, metadata={"env": "FACEGATE_BREAKER_FAILURES"})
    breaker_cooldown_s: float = field(default=10.0, metadata={"env": "FACEGATE_BREAKER_COOLDOWN_S"})
    cloud_slots: int = field(default=4, metadata={"env": "FACEGATE_CLOUD_SLOTS"})
    sync_interval_s: float = field(default=2.0, metadata={"env": "FACEGATE_SYNC_INTERVAL_S"})

    @property
    def cloud_enabled(self) -> bool:
        return bool(self.azure_endpoint and self.azure_key)

    @property
    def policy(self) -> str:
        """The routing policy in force: cloud-first by default when the cloud is configured."""
        if not self.cloud_enabled:
            return "local-only"
        return self.routing_policy or "cloud-first"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "facegate.sqlite3"

    @property
    def max_message_bytes(self) -> int:
        """gRPC's receive limit: an Enroll with the most photos of the largest size fits."""
        return self.max_photos * self.max_image_bytes + MIB

    def __post_init__(self) -> None:
        if self.identify_rate < 0 or self.enroll_rate < 0:
            raise ValueError("rate limits must be 0 (off) or positive")
        if self.identify_burst < 1 or self.enroll_burst < 1:
            raise ValueError("rate limit bursts must be at least 1")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if not 0.0 < self.match_threshold < 2.0:
            raise ValueError("match_threshold must be in (0, 2)")
        if not 0.0 <= self.match_margin < 2.0:
            raise ValueError("match_margin must be in [0, 2)")
        if self.dominant_face_ratio < 1.0:
            raise ValueError("dominant_face_ratio must be at least 1")
        if self.min_face_px < 0 or self.min_brightness < 0 or self.min_sharpness < 0:
            raise ValueError("min_face_px, min_brightness and min_sharpness must not be negative")
        if self.max_yaw <= 0 or self.min_pitch < 0:
            raise ValueError("max_yaw must be positive and min_pitch not negative")
        if self.identify_budget_ms < 1:
            raise ValueError("identify_budget_ms must be positive")
        if self.max_image_bytes < 1 or self.max_image_side < 1 or self.max_photos < 1:
            raise ValueError("image limits must be positive")
        if self.routing_policy not in ("", "cloud-first", "local-first", "local-only"):
            raise ValueError(
                "FACEGATE_ROUTING_POLICY must be cloud-first, local-first or local-only"
            )
        if self.on_disagreement not in ("deny-on-conflict", "require-agreement"):
            raise ValueError(
                "FACEGATE_ON_DISAGREEMENT must be deny-on-conflict or require-agreement"
            )
        if bool(self.azure_endpoint) != bool(self.azure_key):
            raise ValueError("set both FACEGATE_AZURE_ENDPOINT and FACEGATE_AZURE_KEY, or neither")
        if self.breaker_failures < 1 or self.breaker_cooldown_s <= 0 or self.cloud_slots < 1:
            raise ValueError("breaker and cloud slot settings must be positive")


def _parse(kind: Any, name: str, raw: str) -> Any:
    try:
        if kind in (bool, "bool"):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        if kind in (Path, "Path"):
            return Path(raw)
        if kind == "Path | None":
            return Path(raw) if raw else None
        return raw
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind}") from None


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from the environment, then `overrides` (None values are ignored)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(Settings):
        name = f.metadata["env"]
        if name is not None and name in env:
            values[f.name] = _parse(f.type, name, env[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return replace(Settings(), **values)
