"""The `facegate` command end to end: `facegate serve` as a real process, the client
commands against it, and a graceful stop on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Faces
from tests.helpers import FACEGATE, image_bytes, start_serve


@dataclass
class Served:
    process: subprocess.Popen[str]
    target: str
    log: Path


def facegate(*args: str, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FACEGATE, *args, "--target", target],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve")
    log = tmp / "serve.log"
    settings = {"FACEGATE_DATA_DIR": str(tmp / "data"), "FACEGATE_WORKERS": "1"}
    process, target = start_serve(settings, log)
    yield Served(process, target, log)
    if process.poll() is None:
        process.kill()
        process.wait()


def test_enrol_identify_list_events_delete(served: Served, faces: Faces) -> None:
    t = served.target
    photos = [str(faces.root / p) for p in faces.of("barack_obama")[:2]]
    enrolled = facegate("enroll", "--member-id", "m-1001", "--name", "Kim Jiwoo", *photos, target=t)
    assert enrolled.returncode == 0, enrolled.stderr
    assert "m-1001" in enrolled.stdout and "2 faces" in enrolled.stdout

    frame = str(faces.root / "people/barack_obama/3.jpg")
    granted = facegate("identify", frame, "--turnstile-id", "gate-1", target=t)
    assert granted.returncode == 0, granted.stderr
    assert granted.stdout.startswith('GRANTED m-1001 "Kim Jiwoo" confidence 0.')
    assert "(local)" in granted.stdout and granted.stdout.rstrip().endswith("ms")

    stranger = str(faces.root / "people/lin_manuel_miranda/1.png")
    denied = facegate("identify", stranger, "--json", target=t)
    assert denied.returncode == 0
    answer = json.loads(denied.stdout)
    assert answer["decision"] == "DECISION_DENIED_UNKNOWN_FACE"
    assert answer["engine"] == "ENGINE_LOCAL"

    listed = facegate("members", "list", target=t)
    assert listed.returncode == 0
    assert listed.stdout.splitlines()[0].startswith("m-1001")

    events = facegate("events", "--member-id", "m-1001", "--json", target=t)
    assert events.returncode == 0, events.stderr
    [event] = json.loads(events.stdout)["events"]
    assert (event["member_id"], event["decision"], event["turnstile_id"]) == (
        "m-1001",
        "DECISION_GRANTED",
        "gate-1",
    )

    assert facegate("members", "delete", "m-1001", target=t).returncode == 0
    gone = facegate("members", "get", "m-1001", target=t)
    assert gone.returncode == 1
    assert "NOT_FOUND" in gone.stderr and "m-1001" in gone.stderr
    after = facegate("identify", frame, target=t)
    assert after.stdout.startswith("DENIED_UNKNOWN_FACE")


def test_bad_input_is_a_clear_error(served: Served, tmp_path: Path) -> None:
    text = tmp_path / "frame.jpg"
    text.write_text("this is not a picture")
    result = facegate("identify", str(text), target=served.target)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr
    assert "IMAGE_FORMAT_UNSUPPORTED" in result.stderr
    assert "Traceback" not in result.stderr


def test_one_log_line_per_request_and_a_graceful_stop(served: Served, tmp_path: Path) -> None:
    # Runs last in this module: it stops the server.
    blank = tmp_path / "blank.png"
    blank.write_bytes(image_bytes(320, 240))
    no_face = facegate("identify", str(blank), target=served.target)
    assert no_face.stdout.startswith("DENIED_NO_FACE")
    assert facegate("members", "list", target=served.target).returncode == 0
    assert facegate("members", "delete", "nobody", target=served.target).returncode == 1
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=30) == 0
    entries = [json.loads(line) for line in served.log.read_text().splitlines()]
    rpcs = [e for e in entries if e["msg"] == "rpc"]
    assert {e["method"] for e in rpcs} >= {"Identify", "ListMembers", "DeleteMember"}
    missing = next(e for e in rpcs if e["method"] == "DeleteMember" and e["code"] != "OK")
    assert (missing["code"], missing["member_id"]) == ("NOT_FOUND", "nobody")
    identify = next(e for e in rpcs if e["method"] == "Identify" and e["code"] == "OK")
    assert {"latency_ms", "decision", "turnstile_id", "peer", "image_bytes"} <= set(identify)
    bad = next(e for e in rpcs if e.get("reason") == "IMAGE_FORMAT_UNSUPPORTED")
    assert bad["code"] == "INVALID_ARGUMENT"
    assert "not a picture" not in served.log.read_text()
    assert entries[-1]["msg"] == "stopped"
