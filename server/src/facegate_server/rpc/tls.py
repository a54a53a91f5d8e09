"""TLS for the server: a certificate and key (FACEGATE_TLS_CERT, FACEGATE_TLS_KEY), and
optionally a client CA (FACEGATE_TLS_CLIENT_CA) that turns on mutual TLS.

With a client CA every caller must present a certificate it signed, or the handshake
fails (gRPC Python cannot ask for an optional client certificate); the certificate's CN
then names the caller (a `cert:` line of the tokens file) unless a bearer token is sent.
Use a CA that signs FaceGate's callers only. Files are read here, once, at build time;
their contents never reach a log or an error message, only their paths.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import grpc

from facegate_server.rpc.auth import SecurityConfigError

log = logging.getLogger(__name__)


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SecurityConfigError(
            f"cannot read the {what} {str(path)!r}: {error.strerror or error}"
        ) from None
    if b"-----BEGIN " not in data:
        raise SecurityConfigError(f"the {what} {str(path)!r} is not PEM")
    return data


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """The server's TLS credentials, or None for plaintext (no certificate configured)."""
    if cert is None and key is None:
        if client_ca is not None:
            raise SecurityConfigError("a client CA needs the server's certificate and key too")
        return None
    if cert is None or key is None:
        raise SecurityConfigError("TLS needs both a certificate and its key")
    key_pem = _read_pem(key, "TLS key")
    mode = os.stat(key).st_mode
    if stat.S_IMODE(mode) & 0o077:
        log.warning(
            "the TLS key file is readable by other users: chmod 600 it",
            extra={"path": str(key)},
        )
    ca_pem = _read_pem(client_ca, "client CA") if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(key_pem, _read_pem(cert, "TLS certificate"))],
        root_certificates=ca_pem,
        require_client_auth=ca_pem is not None,
    )


def bind(
    server: grpc.Server | grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None
) -> int:
    """Add the listening port (TLS when `credentials`); the bound port, 0 if none."""
    if credentials is None:
        return server.add_insecure_port(listen)
    try:
        return server.add_secure_port(listen, credentials)
    except RuntimeError as error:  # also gRPC's answer to a key that does not fit the cert
        raise SecurityConfigError(
            f"cannot listen with TLS on {listen} (an address in use or not this machine's, "
            f"or a key that is not the certificate's): {error}"
        ) from None


def describe(cert: Path | None, client_ca: Path | None) -> str:
    """`off`, `server` or `mutual`, for the start-up log."""
    if cert is None:
        return "off"
    return "mutual" if client_ca is not None else "server"
