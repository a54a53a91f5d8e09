"""`facegate config check [--config FILE] [serve's flags]`: the settings `facegate serve`
would run with, each with where it came from (default, file, env, flag), secrets masked;
the callers and TLS files are read and checked too. Exit 0, or the one-line error and 2.

Plugged into the `facegate` command (entry point group `facegate.commands`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from facegate_server.commands.serve import register_serve


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "config",
        help="check FaceGate's configuration",
        description="FaceGate's configuration: a TOML file, FACEGATE_* variables, flags.",
    )
    commands = parser.add_subparsers(dest="config_command", metavar="COMMAND")
    commands.required = True
    # `check` takes every flag `serve` takes, so it checks exactly what serve would run.
    scratch = argparse.ArgumentParser(add_help=False).add_subparsers()
    register_serve(scratch)
    check = commands.add_parser(
        "check",
        parents=[scratch.choices["serve"]],
        conflict_handler="resolve",
        help="print the effective settings and where each came from",
        description=(
            "Print the settings `facegate serve` would run with (the same flags), each with "
            "its source: default, file, env or flag; secrets are masked. Also reads the "
            "tokens file and the TLS files. Exit 0 when all is usable, else one error line "
            "and exit 2."
        ),
    )
    check.set_defaults(func=run_check)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings `serve`'s flags give (None: not given): each flag whose name is a
    setting's (so a flag added to `serve` is checked here too)."""
    from facegate_server.config import Settings

    return {name: value for name, value in vars(args).items() if name in Settings.model_fields}


def show(value: Any, secret: bool) -> str:
    from facegate_server.config import MASK, URL_SCHEMES, mask_url

    if value is None:
        return "(unset)"
    if secret and isinstance(value, str) and value.startswith(URL_SCHEMES):
        return mask_url(value)  # a PostgreSQL URL: only its password masked
    if secret:
        return MASK if value else '""'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Path):
        return str(value)
    return str(value) if value != "" else '""'


def run_check(args: argparse.Namespace) -> int:
    from facegate_server.config import Settings, SettingsError, secret_fields
    from facegate_server.permissions import startup_findings
    from facegate_server.rpc import auth, tls

    try:
        settings, sources = Settings.load_with_sources(
            config=args.config, flags=True, **overrides(args)
        )
        callers = auth.load_callers(
            settings.tokens_file, settings.tokens, client_ca=settings.tls_client_ca is not None
        )
        open_warning = auth.check_exposure(settings.listen, callers, insecure=settings.insecure)
        tls.Certificates.load(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except (SettingsError, auth.SecurityConfigError) as error:
        print(f"error: {error}", flush=True)
        return 2
    except (OSError, UnicodeDecodeError) as error:  # the tokens file
        print(f"error: cannot read the tokens file: {error}", flush=True)
        return 2
    secrets = set(secret_fields(Settings))
    rows = [
        (name, show(getattr(settings, name), name in secrets), sources[name])
        for name in Settings.model_fields
    ]
    width = max(len(name) for name, _, _ in rows)
    value_width = min(40, max(len(value) for _, value, _ in rows))
    out = sys.stdout
    print(f"{'setting':<{width}}  {'value':<{value_width}}  from", file=out)
    for name, value, source in rows:
        print(f"{name:<{width}}  {value:<{value_width}}  {source}", file=out)
    if open_warning:
        print(f"warning: {open_warning}", file=sys.stderr)
    for finding in startup_findings(settings, callers):
        print(f"warning: {finding.message}: {finding.path} ({finding.fix})", file=sys.stderr)
    return 0
