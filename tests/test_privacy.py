"""A full run with TLS and tokens, as operators and callers use it: `facegate serve` as a
process, the `facegate` command as its callers. Then what must not be anywhere: no token,
no image bytes, no key material in the logs or the answers; nothing of a deleted member's
face left in the data files; data files readable by their owner only."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate_client import (
    FaceGateClient,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from facegate_server.commands.token import new_token
from facegate_server.domain import FaceTemplate
from facegate_server.rpc import auth
from facegate_server.store import SqliteStore

from tests.conftest import Faces
from tests.helpers import FACEGATE, image_bytes, start_serve
from tests.pki import Authority

TOKENS = {"crm": new_token(), "gate-1": new_token()}
WRONG_TOKEN = new_token()
DENIED_NO_FACE = pb.DECISION_DENIED_NO_FACE


@dataclass
class Run:
    process: subprocess.Popen[str]
    target: str
    log: Path
    data: Path
    ca: Path
    key_pem: bytes
    outputs: list[str] = field(default_factory=list)

    def facegate(
        self, *args: str, token: str | None, ca: bool = True
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
        if token is not None:
            env["FACEGATE_TOKEN"] = token
        tls = ["--ca", str(self.ca)] if ca else []
        result = subprocess.run(
            [FACEGATE, *args, "--target", self.target, *tls],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=env,
        )
        self.outputs += [result.stdout, result.stderr]
        return result


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("privacy")
    authority = Authority("FaceGate privacy CA")
    server = authority.server()
    cert, key = server.write(tmp, "server")
    ca = tmp / "ca.crt"
    ca.write_bytes(authority.pem)
    tokens_file = tmp / "tokens.txt"
    tokens_file.write_text(
        f"backend crm {auth.token_hash(TOKENS['crm'])}\n"
        f"turnstile gate-1 {auth.token_hash(TOKENS['gate-1'])}\n"
    )
    log, data = tmp / "serve.log", tmp / "data"
    settings = {
        "FACEGATE_DATA_DIR": str(data),
        "FACEGATE_WORKERS": "1",
        "FACEGATE_KEEP_PHOTOS": "true",  # photos stored too: their deletion is checked
        "FACEGATE_LOG_LEVEL": "DEBUG",  # everything the server would ever log
        "FACEGATE_TOKENS_FILE": str(tokens_file),
        "FACEGATE_TLS_CERT": str(cert),
        "FACEGATE_TLS_KEY": str(key),
    }
    process, target = start_serve(settings, log)
    yield Run(process, target, log, data, ca, server.key)
    if process.poll() is None:
        process.kill()
        process.wait()


def fragments(data: bytes) -> list[str]:
    """Ways a piece of `data` could show up in text: base64, hex, and raw."""
    piece = data[len(data) // 2 : len(data) // 2 + 24]
    return [
        base64.b64encode(piece).decode(),
        base64.urlsafe_b64encode(piece).decode(),
        piece.hex(),
        piece.decode("latin-1"),
        repr(piece)[2:-1],
    ]


def test_a_full_run_leaks_nothing(run: Run, faces: Faces, tmp_path: Path) -> None:
    photos = [faces.root / p for p in faces.of("barack_obama")[:2]]
    frame = faces.root / "people/barack_obama/3.jpg"
    blank = tmp_path / "blank.png"
    blank.write_bytes(image_bytes(320, 240, color="white"))
    not_a_picture = tmp_path / "frame.jpg"
    not_a_picture.write_bytes(b"\x00\x01 private notes of member m-1001 \xfe\xff" * 40)
    crm, gate = TOKENS["crm"], TOKENS["gate-1"]

    enrolled = run.facegate(
        "enroll", "--member-id", "m-1001", "--name", "Kim", *map(str, photos), token=crm
    )
    assert enrolled.returncode == 0, enrolled.stderr
    granted = run.facegate("identify", str(frame), "--turnstile-id", "gate-1", token=gate)
    assert granted.stdout.startswith("GRANTED m-1001"), granted.stderr
    with closing(sqlite3.connect(run.data / "facegate.sqlite3")) as db:
        embeddings = db.execute(
            "SELECT embedding, photo FROM faces WHERE member_id = 'm-1001'"
        ).fetchall()
    assert len(embeddings) == 2 and all(photo for _, photo in embeddings)

    # Refusals, through the command (a few) and the library (the rest: quicker).
    for args, token, ca, words in [
        (("identify", str(frame)), WRONG_TOKEN, True, "UNAUTHENTICATED"),
        (("enroll", "--member-id", "m-2", str(frame)), gate, True, "PERMISSION_DENIED"),
        (("identify", str(frame)), gate, False, "UNAVAILABLE"),  # plaintext to a TLS server
    ]:
        refused = run.facegate(*args, token=token, ca=ca)
        assert refused.returncode == 1, (args, refused.stdout)
        assert words in refused.stderr, (args, refused.stderr)
    root = run.ca.read_bytes()
    with FaceGateClient(run.target, token=gate, root_certificates=root) as turnstile:
        assert turnstile.identify(blank.read_bytes(), "gate-1").decision == DENIED_NO_FACE
        for call, error in [
            (lambda: turnstile.list_members(), PermissionDenied),
            (lambda: turnstile.identify(not_a_picture.read_bytes(), "gate-1"), InvalidArgument),
            (lambda: turnstile.enroll("m-3", [frame.read_bytes()]), PermissionDenied),
        ]:
            with pytest.raises(error) as refusal:
                call()
            run.outputs.append(f"{refusal.value} {refusal.value!r}")
    with FaceGateClient(run.target, root_certificates=root) as anonymous:
        with pytest.raises(Unauthenticated) as unauthenticated:
            anonymous.identify(frame.read_bytes(), "gate-1")
        run.outputs.append(f"{unauthenticated.value} {unauthenticated.value!r}")

    # Deleting a member forgets their face at once, everywhere; their entries stay.
    assert run.facegate("members", "delete", "m-1001", token=crm).returncode == 0
    events = run.facegate("events", "--member-id", "m-1001", "--json", token=crm)
    assert [e["decision"] for e in json.loads(events.stdout)["events"]] == ["DECISION_GRANTED"]
    stored = b"".join(p.read_bytes() for p in sorted(run.data.iterdir()))
    for embedding, photo in embeddings:
        assert embedding[:64] not in stored and embedding[-64:] not in stored
        assert photo[1000:1064] not in stored

    run.process.send_signal(signal.SIGTERM)
    assert run.process.wait(timeout=30) == 0
    log = run.log.read_text()

    # Management calls carry who made them; refusals carry the address, never the token.
    rpcs = [json.loads(line) for line in log.splitlines() if '"msg": "rpc"' in line]
    for method in ("Enroll", "DeleteMember"):
        [line] = [r for r in rpcs if r["method"] == method and r["code"] == "OK"]
        assert (line["caller"], line["role"], line["auth"]) == ("crm", "backend", "token")
    refused = [r for r in rpcs if r["code"] in ("UNAUTHENTICATED", "PERMISSION_DENIED")]
    assert len(refused) == 5 and all(r["peer"].startswith("ipv4:127.0.0.1:") for r in refused)

    everything = log + "\n".join(run.outputs)
    secrets = [*TOKENS.values(), WRONG_TOKEN]
    for path in [*photos, frame, blank, not_a_picture]:
        secrets += fragments(path.read_bytes())
    key_body = [line for line in run.key_pem.decode().splitlines() if "-----" not in line]
    secrets += [*key_body, "PRIVATE KEY"]
    leaked = [secret[:12] for secret in secrets if secret in everything]
    assert not leaked, f"found in the logs or the command output: {leaked}"


def test_the_store_forgets_a_deleted_face_at_once(tmp_path: Path) -> None:
    """No photograph needed: the SQLite files themselves, before and after DeleteMember."""
    store = SqliteStore(tmp_path / "data" / "facegate.sqlite3")
    try:
        embedding = np.random.default_rng(7).normal(0, 0.1, 128)
        photo = b"\xff\xd8\xff" + np.random.default_rng(8).bytes(4000)
        now = datetime(2026, 11, 26, tzinfo=UTC)
        store.create_member("m-1", "Kim", [FaceTemplate(embedding, photo)], now)
        store.create_member("m-2", "Ana", [FaceTemplate(embedding + 1, None)], now)

        def stored() -> bytes:
            return b"".join(p.read_bytes() for p in sorted((tmp_path / "data").iterdir()))

        pieces = [embedding.astype("<f8").tobytes()[:64], photo[100:164], photo[-64:]]
        assert all(piece in stored() for piece in pieces)
        store.delete_member("m-1")
        assert not any(piece in stored() for piece in pieces)
        assert [m.member_id for m in store.list_members(10, "")] == ["m-2"]
    finally:
        store.close()


def test_data_files_are_the_owners_only(run: Run) -> None:
    assert stat.S_IMODE(run.data.stat().st_mode) == 0o700
    files = list(run.data.iterdir())
    assert any(f.name == "facegate.sqlite3" for f in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
