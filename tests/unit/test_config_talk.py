"""talk's settings: switches from the TOML file and ZCHAT_* (true/false and friends), the
notification method checked, and talk handing them to the app."""

from __future__ import annotations

from pathlib import Path

import pytest

from zchat import config as cfg


def test_talk_switches_from_file_env_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('talk-bell = false\ntalk-notify = "osc9"\n')
    s, sources = cfg.load_settings({}, path, env={"ZCHAT_TALK_DESKTOP": "off", "ZCHAT_TALK_REMEMBER": "yes"})
    assert (s.talk_bell, s.talk_desktop, s.talk_remember, s.talk_notify) == (False, False, True, "osc9")
    assert sources["talk_bell"].startswith("file") and sources["talk_desktop"] == "env ZCHAT_TALK_DESKTOP"
    assert cfg.load_settings({}, None, env={"ZCHAT_CONFIG_DIR": str(tmp_path / "none")})[0].talk_bell is True  # default


@pytest.mark.parametrize("text, env", [('talk-bell = "loud"\n', {}), ('talk-bell = 1\n', {}), ("", {"ZCHAT_TALK_BELL": "maybe"}),
                                       ('talk-notify = "smoke"\n', {})])
def test_bad_talk_values_are_clear_errors(tmp_path: Path, text: str, env: dict[str, str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(cfg.ConfigError, match="talk_"):
        cfg.load_settings({}, path, env=env)


def test_talk_hands_the_settings_to_the_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zchat.cli import talk_cmd
    from zchat.tui.app import ChatApp

    made: list[ChatApp] = []
    monkeypatch.setattr(ChatApp, "run", lambda self: made.append(self))
    monkeypatch.setenv("ZCHAT_DATA_DIR", str(tmp_path / "data"))
    s = cfg.Settings(name="carol", talk_bell=False, talk_notify="osc9")
    talk_cmd._full_screen(s, "carol", ["general"], 10)
    app = made[0]
    assert app.cursor_file is not None and app.cursor_file.path.is_relative_to(tmp_path / "data" / "cursors")
    assert not app.notifier.settings.bell and app.notifier.method == "osc9"
    talk_cmd._full_screen(cfg.Settings(name="carol", talk_remember=False), "carol", ["general"], 10)
    assert made[1].cursor_file is None
