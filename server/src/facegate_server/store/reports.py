"""Engine reports as JSON, for the access log."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from facegate_server.domain import Decision, EngineKind, EngineOutcome, EngineReport


def reports_json(reports: tuple[EngineReport, ...]) -> str:
    return json.dumps(
        [
            {
                "engine": r.engine.value,
                "outcome": r.outcome.value,
                "decision": r.decision.value if r.decision else None,
                "member_id": r.member_id,
                "confidence": r.confidence,
                "detail": r.detail,
                "latency_us": None if r.latency is None else round(r.latency.total_seconds() * 1e6),
                "transactions": r.transactions,
            }
            for r in reports
        ]
    )


def reports_from_json(text: str) -> tuple[EngineReport, ...]:
    items: list[dict[str, Any]] = json.loads(text)
    return tuple(
        EngineReport(
            engine=EngineKind(i["engine"]),
            outcome=EngineOutcome(i["outcome"]),
            decision=Decision(i["decision"]) if i["decision"] else None,
            member_id=i["member_id"],
            confidence=i["confidence"],
            detail=i["detail"],
            latency=None if i["latency_us"] is None else timedelta(microseconds=i["latency_us"]),
            transactions=i.get("transactions", 0),  # rows older than the count have none
        )
        for i in items
    )
