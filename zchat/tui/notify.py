"""Telling the user that someone needs them: a mention of their name or a direct
message, while they may be looking elsewhere.

Three ways, each switchable: the terminal bell; a desktop notification through the
terminal (OSC 777, which rxvt, foot, kitty and others show; or OSC 9, iTerm2's and
Windows Terminal's); or ``notify-send`` where it is installed. Chat text never reaches
the terminal raw: control characters are removed first (a line carrying ESC or BEL
could otherwise end the sequence and drive the terminal). At most one notification
per ``min_gap`` seconds: a busy room rings once, not a line at a time.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from collections.abc import Callable

from zchat import protocol as p

METHODS = ("auto", "osc777", "osc9", "notify-send", "none")
#: Characters of a message a notification shows at most.
MAX_BODY = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclasses.dataclass(frozen=True)
class NotifySettings:
    """``bell``: ring on a mention or DM; ``desktop``: a desktop notification, by
    ``method`` (``auto``: notify-send if installed, else OSC 777)."""

    bell: bool = True
    desktop: bool = True
    method: str = "auto"
    min_gap: float = 2.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"notification method {self.method!r}: use one of {', '.join(METHODS)}")


def mentions(text: str, name: str) -> bool:
    """``name`` (or ``@name``) as a word of ``text``, in any case."""
    return re.search(rf"(?<![\w-])@?{re.escape(name)}(?![\w-])", text, re.IGNORECASE) is not None


def clean(text: str, limit: int = MAX_BODY) -> str:
    """``text`` safe inside a terminal escape sequence: no control characters, no ';'
    (OSC 777's separator), cut to ``limit`` characters."""
    flat = _CONTROL.sub(" ", text).replace(";", ",")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class Notifier:
    """Decides whether a line calls for the user and says so.

    ``write`` puts text on the terminal (the app's driver, or sys.stdout); ``run`` starts
    a program (``notify-send``) without waiting for it.
    """

    def __init__(
        self, me: str, settings: NotifySettings, write: Callable[[str], None], run: Callable[[list[str]], None] | None = None,
        clock: Callable[[], float] = time.monotonic, which: Callable[[str], str | None] = shutil.which,
    ) -> None:
        self.me = me
        self.settings = settings
        self.write = write
        self.run = run
        self.clock = clock
        self.method = settings.method
        if self.method == "auto":
            self.method = "notify-send" if run is not None and which("notify-send") else "osc777"
        self._last = float("-inf")
        self.sent = 0

    def wants(self, msg: p.Msg) -> bool:
        """A line from someone else that mentions us, or a DM to us."""
        if msg.sender == self.me or msg.kind not in ("text", "me"):
            return False
        return p.is_dm_room(msg.room) or mentions(msg.text, self.me)

    def on_msg(self, msg: p.Msg) -> list[str]:
        """Notify for ``msg`` if it calls for it; what was done ('bell', a method), for tests and logs."""
        if not self.wants(msg):
            return []
        now = self.clock()
        if now - self._last < self.settings.min_gap:
            return []
        self._last = now
        done: list[str] = []
        where = f"DM from {msg.sender}" if p.is_dm_room(msg.room) else f"{msg.sender} in #{msg.room}"
        title, body = clean(f"zchat: {where}", 80), clean(msg.text)
        if self.settings.bell:
            self.write("\a")
            done.append("bell")
        method = "osc777" if self.method == "notify-send" and self.run is None else self.method
        if self.settings.desktop and method != "none":
            if method == "notify-send" and self.run is not None:
                self.run(["notify-send", "--app-name=zchat", title, body])
            elif method == "osc9":
                self.write(f"\x1b]9;{title}: {body}\x1b\\")
            else:
                self.write(f"\x1b]777;notify;{title};{body}\x1b\\")
            done.append(method)
        self.sent += 1
        return done
