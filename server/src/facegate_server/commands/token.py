"""`facegate token new --role ROLE --name NAME`: a fresh bearer token and its tokens-file line.

Plugged into the `facegate` command (entry point group `facegate.commands`). The token is
printed once, here; FaceGate keeps only its SHA-256 (see auth.py).
"""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import Any

from facegate_server.rpc.auth import NAME, TOKEN_PREFIX, Role, token_hash


def new_token() -> str:
    """256 random bits, URL-safe, with a prefix that secret scanners can look for."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _name(text: str) -> str:
    if not NAME.fullmatch(text):
        raise argparse.ArgumentTypeError("1 to 64 letters, digits or . _ : @ -")
    return text


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "token",
        help="make bearer tokens for callers",
        description="Bearer tokens for FaceGate's callers.",
    )
    commands = parser.add_subparsers(dest="token_command", metavar="COMMAND")
    commands.required = True
    new = commands.add_parser(
        "new",
        help="print a new token and the line for the tokens file",
        description=(
            "Print a new random token (give it to the caller: FACEGATE_TOKEN) and the line "
            "to add to the server's tokens file (FACEGATE_TOKENS_FILE) or FACEGATE_TOKENS. "
            "The server stores only the token's SHA-256; the token is shown only now."
        ),
    )
    new.add_argument("--role", required=True, choices=[r.value for r in Role])
    new.add_argument("--name", required=True, type=_name, help="the caller, as logs name it")
    new.set_defaults(func=run_new)


def run_new(args: argparse.Namespace) -> int:
    token = new_token()
    out = sys.stdout
    print("# the token, for the caller only (FACEGATE_TOKEN):", file=out)
    print(token, file=out)
    print("# the line for the tokens file (FACEGATE_TOKENS_FILE):", file=out)
    print(f"{args.role} {args.name} {token_hash(token)}", file=out)
    return 0
