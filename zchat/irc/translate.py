"""zchat messages into IRC lines: sources, server-time and msgid tags, CTCP ACTION,
and splitting text that IRC cannot carry in one line.

Plain functions of plain values: the gateway decides what to show, these say how.
"""

from __future__ import annotations

import datetime

from zchat.irc.lines import MAX_LINE, Line

ACTION_START, ACTION_END = "\x01ACTION ", "\x01"


def hostmask(name: str) -> str:
    """The IRC source for a zchat name: nick, user and host are all it."""
    return f"{name}!{name}@zchat"


def server_time(ts: float) -> str:
    """IRCv3 server-time: UTC, milliseconds, 'Z'."""
    when = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def msgid(seq: int, ident: str) -> str:
    """The IRC msgid of a stored line: its seq (what CHATHISTORY needs: zchat history is
    by seq) and the broker's message id (unique across rooms)."""
    return f"{seq}.{ident}"


def tags_for(caps: set[str], ts: float, msgid: str = "", batch: str = "") -> tuple[tuple[str, str], ...]:
    """The tags a client that negotiated ``caps`` may receive."""
    tags: list[tuple[str, str]] = []
    if batch and "batch" in caps:
        tags.append(("batch", batch))
    if "server-time" in caps:
        tags.append(("time", server_time(ts)))
    if msgid and "message-tags" in caps:
        tags.append(("msgid", msgid))
    return tuple(tags)


def split_text(text: str, budget: int) -> list[str]:
    """``text`` as pieces of at most ``budget`` UTF-8 bytes: a line per line of the
    text (IRC has no newline), long lines cut at the last space that fits, else
    between characters (never inside one). Empty lines are dropped."""
    budget = max(budget, 4)  # one UTF-8 character always fits
    pieces: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "").split("\n"):
        while line:
            raw = line.encode("utf-8")
            if len(raw) <= budget:
                pieces.append(line)
                break
            cut = budget
            while cut > 0 and (raw[cut] & 0xC0) == 0x80:  # not inside a character
                cut -= 1
            space = raw.rfind(b" ", 0, cut + 1)
            if space > budget // 2:
                cut = space
            pieces.append(raw[:cut].decode("utf-8"))
            line = raw[cut:].decode("utf-8").lstrip(" ")
    return [piece for piece in pieces if piece.strip()]


def chat_lines(
    source: str, target: str, text: str, *, me: bool = False, command: str = "PRIVMSG", tags: tuple[tuple[str, str], ...] = (),
) -> list[Line]:
    """PRIVMSG (or NOTICE) lines carrying ``text``, each body within MAX_LINE bytes."""
    wrap = len(ACTION_START) + len(ACTION_END) if me else 0
    overhead = len(f":{source} {command} {target} :\r\n".encode()) + wrap
    out: list[Line] = []
    for piece in split_text(text, MAX_LINE - overhead):
        body = f"{ACTION_START}{piece}{ACTION_END}" if me else piece
        out.append(Line(command, (target, body), source, tags))
    return out


def names_lines(server: str, me: str, channel: str, nicks: list[str]) -> list[Line]:
    """353 lines (as many as the 512-byte limit needs) and the closing 366."""
    overhead = len(f":{server} 353 {me} = {channel} :\r\n".encode())
    out: list[Line] = []
    batch: list[str] = []
    size = 0
    for nick in nicks:
        if batch and size + len(nick) + 1 > MAX_LINE - overhead:
            out.append(Line("353", (me, "=", channel, " ".join(batch)), server))
            batch, size = [], 0
        batch.append(nick)
        size += len(nick) + 1
    if batch:
        out.append(Line("353", (me, "=", channel, " ".join(batch)), server))
    out.append(Line("366", (me, channel, "End of /NAMES list"), server))
    return out
