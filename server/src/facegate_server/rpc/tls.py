"""TLS for the server: a certificate and key (FACEGATE_TLS_CERT, FACEGATE_TLS_KEY), and
optionally a client CA (FACEGATE_TLS_CLIENT_CA) that turns on mutual TLS.

With a client CA every caller must present a certificate it signed, or the handshake
fails (gRPC Python cannot ask for an optional client certificate); the certificate's CN
then names the caller (a `cert:` line of the tokens file) unless a bearer token is sent.
Use a CA that signs FaceGate's callers only. Files are read here, at build time and again
on `Certificates.reload` (SIGHUP: a renewed certificate is served to new connections, with
no rebinding, through gRPC's certificate-configuration fetcher); their contents never
reach a log or an error message, only their paths.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

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


def _read_configuration(
    cert: Path, key: Path, client_ca: Path | None
) -> grpc.ServerCertificateConfiguration:
    """The files' certificate configuration, checked: PEM, and the key is the certificate's
    (a mismatch found only at a handshake would fail every new connection)."""
    key_pem = _read_pem(key, "TLS key")
    mode = os.stat(key).st_mode
    if stat.S_IMODE(mode) & 0o077:
        log.warning(
            "the TLS key file is readable by other users: chmod 600 it",
            extra={"path": str(key)},
        )
    cert_pem = _read_pem(cert, "TLS certificate")
    ca_pem = _read_pem(client_ca, "client CA") if client_ca is not None else None
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.load_verify_locations(client_ca)
    except ssl.SSLError as error:
        raise SecurityConfigError(
            f"the TLS certificate {str(cert)!r} and key {str(key)!r}"
            + (f" or the client CA {str(client_ca)!r}" if client_ca is not None else "")
            + f" cannot be used (a key that is not the certificate's?): {error.reason or error}"
        ) from None
    except OSError as error:
        raise SecurityConfigError(f"cannot read the TLS files: {error.strerror or error}") from None
    return grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], ca_pem)


class Certificates:
    """The server's TLS credentials, whose certificate, key and client CA `reload` re-reads:
    new connections get the new ones (gRPC asks `_fetch` at each handshake); connections
    already open keep theirs. Whether client certificates are required is fixed at start."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            _read_configuration(cert, key, client_ca),
            # grpc's stubs say the fetcher returns a configuration; None means "unchanged".
            cast(Callable[[], grpc.ServerCertificateConfiguration], self._fetch),
            require_client_authentication=client_ca is not None,
        )

    @classmethod
    def load(
        cls, cert: Path | None, key: Path | None, client_ca: Path | None
    ) -> Certificates | None:
        """The credentials of these files, or None for plaintext (no certificate configured)."""
        if cert is None and key is None:
            if client_ca is not None:
                raise SecurityConfigError("a client CA needs the server's certificate and key too")
            return None
        if cert is None or key is None:
            raise SecurityConfigError("TLS needs both a certificate and its key")
        return cls(cert, key, client_ca)

    def reload(self) -> None:
        """Re-read the files for new connections; SecurityConfigError (the old ones stay)."""
        configuration = _read_configuration(self.cert, self.key, self.client_ca)
        with self._lock:
            self._pending = configuration

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question at each new handshake: a new configuration, or None (unchanged)."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending


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
