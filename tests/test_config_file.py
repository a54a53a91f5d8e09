"""Configuration beyond variables: a TOML file under the environment and the flags, secrets
read from files, `facegate config check`, and the README's table kept equal to Settings."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from facegate_client.cli import main
from facegate_server.config import (
    Settings,
    SettingsError,
    env_name,
    load_settings,
    secret_fields,
)

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sekrit-key-42"


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("FACEGATE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def toml(tmp_path: Path, text: str, name: str = "facegate.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_file_under_the_environment_under_the_flags(tmp_path: Path) -> None:
    config = toml(
        tmp_path,
        'workers = 2\nlisten = "127.0.0.1:7000"\nkeep_photos = true\n'
        'data_dir = "/srv/facegate"\nmatch_threshold = 0.5\nazure_tier = "F0"\n',
    )
    settings, sources = Settings.load_with_sources(
        {"FACEGATE_LISTEN": "127.0.0.1:7001", "FACEGATE_KEEP_PHOTOS": "no"},
        config=config,
        keep_photos=True,
    )
    assert type(settings.workers) is int and settings.workers == 2
    assert settings.data_dir == Path("/srv/facegate")
    assert (settings.match_threshold, settings.azure_tier) == (0.5, "F0")
    assert settings.listen == "127.0.0.1:7001"  # env over file
    assert settings.keep_photos is True  # flag over env over file
    assert sources["workers"] == f"file {config}"
    assert sources["listen"] == "env FACEGATE_LISTEN"
    assert sources["keep_photos"] == "flag"
    assert sources["site_id"] == "default"
    assert set(sources) == set(Settings.model_fields)


def test_facegate_config_names_the_file_and_the_flag_beats_it(tmp_path: Path) -> None:
    by_env = toml(tmp_path, "workers = 2\n", "env.toml")
    by_flag = toml(tmp_path, "workers = 3\n", "flag.toml")
    assert load_settings({"FACEGATE_CONFIG": str(by_env)}).workers == 2
    assert load_settings({"FACEGATE_CONFIG": str(by_env)}, config=by_flag).workers == 3
    assert load_settings({"FACEGATE_CONFIG": ""}) == Settings()  # empty: unset


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("wrokers = 2\n", "{f}: 'wrokers' is not a setting (did you mean 'workers'?)"),
        ("zzz = 1\n", "{f}: 'zzz' is not a setting"),
        ("[azure]\nkey = 'x'\n", "{f}: 'azure' is not a setting"),
        ("insecure = true\n", "{f}: 'insecure' is set by a `facegate serve` flag only"),
        ("workers = \n", "{f}: not valid TOML: Invalid value (at line 1, column 11)"),
        ("workers = 0\n", "{f}: workers=0: must be at least 1"),
        ('workers = "two"\n', "{f}: workers=two: not a whole number"),
        ('routing_policy = "up"\n', "{f}: routing_policy=up: must be cloud-first, "),
        (f'azure_key = "{SECRET}"\n', "set both FACEGATE_AZURE_ENDPOINT and FACEGATE_AZURE_KEY"),
        ("azure_key = 42\n", "{f}: azure_key: not text"),
    ],
)
def test_file_errors_are_one_line_naming_the_file_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    config = toml(tmp_path, text)
    with pytest.raises(SettingsError) as raised:
        load_settings({}, config=config)
    assert str(raised.value).startswith(message.format(f=config))
    assert "\n" not in str(raised.value) and SECRET not in str(raised.value)


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"FACEGATE_CONFIG": str(tmp_path / "nope.toml")})
    assert str(raised.value) == (
        f"cannot read the configuration file {tmp_path / 'nope.toml'}: No such file or directory"
    )


def test_an_env_value_over_a_bad_file_value_is_named_by_its_variable(tmp_path: Path) -> None:
    config = toml(tmp_path, "workers = 2\n")
    with pytest.raises(SettingsError, match=r"^FACEGATE_WORKERS=0: must be at least 1$"):
        load_settings({"FACEGATE_WORKERS": "0"}, config=config)


def test_secrets_from_files(tmp_path: Path) -> None:
    key = tmp_path / "azure-key"
    key.write_text(SECRET + "\n")
    env = {"FACEGATE_AZURE_ENDPOINT": "http://face", "FACEGATE_AZURE_KEY_FILE": str(key)}
    settings, sources = Settings.load_with_sources(env)
    assert settings.azure_key == SECRET  # one trailing newline dropped
    assert sources["azure_key"] == "env FACEGATE_AZURE_KEY_FILE"
    assert SECRET not in repr(settings)

    key.write_text(SECRET + "\r\n\n")  # one line ending only
    assert load_settings(env).azure_key == SECRET + "\r\n"
    key.write_text(SECRET)
    assert load_settings(env).azure_key == SECRET

    # Over the file's value; beside the variable itself, an error.
    config = toml(tmp_path, 'azure_key = "from-the-file"\n')
    assert load_settings(env, config=config).azure_key == SECRET
    with pytest.raises(SettingsError) as raised:
        load_settings({**env, "FACEGATE_AZURE_KEY": "other"})
    assert str(raised.value) == "set FACEGATE_AZURE_KEY or FACEGATE_AZURE_KEY_FILE, not both"


def test_an_unreadable_secret_file_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(SettingsError) as raised:
        load_settings({"FACEGATE_AZURE_KEY_FILE": str(missing)})
    assert str(raised.value) == (
        f"FACEGATE_AZURE_KEY_FILE={missing}: cannot read it: No such file or directory"
    )
    with pytest.raises(SettingsError, match=r"^FACEGATE_AZURE_KEY_FILE=\S+: cannot read it: "):
        load_settings({"FACEGATE_AZURE_KEY_FILE": str(tmp_path)})  # a directory
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(SettingsError, match=r": cannot read it: not UTF-8 text$"):
        load_settings({"FACEGATE_AZURE_KEY_FILE": str(binary)})


def test_every_secret_has_a_file_variable() -> None:
    # tokens' file is the callers' file, a setting of its own (FACEGATE_TOKENS_FILE).
    assert set(secret_fields(Settings)) == {"tokens", "store", "azure_key", "cloud_lease_url"}
    assert "tokens_file" in Settings.model_fields


def test_config_check_prints_values_and_sources_with_secrets_masked(
    tmp_path: Path, clean_environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "azure-key"
    key.write_text(SECRET + "\n")
    config = toml(tmp_path, 'workers = 2\nsite_id = "north"\n')
    clean_environ.setenv("FACEGATE_AZURE_ENDPOINT", "http://face")
    clean_environ.setenv("FACEGATE_AZURE_KEY_FILE", str(key))
    clean_environ.setenv("FACEGATE_TOKENS", f"admin ops sha256:{'ab' * 32}")

    code = main(["config", "check", "--config", str(config), "--listen", "127.0.0.1:7000"])

    out = capsys.readouterr()
    assert code == 0, out
    assert SECRET not in out.out + out.err and "ab" * 32 not in out.out + out.err
    rows = {line.split()[0]: line.split()[1:] for line in out.out.splitlines()[1:]}
    assert set(rows) == set(Settings.model_fields)
    assert rows["workers"] == ["2", "file", str(config)]
    assert rows["site_id"] == ["north", "file", str(config)]
    assert rows["listen"] == ["127.0.0.1:7000", "flag"]
    assert rows["azure_key"] == ["********", "env", "FACEGATE_AZURE_KEY_FILE"]
    assert rows["tokens"] == ["********", "env", "FACEGATE_TOKENS"]
    assert rows["azure_endpoint"] == ["http://face", "env", "FACEGATE_AZURE_ENDPOINT"]
    assert rows["match_threshold"] == ["0.55", "default"]
    assert rows["tls_cert"] == ["(unset)", "default"]


@pytest.mark.parametrize(
    ("files", "argv", "line"),
    [
        ({"f.toml": "wrokers = 2\n"}, ["--config", "f.toml"], "error: f.toml: 'wrokers' is not"),
        ({}, ["--workers", "0"], "error: --workers=0: must be at least 1"),
        (
            {"callers": "turnstile gate-1 fg_raw-token\n"},
            ["--tokens-file", "callers"],
            "error: callers, line 1: the credential must be sha256:",
        ),
        ({}, ["--tokens-file", "nowhere"], "error: cannot read the tokens file: "),
        ({}, ["--tls-cert", "c.pem"], "error: TLS needs both a certificate and its key"),
        ({}, ["--listen", "0.0.0.0:1"], "error: refusing to listen on 0.0.0.0:1 without auth"),
    ],
)
def test_config_check_refuses_with_one_line_and_exit_2(
    files: dict[str, str],
    argv: list[str],
    line: str,
    tmp_path: Path,
    clean_environ: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    clean_environ.chdir(tmp_path)
    assert main(["config", "check", *argv]) == 2
    out = capsys.readouterr().out
    assert out.startswith(line) and out.count("\n") == 1, out


def test_serve_refuses_a_bad_file_with_one_line_and_exit_2(
    tmp_path: Path, clean_environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = toml(tmp_path, "workers = -1\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert capsys.readouterr().out == f"error: {config}: workers=-1: must be at least 1\n"
    clean_environ.setenv("FACEGATE_CONFIG", str(config))
    assert main(["serve"]) == 2
    assert capsys.readouterr().out == f"error: {config}: workers=-1: must be at least 1\n"


# ------------------------------------------------------------------ the README's table


def readme_table() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Configuration\n") :]
    header = "| setting (TOML key) | variable | flag | default | meaning |"
    lines = section[section.index(header) :].split("\n\n", 1)[0].splitlines()[2:]
    rows = {}
    for line in lines:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        name = cells[0].strip("`")
        assert name not in rows, f"{name} is listed twice"
        rows[name] = cells[1:]
    return rows


def serve_flags() -> dict[str, str]:
    """`facegate serve`'s flags that set a setting: {setting: --flag}."""
    import argparse

    from facegate_server.commands.serve import register_serve

    subparsers = argparse.ArgumentParser().add_subparsers()
    register_serve(subparsers)
    parser = subparsers.choices["serve"]
    return {
        action.dest: action.option_strings[0]
        for action in parser._actions
        if action.dest in Settings.model_fields and action.option_strings
    }


def test_the_readme_table_lists_exactly_the_settings() -> None:
    rows = readme_table()
    assert list(rows) == [name for name in rows]  # (one row each, checked above)
    assert set(rows) == set(Settings.model_fields), (
        f"missing from the README: {sorted(set(Settings.model_fields) - set(rows))}; "
        f"not settings: {sorted(set(rows) - set(Settings.model_fields))}"
    )
    flags = serve_flags()
    secrets = set(secret_fields(Settings))
    for name, (variable, flag, default, meaning) in rows.items():
        variables = re.findall(r"`([A-Z0-9_]+)`", variable)
        if name == "insecure":
            assert variables == []
        elif name in secrets and name + "_file" not in Settings.model_fields:
            assert variables == [env_name(name), env_name(name) + "_FILE"], name
        else:
            assert variables == [env_name(name)], name
        assert flag.strip("`") == flags.get(name, ""), name
        assert default and meaning, name
