"""`facegate azure-emulator`: run the Face API emulator until SIGTERM or SIGINT.

Plugged into the `facegate` command through the `facegate.commands` entry-point group.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from facegate_server import logs

log = logging.getLogger("facegate.emulator")

FAULT_MODES = ("healthy", "refuse", "hang", "throttle", "error500", "error503", "slow", "flap")


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "azure-emulator",
        help="run an Azure Face API v1.0 emulator (for tests and benchmarks)",
        description=(
            "Serve the Azure Face API v1.0 subset FaceGate uses (person groups, large person "
            "groups, persons, faces, detect, identify, verify), recognising with dlib, with "
            "configurable latency and fault modes switched through an admin HTTP API."
        ),
    )
    parser.add_argument(
        "--listen", required=True, help="HOST:PORT of the Face API (the SDK's endpoint)"
    )
    parser.add_argument("--key", required=True, help="the subscription key clients must send")
    parser.add_argument(
        "--admin-listen",
        help="HOST:PORT of the admin API (default 127.0.0.1 and the Face port + 1)",
    )
    parser.add_argument("--state", type=Path, help="JSON file to load and save the state in")
    parser.add_argument(
        "--profile",
        default="none",
        help="latency profile: none (default) or field (700-1200 ms a call, skewed)",
    )
    parser.add_argument(
        "--latency-ms",
        metavar="MIN:MAX",
        help="explicit latency range per call in ms (overrides --profile)",
    )
    parser.add_argument(
        "--latency-distribution",
        choices=("uniform", "skewed"),
        default="uniform",
        help="how --latency-ms draws (default uniform)",
    )
    parser.add_argument("--fault", choices=FAULT_MODES, default="healthy", help="initial mode")
    parser.add_argument("--seed", type=int, default=0, help="seeds latency and flap draws")
    parser.add_argument(
        "--training-seconds", type=float, default=1.0, help="how long a training runs (1)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="recognition processes (1; 0: a thread)"
    )
    parser.add_argument(
        "--tier",
        choices=("S0", "F0"),
        default="S0",
        help="S0 (10 calls/s, 1,000,000 persons a large group) or F0 (20 calls/min, "
        "1,000 persons a group, 30,000 calls a month); default S0",
    )
    parser.add_argument(
        "--rate",
        type=float,
        help="calls a second before 429s, on the emulator's clock (default: the tier's; "
        "0: no limit)",
    )
    parser.add_argument(
        "--throttle-form",
        choices=("rate-limit-exceeded", "status-code", "code-429"),
        default="rate-limit-exceeded",
        help="the 429 body's form (default rate-limit-exceeded)",
    )
    parser.add_argument(
        "--no-retry-after", action="store_true", help="send 429s without a Retry-After header"
    )
    parser.add_argument(
        "--quota", type=int, help="transactions left this month (default: F0 30,000, S0 none)"
    )
    parser.add_argument(
        "--limited-access",
        choices=("granted", "denied", "no-face-id"),
        default="granted",
        help="Limited Access approval (default granted)",
    )
    parser.add_argument(
        "--limited-access-form",
        choices=("inner-error", "unsupported-feature"),
        default="inner-error",
        help="the denied 403's form (default inner-error: InvalidRequest + innererror)",
    )
    parser.add_argument(
        "--snapshot-keeps-deleted",
        action="store_true",
        help="Identify still returns persons deleted since the last training",
    )
    parser.add_argument(
        "--small-faces",
        choices=("on", "off"),
        default="on",
        help="look for faces down to 36 px (an extra detection pass; default on)",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (INFO)")
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Any:
    """EmulatorSettings from the parsed flags; ValueError for bad values."""
    from facegate_azure_emulator.faults import FaultMode, FaultSettings, LatencyProfile
    from facegate_azure_emulator.server import EmulatorSettings, parse_address

    host, port = parse_address(args.listen)
    admin_listen = args.admin_listen or f"127.0.0.1:{port + 1 if port else 0}"
    parse_address(admin_listen)
    if args.latency_ms:
        low, sep, high = args.latency_ms.partition(":")
        if not sep:
            raise ValueError(f"--latency-ms expects MIN:MAX, got {args.latency_ms!r}")
        latency = LatencyProfile(float(low), float(high), args.latency_distribution)
    else:
        latency = LatencyProfile.named(args.profile)
    if args.training_seconds < 0 or args.workers < 0:
        raise ValueError("--training-seconds and --workers must be >= 0")
    if (args.rate is not None and args.rate < 0) or (args.quota is not None and args.quota < 0):
        raise ValueError("--rate and --quota must be >= 0")
    return EmulatorSettings(
        key=args.key,
        listen=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        admin_listen=admin_listen,
        state_file=args.state,
        latency=latency,
        faults=FaultSettings(mode=FaultMode(args.fault)),
        training_seconds=args.training_seconds,
        seed=args.seed,
        workers=args.workers,
        tier=args.tier,
        rate_per_second=args.rate,
        throttle_form=args.throttle_form,
        retry_after_header=not args.no_retry_after,
        quota_remaining=args.quota,
        limited_access=args.limited_access,
        limited_access_form=args.limited_access_form,
        snapshot_keeps_deleted=args.snapshot_keeps_deleted,
        small_faces=args.small_faces == "on",
    )


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as error:
        print(f"error: {error}", flush=True)
        return 2
    logs.configure(args.log_level)
    from facegate_azure_emulator.server import start_emulator  # dlib: only when running

    stop = threading.Event()

    def on_signal(number: int, _frame: object) -> None:
        log.info("stopping", extra={"signal": signal.Signals(number).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("starting", extra={"listen": settings.listen, "admin_listen": settings.admin_listen})
    try:
        running = start_emulator(settings)
    except (OSError, ValueError, RuntimeError) as error:
        log.error("could not start", extra={"error": str(error)})
        return 1
    log.info(
        "serving",
        extra={
            "endpoint": running.endpoint,
            "admin_endpoint": running.admin_endpoint,
            "latency": settings.latency.to_json(),
            "fault": settings.faults.mode.value,
            "tier": settings.tier,
            "limited_access": settings.limited_access,
            "state": str(settings.state_file) if settings.state_file else None,
        },
    )
    while not stop.wait(3600):
        pass
    running.stop()
    log.info("stopped")
    return 0
