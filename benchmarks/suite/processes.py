"""The real processes under test: `facegate serve` and `facegate azure-emulator`, started as
their console scripts (next to this Python), and a sampler of their memory and CPU."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import psutil

EMULATOR_KEY = "benchmark-face-key"


def console_script(name: str = "facegate") -> str:
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"no {name} command beside {sys.executable} or on PATH")
    return found


def clean_environment(overrides: dict[str, str]) -> dict[str, str]:
    """This process's environment without any FACEGATE_* variable, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
    env.update(overrides)
    return env


class Process:
    """A child whose JSON log lines (stderr) go to a file; started, it waits for `ready`."""

    ready_message = "serving"

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self.launched = 0.0
        self._log: IO[bytes] | None = None
        self.lines: list[dict[str, Any]] = []

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self, timeout: float = 180.0) -> dict[str, Any]:
        """Start, and return the log line saying it is ready; RuntimeError if it exits or
        does not say so within `timeout`."""
        self.launch()
        return self.ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting for it (`ready` waits): several start at once."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.launched = time.monotonic()
        self.popen = subprocess.Popen(
            self.args, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )

    def ready(self, timeout: float = 180.0) -> dict[str, Any]:
        """Wait for the log line saying the launched process is ready, and return it."""
        assert self.popen is not None
        deadline = time.monotonic() + timeout
        offset = 0
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            offset += len(complete)
            for raw in complete.splitlines():
                with contextlib.suppress(ValueError):
                    line = json.loads(raw)
                    if isinstance(line, dict):
                        self.lines.append(line)
                        if line.get("msg") == self.ready_message:
                            return line
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{self.args[1]} did not start (see {self.log_path}):\n{tail}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ServerProcess(Process):
    """`facegate serve --listen 127.0.0.1:0` on `data_dir`, configured by FACEGATE_* `env`."""

    def __init__(self, data_dir: Path, settings: dict[str, str], log_path: Path) -> None:
        super().__init__(
            [console_script(), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)],
            clean_environment(settings),
            log_path,
        )
        self.port = 0
        self.workers = 0
        self.startup_seconds = 0.0

    def ready(self, timeout: float = 180.0) -> dict[str, Any]:
        line = super().ready(timeout)
        self.startup_seconds = time.monotonic() - self.launched
        self.port = int(line["port"])
        self.workers = next(
            (int(x["workers"]) for x in self.lines if x.get("msg") == "starting"), 0
        )
        return line

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


class EmulatorProcess(Process):
    """`facegate azure-emulator` on free ports, with one recognition worker process."""

    def __init__(self, log_path: Path, seed: int = 7) -> None:
        super().__init__(
            [
                console_script(),
                "azure-emulator",
                "--listen",
                "127.0.0.1:0",
                "--key",
                EMULATOR_KEY,
                "--workers",
                "1",
                "--training-seconds",
                "0.2",
                # No rate limit of its own: the benchmark's turnstiles and enrolment would
                # exceed S0's 10 calls a second; FaceGate's own client-side limit is measured.
                "--rate",
                "0",
                # No small-face pass: the probe frames have no one behind the member, so it
                # would change no answer and only add 0.5-1.2 s a 1080p frame on top of the
                # latency profile, which already stands for Azure's whole call.
                "--small-faces",
                "off",
                "--seed",
                str(seed),
                "--log-level",
                "INFO",  # its "serving" line, with the ports, is logged at INFO
            ],
            clean_environment({}),
            log_path,
        )
        self.endpoint = ""
        self.admin_endpoint = ""

    def ready(self, timeout: float = 120.0) -> dict[str, Any]:
        line = super().ready(timeout)
        self.endpoint = str(line["endpoint"])
        self.admin_endpoint = str(line["admin_endpoint"])
        return line

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.admin_endpoint}/_emulator/{path}", data=data, method=method
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read() or b"{}")

    def set_fault(self, mode: str, **knobs: Any) -> None:
        self._admin("PUT", "fault", {"mode": mode, **knobs})

    def set_latency(self, profile: str) -> None:
        self._admin("PUT", "latency", {"profile": profile})

    def clear_state(self) -> None:
        self._admin("DELETE", "state")

    def reset_counts(self) -> None:
        self._admin("DELETE", "counts")

    def counts(self) -> dict[str, Any]:
        answer: dict[str, Any] = self._admin("GET", "counts")
        return answer


class Sampler:
    """Samples the resident memory and CPU time of process trees every `interval` seconds.

    `peak_mib(pid)` is the largest sum of RSS over the process and its descendants (the
    server's recognition workers) since the sampler started; `window` starts a new window
    whose peak `window_peak_mib` reports.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._pids: set[int] = set()
        self._peak: dict[int, float] = {}
        self._window: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def watch(self, pid: int) -> None:
        with self._lock:
            self._pids.add(pid)
        self._sample(pid)

    def forget(self, pid: int) -> None:
        with self._lock:
            self._pids.discard(pid)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def tree(pid: int) -> list[psutil.Process]:
        try:
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def _sample(self, pid: int) -> None:
        total = 0
        for process in self.tree(pid):
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        mib = total / (1 << 20)
        with self._lock:
            self._peak[pid] = max(self._peak.get(pid, 0.0), mib)
            self._window[pid] = max(self._window.get(pid, 0.0), mib)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                pids = list(self._pids)
            for pid in pids:
                self._sample(pid)

    def window(self, pid: int) -> None:
        with self._lock:
            self._window[pid] = 0.0
        self._sample(pid)

    def window_peak_mib(self, pid: int) -> float:
        self._sample(pid)
        with self._lock:
            return self._window.get(pid, 0.0)

    def peak_mib(self, pid: int) -> float:
        with self._lock:
            return self._peak.get(pid, 0.0)

    @staticmethod
    def machine_cpu() -> tuple[float, float]:
        """(busy, steal) CPU seconds of the whole machine so far, all cores together."""
        t = psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        steal = getattr(t, "steal", 0.0)
        return sum(t) - idle - steal, steal

    @staticmethod
    def own_cpu_seconds() -> float:
        """This process's CPU seconds (the turnstiles and the sampler), children excluded."""
        times = psutil.Process().cpu_times()
        return times.user + times.system

    @staticmethod
    def process_cpu_seconds(pid: int) -> float:
        """User + system CPU seconds of the process itself so far (its children excluded:
        the server's own process, without its recognition workers)."""
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return 0.0
        return times.user + times.system

    @classmethod
    def cpu_seconds(cls, pid: int) -> float:
        """User + system CPU seconds of the process tree so far."""
        total = 0.0
        for process in cls.tree(pid):
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total
