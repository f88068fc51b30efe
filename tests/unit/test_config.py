"""Settings: precedence, types, the config file, secrets, ``zchat config`` and logging setup."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from zchat import config as cfg
from zchat.config import ConfigError, Settings, load_secret, load_settings
from zchat.logs import setup_logging

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    """Point zchat's config and data directories at tmp_path so no test sees the user's."""
    monkeypatch.setenv("ZCHAT_CONFIG_DIR", str(tmp_path / "conf"))
    monkeypatch.setenv("ZCHAT_DATA_DIR", str(tmp_path / "data"))
    for var in list(os.environ):
        if var.startswith("ZCHAT_") and var not in ("ZCHAT_CONFIG_DIR", "ZCHAT_DATA_DIR"):
            monkeypatch.delenv(var)
    return tmp_path


# ------------------------------------------------------------------ precedence


def test_defaults_when_nothing_is_set(home):
    settings, sources = load_settings({}, None, env={"ZCHAT_CONFIG_DIR": str(home / "conf")})
    assert settings == Settings()
    assert set(sources.values()) == {"default"}
    assert set(sources) == set(cfg.FIELDS)


def test_precedence_defaults_file_env_flags(home):
    path = write(
        home / "z.toml",
        """
        broker = "tcp://file.example:6000"
        name = "fromfile"
        log-level = "debug"
        rate = 5
        burst = 50.0
        """,
    )
    env = {"ZCHAT_NAME": "fromenv", "ZCHAT_RATE": "7.5", "ZCHAT_LOG_FORMAT": "json"}
    flags = {"rate": 9.0, "broker": None, "name": None}
    settings, sources = load_settings(flags, path, env=env)

    assert settings.broker == "tcp://file.example:6000"  # file beats default, flag None is unset
    assert sources["broker"] == f"file {path}"
    assert settings.log_level == "DEBUG"  # normalised
    assert settings.burst == 50.0 and sources["burst"] == f"file {path}"
    assert settings.name == "fromenv" and sources["name"] == "env ZCHAT_NAME"  # env beats file
    assert settings.log_format == "json" and sources["log_format"] == "env ZCHAT_LOG_FORMAT"
    assert settings.rate == 9.0 and sources["rate"] == "flag"  # flag beats env and file
    assert settings.bind == Settings().bind and sources["bind"] == "default"
    assert isinstance(settings.rate, float) and isinstance(settings.max_bytes, int)


def test_empty_env_var_counts_as_unset(home):
    path = write(home / "z.toml", 'name = "fromfile"\n')
    settings, sources = load_settings({}, path, env={"ZCHAT_NAME": ""})
    assert settings.name == "fromfile" and sources["name"].startswith("file ")


def test_default_file_in_config_dir_is_read(home):
    (home / "conf").mkdir()
    write(home / "conf" / "config.toml", 'heartbeat = 2.5\n')
    settings, sources = load_settings({}, None, env={"ZCHAT_CONFIG_DIR": str(home / "conf")})
    assert settings.heartbeat == 2.5
    assert sources["heartbeat"] == f"file {home / 'conf' / 'config.toml'}"


def test_zchat_config_env_names_the_file(home):
    path = write(home / "other.toml", 'name = "viaenv"\n')
    settings, _ = load_settings({}, None, env={"ZCHAT_CONFIG": str(path)})
    assert settings.name == "viaenv"
    # --config beats ZCHAT_CONFIG
    flag_path = write(home / "flag.toml", 'name = "viaflag"\n')
    settings, _ = load_settings({}, flag_path, env={"ZCHAT_CONFIG": str(path)})
    assert settings.name == "viaflag"


def test_db_path_defaults_to_data_dir(home):
    settings, _ = load_settings({}, None, env={})
    assert settings.db_path() == home / "data" / "history.db"
    settings, _ = load_settings({"db": str(home / "x.db")}, None, env={})
    assert settings.db_path() == home / "x.db"


# ------------------------------------------------------------------ errors


def test_missing_explicit_config_file_is_an_error(home):
    with pytest.raises(ConfigError, match=r"does not exist") as info:
        load_settings({}, home / "nope.toml", env={})
    assert "nope.toml" in str(info.value) and "--config" in str(info.value)
    with pytest.raises(ConfigError, match="ZCHAT_CONFIG"):
        load_settings({}, None, env={"ZCHAT_CONFIG": str(home / "gone.toml")})
    assert issubclass(ConfigError, ValueError)


def test_missing_default_config_file_is_fine(home):
    settings, _ = load_settings({}, None, env={"ZCHAT_CONFIG_DIR": str(home / "empty")})
    assert settings == Settings()


@pytest.mark.parametrize(
    "text, match",
    [
        ("name = \n", "not valid TOML"),
        ('[zchat]\nname = "x"\n', r"\[zchat\] is a table"),
        ('nmae = "carol"\n', r"unknown key 'nmae' \(did you mean 'name'\?\)"),
        ('rate = "fast"\n', r"'rate' from file .*expected a number, got 'fast'"),
        ("rate = true\n", r"'rate'.*expected a number"),
        ("max_bytes = 1.5\n", r"'max_bytes'.*expected an integer"),
        ("name = 42\n", r"'name'.*expected a string, got 42"),
        ('name = "Carol"\n', r"'name'.*lowercase"),
        ('log_level = "loud"\n', r"'log_level'.*one of DEBUG"),
        ('log_format = "xml"\n', r"'log_format'.*'text' or 'json'"),
        ('broker = "localhost:5555"\n', r"'broker'.*tcp://HOST:PORT"),
        ('bind = "tcp://*:65535"\n', r"'bind'.*65532"),
        ('broker = "tcp://localhost:0"\n', r"'broker'.*PORT from 1 to"),
        ('storage = "postgres://x"\n', r"'storage'.*redis://"),
        ("heartbeat = 0\n", r"'heartbeat'.*above 0"),
        ("max_bytes = 10000000\n", r"'max_bytes'.*from 1 to"),
    ],
)
def test_bad_config_file_values(home, text, match):
    path = write(home / "bad.toml", text)
    with pytest.raises(ConfigError, match=match) as info:
        load_settings({}, path, env={})
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "var, raw, match",
    [
        ("ZCHAT_RATE", "abc", r"'rate' from env ZCHAT_RATE: expected a number, got 'abc'"),
        ("ZCHAT_RATE", "nan", r"'rate'.*finite"),
        ("ZCHAT_MAX_BYTES", "1.5", r"'max_bytes'.*expected an integer"),
        ("ZCHAT_HEARTBEAT", "-1", r"'heartbeat'.*above 0"),
        ("ZCHAT_NAME", "bad name", r"'name' from env ZCHAT_NAME"),
        ("ZCHAT_LOG_LEVEL", "chatty", r"'log_level' from env ZCHAT_LOG_LEVEL"),
    ],
)
def test_bad_env_values(home, var, raw, match):
    with pytest.raises(ConfigError, match=match):
        load_settings({}, None, env={var: raw})


def test_bind_to_port_zero_is_allowed(home):
    settings, _ = load_settings({"bind": "tcp://127.0.0.1:0"}, None, env={})
    assert settings.bind == "tcp://127.0.0.1:0"


def test_env_text_is_parsed(home):
    settings, _ = load_settings(
        {}, None, env={"ZCHAT_MAX_BYTES": "4096", "ZCHAT_BURST": "3", "ZCHAT_LOG_LEVEL": "warn", "ZCHAT_NAME": " bot-1 "}
    )
    assert settings.max_bytes == 4096 and settings.burst == 3.0
    assert settings.log_level == "WARNING" and settings.name == "bot-1"


def test_bad_flag_values_name_the_flag(home):
    with pytest.raises(ConfigError, match=r"flag --max-bytes"):
        load_settings({"max_bytes": "lots"}, None, env={})
    with pytest.raises(ConfigError, match=r"unknown setting 'rat' \(did you mean 'rate'\?\)"):
        load_settings({"rat": 1}, None, env={})


# ------------------------------------------------------------------ secrets


def test_secret_is_made_once_with_mode_0600(home):
    first = load_secret("carol")
    path = home / "conf" / "secrets" / "carol"
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert len(first) >= 32
    assert load_secret("carol") == first  # stable across calls
    assert load_secret("dave") != first  # one per name
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_secret_stable_across_processes(home):
    code = "from zchat.config import load_secret; print(load_secret('erin'))"
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
        for _ in range(2)
    ]
    assert runs[0] == runs[1] == load_secret("erin") + "\n"


def test_secret_with_loose_mode_is_tightened(home):
    load_secret("frank")
    path = home / "conf" / "secrets" / "frank"
    path.chmod(0o644)
    load_secret("frank")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["../evil", "a/b", "", "UPPER"])
def test_secret_refuses_bad_names(home, name):
    with pytest.raises(ConfigError):
        load_secret(name)


# ------------------------------------------------------------------ zchat config


def run_config(*args: str, env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ZCHAT_")}
    full_env.update(
        {
            "ZCHAT_CONFIG_DIR": str(home / "conf"),
            "ZCHAT_DATA_DIR": str(home / "data"),
            "PYTHONPATH": str(REPO) + os.pathsep + full_env.get("PYTHONPATH", ""),
        }
    )
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "zchat", "config", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=home,
        timeout=60,
    )


def test_zchat_config_json_shows_sources(home):
    path = write(home / "z.toml", 'broker = "tcp://filehost:7000"\nrate = 3\n')
    proc = run_config("--config", str(path), "--json", env={"ZCHAT_NAME": "carol", "ZCHAT_RATE": "4"}, home=home)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["settings"]["name"] == "carol" and out["sources"]["name"] == "env ZCHAT_NAME"
    assert out["settings"]["rate"] == 4.0 and out["sources"]["rate"] == "env ZCHAT_RATE"
    assert out["settings"]["broker"] == "tcp://filehost:7000" and out["sources"]["broker"] == f"file {path}"
    assert out["sources"]["bind"] == "default"
    assert out["config_file"] == str(path) and out["config_file_exists"] is True
    assert out["db_path"] == str(home / "data" / "history.db")
    assert out["env"]["log_level"] == "ZCHAT_LOG_LEVEL"


def test_zchat_config_table(home):
    proc = run_config(env={"ZCHAT_LOG_LEVEL": "debug"}, home=home)
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("log_level "))
    assert line.split()[1:] == ["DEBUG", "env", "ZCHAT_LOG_LEVEL", "ZCHAT_LOG_LEVEL"]
    assert "not found; defaults used" in proc.stdout


def test_zchat_config_errors_exit_nonzero_with_message(home):
    proc = run_config("--config", str(home / "missing.toml"), env={}, home=home)
    assert proc.returncode == 1
    assert "missing.toml" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_config(env={"ZCHAT_HEARTBEAT": "often"}, home=home)
    assert proc.returncode == 1 and "ZCHAT_HEARTBEAT" in proc.stderr and "Traceback" not in proc.stderr


def test_zchat_config_help_has_examples(home):
    proc = run_config("--help", env={}, home=home)
    assert proc.returncode == 0
    assert "Examples:" in proc.stdout and "zchat config --json" in proc.stdout


# ------------------------------------------------------------------ logging


@pytest.fixture
def clean_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def test_json_logging_one_object_per_line(clean_root, capsys):
    setup_logging("info", "json")
    log = logging.getLogger("zchat.test")
    log.debug("hidden")
    log.info("stored %d", 3, extra={"room": "general", "seq": 7, "raw": b"\x00x"})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    first, second = map(json.loads, lines)
    assert first["level"] == "INFO" and first["logger"] == "zchat.test" and first["message"] == "stored 3"
    assert first["room"] == "general" and first["seq"] == 7 and first["ts"].endswith("+00:00")
    assert second["level"] == "ERROR" and "RuntimeError: boom" in second["exc"]


def test_text_logging_and_reconfigure(clean_root, capsys):
    setup_logging("DEBUG", "text")
    setup_logging("WARNING", "text")  # replaces, does not add a second handler
    log = logging.getLogger("zchat.t")
    log.info("hidden")
    log.warning("slow client", extra={"user": "carol", "lag": "1 s"})
    err = capsys.readouterr().err
    assert err.count("slow client") == 1 and "hidden" not in err
    assert 'WARNING zchat.t: slow client user=carol lag="1 s"' in err


def test_logging_rejects_bad_values(clean_root):
    with pytest.raises(ConfigError):
        setup_logging("LOUD", "text")
    with pytest.raises(ConfigError):
        setup_logging("INFO", "xml")


def test_rate_zero_means_no_limit_but_negative_is_refused() -> None:
    settings, _ = load_settings({"rate": 0}, env={})
    assert settings.rate == 0.0
    with pytest.raises(ConfigError, match=r"'rate'.*0 \(no limit\)"):
        load_settings({"rate": -1}, env={})
