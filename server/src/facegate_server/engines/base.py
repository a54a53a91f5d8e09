"""The recognition engine interface: one frame in, one decision out.

The local engine implements it now; the Azure engine and the fallback that routes between
them (itself an engine) implement the same interface.
"""

from __future__ import annotations

from typing import Protocol

from facegate_server.domain import EngineKind, Identification


class RecognitionEngine(Protocol):
    kind: EngineKind

    def identify(self, image: bytes, timeout: float) -> Identification:
        """Decide on one frame within `timeout` seconds.

        Raises facegate_server.errors.InvalidArgument for unusable images,
        RecognitionTimeout when the time runs out, RecognitionUnavailable on failure.
        """
        ...
