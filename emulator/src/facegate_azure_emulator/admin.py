"""The admin HTTP API, on its own port: switch faults and latency, read request counts.

    GET    /_emulator/status      everything below, plus endpoints and hung requests
    GET    /_emulator/counts      {"received": {op: n}, "answered": {op: {status: n}},
                                   "dropped": {op: n}, "total": n}
    DELETE /_emulator/counts      start counting from zero
    PUT    /_emulator/fault       {"mode": "throttle", "retryAfterSeconds": 2,
                                   "slowSeconds": 2, "hangMaxSeconds": 120,
                                   "flapWeights": {"healthy": 0.5, ...}, "seed": 7}
                                   (only "mode" is required; knobs not given are kept)
    PUT    /_emulator/latency     {"profile": "field"} or
                                   {"minMs": 100, "maxMs": 300, "distribution": "uniform"}
    PUT    /_emulator/rate        {"perSecond": 10} (null: the tier's; 0: no limit)
    PUT    /_emulator/throttle    {"form": "status-code", "retryAfterHeader": false}
    PUT    /_emulator/quota       {"remaining": 0} (null: the tier's)
    PUT    /_emulator/limited-access  {"mode": "denied", "form": "unsupported-feature"}
    PUT    /_emulator/snapshot    {"keepsDeleted": true}
    DELETE /_emulator/state       forget every group, person, face and faceId
    POST   /_emulator/state/save  write the state file now

Answers are JSON; a bad request is 400 `{"error": "..."}`. No authentication: the admin
port listens on loopback unless told otherwise.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from facegate_azure_emulator.faults import FaultMode, LatencyProfile

if TYPE_CHECKING:
    from facegate_azure_emulator.server import Emulator

PREFIX = "/_emulator"


def _bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.read() or b"{}")
    except ValueError:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "the body is not JSON"}), content_type="application/json"
        ) from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "the body must be a JSON object"}),
            content_type="application/json",
        )
    return data


def routes(emulator: Emulator) -> list[web.RouteDef]:
    async def status(request: web.Request) -> web.Response:
        return web.json_response(await emulator.status())

    async def counts(request: web.Request) -> web.Response:
        return web.json_response(await emulator.counts())

    async def reset_counts(request: web.Request) -> web.Response:
        await emulator.reset_counts()
        return web.json_response(await emulator.counts())

    async def set_fault(request: web.Request) -> web.Response:
        body = await _body(request)
        names = {
            "mode": "mode",
            "slowSeconds": "slow_seconds",
            "retryAfterSeconds": "retry_after_seconds",
            "hangMaxSeconds": "hang_max_seconds",
            "flapWeights": "flap_weights",
        }
        unknown = set(body) - set(names) - {"seed"}
        if unknown or "mode" not in body:
            return _bad(f"expected mode and optionally {sorted(set(names) - {'mode'})} and seed")
        try:
            changes: dict[str, Any] = {
                names[k]: v for k, v in body.items() if k in names and v is not None
            }
            changes["mode"] = FaultMode(changes["mode"])
            if "flap_weights" in changes:
                changes["flap_weights"] = {
                    FaultMode(m): float(w) for m, w in dict(changes["flap_weights"]).items()
                }
            if "retry_after_seconds" in changes:
                changes["retry_after_seconds"] = int(changes["retry_after_seconds"])
            for knob in ("slow_seconds", "hang_max_seconds"):
                if knob in changes:
                    changes[knob] = float(changes[knob])
            faults = dataclasses.replace(emulator.picker.settings, **changes)
            seed = body.get("seed")
            if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
                raise ValueError("seed must be an integer")
        except (ValueError, TypeError) as error:
            return _bad(str(error))
        await emulator.set_fault(faults, seed)
        return web.json_response(await emulator.status())

    async def set_latency(request: web.Request) -> web.Response:
        body = await _body(request)
        try:
            if "profile" in body:
                latency = LatencyProfile.named(str(body["profile"]))
            else:
                latency = LatencyProfile(
                    float(body.get("minMs", 0)),
                    float(body.get("maxMs", 0)),
                    str(body.get("distribution", "uniform")),
                )
        except (ValueError, TypeError) as error:
            return _bad(str(error))
        await emulator.set_latency(latency)
        return web.json_response(await emulator.status())

    def strict_route(setting: str, fields: tuple[tuple[str, Any, bool], ...]) -> Any:
        """A PUT that applies `setting` with the body's fields, in order: (name, type, required)."""

        async def put(request: web.Request) -> web.Response:
            body = await _body(request)
            unknown = set(body) - {name for name, _, _ in fields}
            if unknown:
                return _bad(f"unknown fields {sorted(unknown)}")
            args: list[Any] = []
            try:
                for name, kind, required in fields:
                    if name not in body:
                        if required:
                            raise ValueError(f"{name} is required")
                        break
                    value = body[name]
                    if value is not None and not isinstance(value, kind):
                        raise ValueError(f"{name} must be {kind}")
                    if isinstance(value, bool) and kind is not bool:
                        raise ValueError(f"{name} must be {kind}")
                    args.append(value)
                return web.json_response(await emulator.set_strict(setting, *args))
            except (ValueError, TypeError) as error:
                return _bad(str(error))

        return put

    number = (int, float)
    set_rate = strict_route("rate", (("perSecond", number, True),))
    set_throttle = strict_route(
        "throttle", (("form", str, True), ("retryAfterHeader", bool, False))
    )
    set_quota = strict_route("quota", (("remaining", int, True),))
    set_limited_access = strict_route("limited_access", (("mode", str, True), ("form", str, False)))
    set_snapshot = strict_route("snapshot_keeps_deleted", (("keepsDeleted", bool, True),))

    async def clear_state(request: web.Request) -> web.Response:
        await emulator.clear_state()
        return web.json_response(await emulator.status())

    async def save_state(request: web.Request) -> web.Response:
        await emulator.save()
        return web.json_response({"saved": emulator.settings.state_file is not None})

    return [
        web.get(f"{PREFIX}/status", status),
        web.get(f"{PREFIX}/counts", counts),
        web.delete(f"{PREFIX}/counts", reset_counts),
        web.put(f"{PREFIX}/fault", set_fault),
        web.put(f"{PREFIX}/latency", set_latency),
        web.put(f"{PREFIX}/rate", set_rate),
        web.put(f"{PREFIX}/throttle", set_throttle),
        web.put(f"{PREFIX}/quota", set_quota),
        web.put(f"{PREFIX}/limited-access", set_limited_access),
        web.put(f"{PREFIX}/snapshot", set_snapshot),
        web.delete(f"{PREFIX}/state", clear_state),
        web.post(f"{PREFIX}/state/save", save_state),
    ]
