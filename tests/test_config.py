"""Settings (config.py): typed values from FACEGATE_* variables, the rules, and the one-line
errors `facegate serve` prints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import get_args

import pytest
from facegate_server.config import (
    Disagreement,
    RoutingPolicy,
    Settings,
    SettingsError,
    load_settings,
)
from pydantic import ValidationError

SECRET = "sekrit-value-42"


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """os.environ without FACEGATE_* variables, for the tests that read it."""
    for name in list(os.environ):
        if name.upper().startswith("FACEGATE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_settings_is_the_defaults_and_load_settings_the_reader(
    clean_environ: pytest.MonkeyPatch,
) -> None:
    clean_environ.setenv("FACEGATE_MATCH_THRESHOLD", "0.5")
    assert Settings().match_threshold == 0.55  # the defaults, whatever the environment
    assert load_settings({}) == Settings()  # env={}: no environment at all
    assert load_settings().match_threshold == 0.5  # env=None: os.environ


def test_values_arrive_typed() -> None:
    settings = load_settings(
        {
            "FACEGATE_WORKERS": "3",
            "FACEGATE_IDENTIFY_RATE": "2.5",
            "FACEGATE_KEEP_PHOTOS": "yes",
            "FACEGATE_DATA_DIR": "/var/lib/facegate",
            "FACEGATE_TOKENS_FILE": "callers.txt",
            "FACEGATE_ROUTING_POLICY": "local-first",
            "FACEGATE_LOG_LEVEL": "DEBUG",
        }
    )
    assert type(settings.workers) is int and settings.workers == 3
    assert type(settings.identify_rate) is float and settings.identify_rate == 2.5
    assert settings.keep_photos is True
    assert settings.data_dir == Path("/var/lib/facegate")
    assert settings.db_path == Path("/var/lib/facegate/facegate.sqlite3")
    assert settings.tokens_file == Path("callers.txt")
    assert settings.tls_cert is None  # Path | None, unset
    assert settings.routing_policy == "local-first"
    assert settings.log_level == "DEBUG"
    assert type(load_settings({"FACEGATE_MATCH_MARGIN": "0"}).match_margin) is float


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        *[("1", True), ("true", True), ("YES", True), ("on", True)],
        *[("0", False), ("false", False), ("No", False), ("off", False)],
    ],
)
def test_booleans(raw: str, value: bool) -> None:
    assert load_settings({"FACEGATE_KEEP_PHOTOS": raw}).keep_photos is value


def test_an_empty_variable_is_unset() -> None:
    empty = {
        "FACEGATE_WORKERS": "",
        "FACEGATE_KEEP_PHOTOS": "",
        "FACEGATE_TLS_CERT": "",
        "FACEGATE_ROUTING_POLICY": "",
        "FACEGATE_LISTEN": "",
    }
    assert load_settings(empty) == Settings()


def test_a_future_optional_int_setting_parses_as_int() -> None:
    class Future(Settings):
        retries: int | None = None

    assert Future.load({}).retries is None
    loaded = Future.load({"FACEGATE_RETRIES": "3"})
    assert type(loaded.retries) is int and loaded.retries == 3
    with pytest.raises(SettingsError, match=r"^FACEGATE_RETRIES=three: not a whole number$"):
        Future.load({"FACEGATE_RETRIES": "three"})


def test_overrides_beat_the_environment_and_none_is_ignored() -> None:
    env = {"FACEGATE_WORKERS": "3", "FACEGATE_LISTEN": "127.0.0.1:7000"}
    settings = load_settings(env, workers=5, listen=None, data_dir=Path("elsewhere"))
    assert (settings.workers, settings.listen, settings.data_dir) == (
        5,
        "127.0.0.1:7000",
        Path("elsewhere"),
    )
    with pytest.raises(SettingsError, match=r"^bogus: not a setting$"):
        load_settings({}, bogus=1)


def test_insecure_is_a_flag_never_a_variable() -> None:
    assert load_settings({"FACEGATE_INSECURE": "1"}).insecure is False
    assert load_settings({"FACEGATE_INSECURE": "1"}, insecure=True).insecure is True


def test_unknown_facegate_variables_are_ignored() -> None:
    # The prefix is shared with the client and the tests: not the server's to warn about.
    env = {"FACEGATE_TARGET": "gym:50051", "FACEGATE_TOKEN": "t", "FACEGATE_TEST_FACES": "/x"}
    assert load_settings(env) == Settings()


def test_properties() -> None:
    assert Settings().policy == "local-only"
    assert not Settings().cloud_enabled
    cloud = {"FACEGATE_AZURE_ENDPOINT": "http://face", "FACEGATE_AZURE_KEY": "k"}
    assert load_settings(cloud).cloud_enabled
    assert load_settings(cloud).policy == "cloud-first"
    assert load_settings({**cloud, "FACEGATE_ROUTING_POLICY": "local-first"}).policy == (
        "local-first"
    )
    assert load_settings({"FACEGATE_ROUTING_POLICY": "local-first"}).policy == "local-only"
    limits = load_settings(
        {
            "FACEGATE_MAX_PHOTOS": "2",
            "FACEGATE_MAX_PHOTO_BYTES": "10",
            "FACEGATE_MAX_IMAGE_BYTES": "9",
        }
    )
    assert limits.max_message_bytes == 2 * 10 + 1024 * 1024
    assert Settings().max_message_bytes == 10 * 48 * 1024 * 1024 + 1024 * 1024


def test_the_literals_are_the_routers_enums() -> None:
    from facegate_server.routing.router import Agreement, Policy

    assert set(get_args(RoutingPolicy)) == {policy.value for policy in Policy}
    assert set(get_args(Disagreement)) == {agreement.value for agreement in Agreement}


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.workers = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FACEGATE_WORKERS": "abc"}, "FACEGATE_WORKERS=abc: not a whole number"),
        ({"FACEGATE_WORKERS": "0"}, "FACEGATE_WORKERS=0: must be at least 1"),
        ({"FACEGATE_IDENTIFY_RATE": "-1"}, "FACEGATE_IDENTIFY_RATE=-1: must be at least 0"),
        ({"FACEGATE_ENROLL_RATE": "fast"}, "FACEGATE_ENROLL_RATE=fast: not a number"),
        ({"FACEGATE_IDENTIFY_BURST": "0"}, "FACEGATE_IDENTIFY_BURST=0: must be at least 1"),
        ({"FACEGATE_ENROLL_BURST": "0"}, "FACEGATE_ENROLL_BURST=0: must be at least 1"),
        ({"FACEGATE_MATCH_THRESHOLD": "0"}, "FACEGATE_MATCH_THRESHOLD=0: must be greater than 0"),
        ({"FACEGATE_MATCH_THRESHOLD": "2"}, "FACEGATE_MATCH_THRESHOLD=2: must be less than 2"),
        ({"FACEGATE_MATCH_THRESHOLD": "nan"}, "FACEGATE_MATCH_THRESHOLD=nan: not a finite number"),
        ({"FACEGATE_MATCH_MARGIN": "-0.1"}, "FACEGATE_MATCH_MARGIN=-0.1: must be at least 0"),
        ({"FACEGATE_MATCH_MARGIN": "2"}, "FACEGATE_MATCH_MARGIN=2: must be less than 2"),
        (
            {"FACEGATE_DOMINANT_FACE_RATIO": "0.5"},
            "FACEGATE_DOMINANT_FACE_RATIO=0.5: must be at least 1",
        ),
        ({"FACEGATE_MIN_FACE_PX": "-1"}, "FACEGATE_MIN_FACE_PX=-1: must be at least 0"),
        ({"FACEGATE_MIN_BRIGHTNESS": "-1"}, "FACEGATE_MIN_BRIGHTNESS=-1: must be at least 0"),
        ({"FACEGATE_MIN_SHARPNESS": "-1"}, "FACEGATE_MIN_SHARPNESS=-1: must be at least 0"),
        ({"FACEGATE_MAX_YAW": "0"}, "FACEGATE_MAX_YAW=0: must be greater than 0"),
        ({"FACEGATE_MIN_PITCH": "-0.1"}, "FACEGATE_MIN_PITCH=-0.1: must be at least 0"),
        ({"FACEGATE_IDENTIFY_BUDGET_MS": "0"}, "FACEGATE_IDENTIFY_BUDGET_MS=0: must be at least 1"),
        ({"FACEGATE_MAX_IMAGE_BYTES": "0"}, "FACEGATE_MAX_IMAGE_BYTES=0: must be at least 1"),
        ({"FACEGATE_MAX_IMAGE_SIDE": "0"}, "FACEGATE_MAX_IMAGE_SIDE=0: must be at least 1"),
        ({"FACEGATE_MAX_PHOTOS": "0"}, "FACEGATE_MAX_PHOTOS=0: must be at least 1"),
        (
            {"FACEGATE_ROUTING_POLICY": "nope"},
            "FACEGATE_ROUTING_POLICY=nope: must be cloud-first, local-first or local-only",
        ),
        (
            {"FACEGATE_ON_DISAGREEMENT": "shrug"},
            "FACEGATE_ON_DISAGREEMENT=shrug: must be deny-on-conflict or require-agreement",
        ),
        (
            {"FACEGATE_AZURE_ENDPOINT": "http://face"},
            "set both FACEGATE_AZURE_ENDPOINT and FACEGATE_AZURE_KEY, or neither",
        ),
        ({"FACEGATE_BREAKER_FAILURES": "0"}, "FACEGATE_BREAKER_FAILURES=0: must be at least 1"),
        (
            {"FACEGATE_BREAKER_COOLDOWN_S": "0"},
            "FACEGATE_BREAKER_COOLDOWN_S=0: must be greater than 0",
        ),
        ({"FACEGATE_CLOUD_SLOTS": "0"}, "FACEGATE_CLOUD_SLOTS=0: must be at least 1"),
        ({"FACEGATE_RECOGNITION_QUEUE": "0"}, "FACEGATE_RECOGNITION_QUEUE=0: must be at least 1"),
        (
            {"FACEGATE_RECOGNITION_PER_CALLER": "0"},
            "FACEGATE_RECOGNITION_PER_CALLER=0: must be at least 1",
        ),
        (
            {"FACEGATE_RECOGNITION_MARGIN": "0.9"},
            "FACEGATE_RECOGNITION_MARGIN=0.9: must be at least 1",
        ),
        ({"FACEGATE_WORKER_HANG_S": "0"}, "FACEGATE_WORKER_HANG_S=0: must be greater than 0"),
        (
            {"FACEGATE_WORKER_JOB_LIMIT_S": "-1"},
            "FACEGATE_WORKER_JOB_LIMIT_S=-1: must be greater than 0",
        ),
        (
            {"FACEGATE_KEEP_PHOTOS": "maybe"},
            "FACEGATE_KEEP_PHOTOS=maybe: not true or false (1/0, yes/no, on/off)",
        ),
        ({"FACEGATE_WORKERS": "two cores"}, "FACEGATE_WORKERS='two cores': not a whole number"),
        (
            {"FACEGATE_WORKERS": "0", "FACEGATE_MAX_PHOTOS": "0"},
            "FACEGATE_WORKERS=0: must be at least 1; FACEGATE_MAX_PHOTOS=0: must be at least 1",
        ),
    ],
)
def test_each_rule_says_which_variable_and_what_is_wrong(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(env)
    assert str(raised.value) == message
    assert isinstance(raised.value, ValueError)


def test_overrides_are_named_by_their_variable_too() -> None:
    with pytest.raises(SettingsError, match=r"^FACEGATE_WORKERS=0: must be at least 1$"):
        load_settings({}, workers=0)
    with pytest.raises(SettingsError, match=r"^FACEGATE_DATA_DIR=5: not a path$"):
        load_settings({}, data_dir=5)


def test_secrets_stay_out_of_repr_and_errors() -> None:
    settings = load_settings(
        {
            "FACEGATE_AZURE_ENDPOINT": "http://face",
            "FACEGATE_AZURE_KEY": SECRET,
            "FACEGATE_TOKENS": f"admin ops {SECRET}",
        }
    )
    assert (settings.azure_key, settings.tokens) == (SECRET, f"admin ops {SECRET}")
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    with pytest.raises(SettingsError) as raised:
        load_settings({"FACEGATE_AZURE_KEY": SECRET})
    assert SECRET not in str(raised.value)
    with pytest.raises(SettingsError) as raised:
        load_settings({}, azure_key=42)
    assert str(raised.value) == "FACEGATE_AZURE_KEY: not text"
    with pytest.raises(ValidationError) as direct:  # constructed directly: pydantic's error
        Settings(azure_key=SECRET)
    assert SECRET not in str(direct.value)


@pytest.mark.parametrize(
    ("env", "argv", "line"),
    [
        ({"FACEGATE_WORKERS": "abc"}, [], "error: FACEGATE_WORKERS=abc: not a whole number"),
        ({"FACEGATE_WORKERS": "0"}, [], "error: FACEGATE_WORKERS=0: must be at least 1"),
        ({}, ["--workers", "0"], "error: --workers=0: must be at least 1"),  # where it came from
        (
            {"FACEGATE_ROUTING_POLICY": "nope"},
            [],
            "error: FACEGATE_ROUTING_POLICY=nope: must be cloud-first, local-first or local-only",
        ),
    ],
)
def test_serve_prints_one_line_and_exits_2(
    env: dict[str, str],
    argv: list[str],
    line: str,
    clean_environ: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from facegate_client.cli import main

    for name, value in env.items():
        clean_environ.setenv(name, value)
    assert main(["serve", *argv]) == 2
    assert capsys.readouterr().out == line + "\n"


def test_importing_config_does_not_import_numpy() -> None:
    import subprocess
    import sys

    code = "import sys, facegate_server.config; print('numpy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_the_recognition_pipelines_settings_reach_the_workers_and_their_queue() -> None:
    """FACEGATE_RECOGNITION_* and FACEGATE_WORKER_* configure the pool app.py builds (one
    real worker); unset, the defaults are the pool's own (8 images a worker, all workers
    but one a caller, at least one)."""
    from facegate_server.app import build_local
    from facegate_server.store.memory import MemoryStore

    settings = load_settings(
        {
            "FACEGATE_WORKERS": "1",
            "FACEGATE_RECOGNITION_QUEUE": "5",
            "FACEGATE_RECOGNITION_PER_CALLER": "3",
            "FACEGATE_RECOGNITION_MARGIN": "1.5",
            "FACEGATE_WORKER_HANG_S": "4.5",
            "FACEGATE_WORKER_JOB_LIMIT_S": "30",
            "FACEGATE_WORKER_START_TIMEOUT_S": "90",
        }
    )
    engine = build_local(settings, MemoryStore())
    try:
        pool = engine.pool
        assert (pool.admission.limit, pool.admission.per_caller, pool.admission.margin) == (
            5,
            3,
            1.5,
        )
        assert (pool.hang_after, pool.job_limit, pool.start_timeout) == (4.5, 30.0, 90.0)
    finally:
        pool.close()
    defaults = load_settings({})
    assert (defaults.recognition_queue, defaults.recognition_per_caller) == (None, None)
    assert (defaults.recognition_margin, defaults.worker_hang_s) == (1.15, 2.0)
