"""`facegate serve`: plugged into the client's `facegate` command (entry point group
`facegate.commands`), so a turnstile's client-only install has no server commands.

Start-up refusals are one line (`error: ...`) and exit status 2: a setting that does not
fit, a data dir another server holds or made for the other kind of server (datadir.py), a
shared store FaceGate cannot use (app.py StoreRefused, store/postgres.py StoreSchemaError).

Signals: SIGTERM and SIGINT stop gracefully (health NOT_SERVING, then the grace period);
SIGHUP re-reads the callers and the TLS files without a restart (`FaceGateServer.reload`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from facegate_server import logs

if TYPE_CHECKING:
    from facegate_server.config import Settings

log = logging.getLogger("facegate.serve")


def register_serve(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the FaceGate server",
        description="Run the FaceGate gRPC server. Flags override FACEGATE_* variables.",
    )
    parser.add_argument("--listen", help="HOST:PORT (FACEGATE_LISTEN; default 127.0.0.1:50051)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="where the database lives (FACEGATE_DATA_DIR; ./facegate-data)",
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="postgresql://... to share one PostgreSQL between servers (FACEGATE_STORE;"
        " default: SQLite in the data dir)",
    )
    parser.add_argument(
        "--workers", type=int, help="recognition processes (FACEGATE_WORKERS; default: one a core)"
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (FACEGATE_LOG_LEVEL; INFO)")
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (FACEGATE_METRICS_LISTEN; off)",
    )
    security = parser.add_argument_group("callers and TLS (see the README's Security section)")
    security.add_argument(
        "--tokens-file",
        type=Path,
        metavar="FILE",
        help="callers, lines of ROLE NAME CREDENTIAL (FACEGATE_TOKENS_FILE)",
    )
    security.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="server certificate (FACEGATE_TLS_CERT)"
    )
    security.add_argument(
        "--tls-key", type=Path, metavar="PEM", help="its private key (FACEGATE_TLS_KEY)"
    )
    security.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PEM",
        help="require client certificates signed by this CA (FACEGATE_TLS_CLIENT_CA)",
    )
    security.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback --listen with no callers configured (anyone may call)",
    )
    # Configuration file (operations): TOML, under the environment and the flags.
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="a TOML file of settings; variables and flags override it (FACEGATE_CONFIG)",
    )
    parser.set_defaults(func=serve)


def store_name(settings: Settings) -> str:
    """The store as the log names it (a PostgreSQL URL without its password)."""
    if not settings.store:
        return str(settings.db_path)
    from facegate_server.store.postgres import describe

    return describe(settings.store)


def serve(args: argparse.Namespace) -> int:
    from facegate_server.config import load_settings  # pydantic: not for `facegate --help`

    try:
        settings = load_settings(
            listen=args.listen,
            data_dir=args.data_dir,
            store=args.store,
            workers=args.workers,
            log_level=args.log_level,
            metrics_listen=args.metrics_listen,
            tokens_file=args.tokens_file,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            insecure=args.insecure,
            config=args.config,
            flags=True,
        )
    except ValueError as error:
        print(f"error: {error}", flush=True)
        return 2
    from facegate_server.datadir import DataDirLock, DataDirRefused

    try:
        held = DataDirLock(settings.data_dir)  # one server a data dir: its identity is there
    except (DataDirRefused, OSError) as error:
        print(f"error: {error}", flush=True)
        return 2
    try:
        return _serve(settings)
    finally:
        held.release()


def _serve(settings: Settings) -> int:
    """Serve, the data dir held."""
    from facegate_server.datadir import DataDirRefused, check_kind

    try:
        mixed = check_kind(settings.data_dir, chain=bool(settings.store))
    except DataDirRefused as error:
        print(f"error: {error}", flush=True)
        return 2
    logs.configure(settings.log_level)
    if mixed:
        log.warning(mixed)
    stop, reload, wake = threading.Event(), threading.Event(), threading.Event()

    def on_signal(number: int, _frame: object) -> None:
        log.info("stopping", extra={"signal": signal.Signals(number).name})
        stop.set()
        wake.set()

    def on_hangup(_number: int, _frame: object) -> None:
        reload.set()  # the reload runs in the main loop below, not in a signal handler
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    log.info(
        "starting",
        extra={
            "listen": settings.listen,
            "data_dir": str(settings.data_dir),
            "workers": settings.workers,
        },
    )
    from facegate_server.app import StoreRefused, build_server  # numpy, dlib: only for `serve`
    from facegate_server.errors import StoreUnavailable
    from facegate_server.store.postgres import StoreSchemaError

    try:
        server = build_server(settings)
    except (StoreRefused, StoreSchemaError) as error:  # waiting will not mend it
        print(f"error: {error}", flush=True)
        return 2
    except (OSError, RuntimeError, StoreUnavailable) as error:
        log.error("could not start", extra={"error": str(error)})
        return 1
    server.start()
    log.info(
        "serving",
        extra={
            "listen": settings.listen,
            "port": server.port,
            **({"health_port": server.rpc.health_port} if settings.health_listen else {}),
            "routing": settings.policy,
            "engines": ["azure", "local"] if settings.cloud_enabled else ["local"],
            "store": store_name(settings),
            **({"metrics_port": server.metrics.port} if server.metrics is not None else {}),
        },
    )
    waiting = server.cannot_decide()
    if waiting:  # health NOT_SERVING, Identify refused until the first copy is made
        log.warning(waiting, extra={"store": store_name(settings)})
    while not stop.is_set():
        wake.wait(3600)
        wake.clear()
        if reload.is_set() and not stop.is_set():
            reload.clear()
            log.info("reloading", extra={"signal": "SIGHUP"})
            server.reload()
    server.stop(settings.grace_period_s)
    log.info("stopped")
    return 0
