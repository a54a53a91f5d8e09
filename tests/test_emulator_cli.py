"""`facegate azure-emulator`: its flags, and the command run as a real process that keeps
its state in a file across a restart; stopping with requests in flight."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from facegate_azure_emulator import (
    EmulatorSettings,
    FaultMode,
    LatencyProfile,
    ManualClock,
    start_emulator,
)
from facegate_azure_emulator.cli import run, settings_from_args
from facegate_client.cli import build_parser

FACEGATE = str(Path(sys.executable).with_name("facegate"))
KEY = "cli-key"


def parse(*argv: str) -> Any:
    return build_parser().parse_args(["azure-emulator", *argv])


def test_flags_become_settings() -> None:
    args = parse("--listen", "127.0.0.1:8123", "--key", "k", "--profile", "field", "--seed", "3")
    assert args.func is run
    settings = settings_from_args(args)
    assert (settings.listen, settings.admin_listen) == ("127.0.0.1:8123", "127.0.0.1:8124")
    assert settings.latency == LatencyProfile.named("field")
    assert (settings.seed, settings.training_seconds, settings.workers) == (3, 1.0, 1)
    explicit = settings_from_args(
        parse(
            *("--listen", "0.0.0.0:0", "--key", "k", "--latency-ms", "100:250"),
            *("--latency-distribution", "skewed", "--fault", "flap", "--training-seconds", "0"),
            *("--admin-listen", "127.0.0.1:9000", "--state", "s.json", "--workers", "0"),
        )
    )
    assert explicit.latency == LatencyProfile(100, 250, "skewed")
    assert explicit.faults.mode is FaultMode.FLAP
    assert explicit.admin_listen == "127.0.0.1:9000"
    assert explicit.state_file == Path("s.json")
    assert explicit.training_seconds == 0 and explicit.workers == 0


@pytest.mark.parametrize(
    "flags",
    [
        ("--listen", "nowhere", "--key", "k"),
        ("--listen", "127.0.0.1:1", "--key", "k", "--profile", "moon"),
        ("--listen", "127.0.0.1:1", "--key", "k", "--latency-ms", "300"),
        ("--listen", "127.0.0.1:1", "--key", "k", "--latency-ms", "300:100"),
    ],
)
def test_bad_flags_exit_2(flags: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(parse(*flags)) == 2
    assert capsys.readouterr().out.startswith("error:")


@contextmanager
def served(state: Path) -> Iterator[dict[str, Any]]:
    """`facegate azure-emulator` as a process; yields its "serving" log entry."""
    process = subprocess.Popen(
        [
            *(FACEGATE, "azure-emulator", "--listen", "127.0.0.1:0", "--key", KEY),
            *("--admin-listen", "127.0.0.1:0", "--workers", "0", "--training-seconds", "0"),
            *("--state", str(state)),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert process.stderr is not None
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stderr])  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            entry = json.loads(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            if entry["msg"] == "serving":
                break
        yield entry
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=5)
        process.stderr.close()


def test_the_command_serves_until_sigterm_and_saves_its_state(tmp_path: Path) -> None:
    state = tmp_path / "emulator" / "state.json"
    headers = {"Ocp-Apim-Subscription-Key": KEY}
    with served(state) as serving:
        assert serving["endpoint"].startswith("http://127.0.0.1:")
        group = f"{serving['endpoint']}/face/v1.0/largepersongroups/kept"
        assert (
            requests.put(group, json={"name": "kept"}, headers=headers, timeout=5).status_code
            == 200
        )
        status = requests.get(f"{serving['admin_endpoint']}/_emulator/status", timeout=5).json()
        assert status["groups"]["largepersongroups"] == 1
    saved = json.loads(state.read_text())
    assert [g["id"] for g in saved["groups"]] == ["kept"]
    assert list(state.parent.iterdir()) == [state], "no temporary files left behind"


def test_state_is_loaded_again_at_start(tmp_path: Path) -> None:
    settings = EmulatorSettings(
        key=KEY, workers=0, rate_per_second=0, state_file=tmp_path / "state.json"
    )
    headers = {"Ocp-Apim-Subscription-Key": KEY}
    with start_emulator(settings) as first:
        group = f"{first.endpoint}/face/v1.0/largepersongroups/kept"
        requests.put(group, json={"name": "kept", "userData": "u"}, headers=headers, timeout=5)
        person = requests.post(f"{group}/persons", json={"name": "p"}, headers=headers, timeout=5)
        first.admin.save_state()
    with start_emulator(settings) as second:
        again = f"{second.endpoint}/face/v1.0/largepersongroups/kept"
        assert requests.get(again, headers=headers, timeout=5).json()["userData"] == "u"
        persons = requests.get(f"{again}/persons", headers=headers, timeout=5).json()
        assert [p["personId"] for p in persons] == [person.json()["personId"]]
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not an emulator state file"):
        start_emulator(EmulatorSettings(key=KEY, workers=0, state_file=tmp_path / "bad.json"))


def test_stopping_drops_hung_requests_and_saves(tmp_path: Path) -> None:
    settings = EmulatorSettings(
        key=KEY, workers=0, clock=ManualClock(), rate_per_second=0, state_file=tmp_path / "s.json"
    )
    emulator = start_emulator(settings)
    url = f"{emulator.endpoint}/face/v1.0/persongroups/g"
    headers = {"Ocp-Apim-Subscription-Key": KEY}
    assert requests.put(url, json={"name": "g"}, headers=headers, timeout=5).status_code == 200
    emulator.admin.set_fault("hang")
    outcome: list[object] = []

    def hung_call() -> None:
        try:
            outcome.append(requests.get(url, headers=headers, timeout=10).status_code)
        except requests.exceptions.ConnectionError as error:
            outcome.append(error)

    caller = threading.Thread(target=hung_call)
    caller.start()
    emulator.admin.wait_hung(1)
    started = time.monotonic()
    emulator.stop()
    caller.join(timeout=5)
    assert time.monotonic() - started < 3
    assert len(outcome) == 1 and isinstance(outcome[0], requests.exceptions.ConnectionError)
    assert json.loads((tmp_path / "s.json").read_text())["groups"][0]["id"] == "g"
    emulator.stop()  # a second stop does nothing
