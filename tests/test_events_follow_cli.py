"""`facegate events --follow` end to end: a real `facegate serve` process with the local
engine, the follower in a subprocess, a granted entry printed; the server restarted on the
same port and data; the next entry printed once, nothing repeated."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

from tests.conftest import Faces
from tests.helpers import FACEGATE, start_serve

WAIT = 60.0


def facegate(*args: str, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FACEGATE, *args, "--target", target],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def lines_of(stream: IO[str], readers: list[threading.Thread]) -> queue.Queue[str]:
    """The lines `stream` prints, as they come, read by a thread (added to `readers`)."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        with stream:
            for line in stream:
                lines.put(line.rstrip("\n"))

    readers.append(threading.Thread(target=read, daemon=True))
    readers[-1].start()
    return lines


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=WAIT) == 0


def test_follow_prints_each_entry_once_across_a_server_restart(
    tmp_path: Path, faces: Faces
) -> None:
    settings = {"FACEGATE_DATA_DIR": str(tmp_path / "data"), "FACEGATE_WORKERS": "1"}
    log = tmp_path / "serve.log"
    server, target = start_serve(settings, log)
    follower = None
    readers: list[threading.Thread] = []
    try:
        photos = [str(faces.root / p) for p in faces.of("barack_obama")[:2]]
        enrolled = facegate("enroll", "--member-id", "m-1001", *photos, target=target)
        assert enrolled.returncode == 0, enrolled.stderr

        follower = subprocess.Popen(
            [FACEGATE, "events", "--follow", "--after", "0", "--target", target],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert follower.stdout is not None and follower.stderr is not None
        printed = lines_of(follower.stdout, readers)
        complaints = lines_of(follower.stderr, readers)

        frame = str(faces.root / "people/barack_obama/3.jpg")
        granted = facegate("identify", frame, "--turnstile-id", "gate-1", target=target)
        assert granted.stdout.startswith("GRANTED m-1001"), granted.stderr
        first = printed.get(timeout=WAIT)
        assert "  gate-1  GRANTED  m-1001  " in first and first.endswith("ms")

        stop(server)  # the follower's stream ends; it waits and reconnects
        assert "resuming after event" in complaints.get(timeout=WAIT)
        server, again = start_serve(settings, log, listen=target)
        assert again == target

        stranger = str(faces.root / "people/lin_manuel_miranda/1.png")
        denied = facegate("identify", stranger, "--turnstile-id", "gate-2", target=target)
        assert denied.stdout.startswith("DENIED_UNKNOWN_FACE"), denied.stderr
        second = printed.get(timeout=WAIT)
        assert "  gate-2  DENIED_UNKNOWN_FACE  -  " in second

        # Another entry, to be sure the follower is past the restart: then exactly three lines.
        facegate("identify", frame, "--turnstile-id", "gate-3", target=target)
        third = printed.get(timeout=WAIT)
        assert "  gate-3  GRANTED  m-1001  " in third
        time.sleep(1.0)  # a repeated line would have come by now
        assert printed.empty(), printed.get()
        assert follower.poll() is None  # still following
    finally:
        if follower is not None:
            follower.kill()
            follower.wait()
            for reader in readers:  # at the pipes' end; each closes its own
                reader.join(WAIT)
        if server.poll() is None:
            stop(server)
