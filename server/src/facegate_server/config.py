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
    data_dir: Path = field(default=Path("facegate-data"), metadata={"env": "FACEGATE_DATA_DIR"})
    workers: int = field(default_factory=_default_workers, metadata={"env": "FACEGATE_WORKERS"})
    match_threshold: float = field(default=0.6, metadata={"env": "FACEGATE_MATCH_THRESHOLD"})
    identify_budget_ms: int = field(default=1200, metadata={"env": "FACEGATE_IDENTIFY_BUDGET_MS"})
    enroll_timeout_s: float = field(default=60.0, metadata={"env": "FACEGATE_ENROLL_TIMEOUT_S"})
    keep_photos: bool = field(default=False, metadata={"env": "FACEGATE_KEEP_PHOTOS"})
    max_image_bytes: int = field(default=6 * MIB, metadata={"env": "FACEGATE_MAX_IMAGE_BYTES"})
    max_image_side: int = field(default=4096, metadata={"env": "FACEGATE_MAX_IMAGE_SIDE"})
    max_photos: int = field(default=10, metadata={"env": "FACEGATE_MAX_PHOTOS"})
    grace_period_s: float = field(default=5.0, metadata={"env": "FACEGATE_GRACE_PERIOD_S"})
    log_level: str = field(default="INFO", metadata={"env": "FACEGATE_LOG_LEVEL"})

    @property
    def db_path(self) -> Path:
        return self.data_dir / "facegate.sqlite3"

    @property
    def max_message_bytes(self) -> int:
        """gRPC's receive limit: an Enroll with the most photos of the largest size fits."""
        return self.max_photos * self.max_image_bytes + MIB

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if not 0.0 < self.match_threshold < 2.0:
            raise ValueError("match_threshold must be in (0, 2)")
        if self.identify_budget_ms < 1:
            raise ValueError("identify_budget_ms must be positive")
        if self.max_image_bytes < 1 or self.max_image_side < 1 or self.max_photos < 1:
            raise ValueError("image limits must be positive")


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
        return raw
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind}") from None


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from the environment, then `overrides` (None values are ignored)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(Settings):
        name = f.metadata["env"]
        if name in env:
            values[f.name] = _parse(f.type, name, env[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return replace(Settings(), **values)
