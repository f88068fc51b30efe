"""IRC lines as plain values: parse bytes into a Line, format a Line into bytes.

Sans-I/O (no socket, no clock), after h11: the splitter is fed bytes and hands back
whole lines, bounded in bytes, so a peer that never sends CRLF costs at most one
line's worth of memory. RFC 1459 / 2812 framing plus IRCv3 message tags.
"""

from __future__ import annotations

import dataclasses

#: The body of a line (everything but the tags), CRLF included (RFC 1459 §2.3).
MAX_LINE = 512
#: The tag section of a line, '@' and the trailing space included (IRCv3 message-tags).
MAX_TAGS = 8191
#: Most parameters a line may carry (RFC 2812 §2.3.1: 14 middle plus a trailing one).
MAX_PARAMS = 15

_ESCAPES = {";": "\\:", " ": "\\s", "\\": "\\\\", "\r": "\\r", "\n": "\\n"}
_UNESCAPES = {":": ";", "s": " ", "\\": "\\", "r": "\r", "n": "\n"}


class LineError(ValueError):
    """A line that cannot be read; ``reason`` is one of 'too_long', 'utf8', 'empty'."""

    def __init__(self, reason: str, message: str, command: str = "*") -> None:
        super().__init__(message)
        self.reason = reason
        self.command = command


@dataclasses.dataclass(frozen=True)
class Line:
    """One IRC message: ``command`` upper-cased, ``params`` with the trailing one last."""

    command: str
    params: tuple[str, ...] = ()
    source: str = ""
    tags: tuple[tuple[str, str], ...] = ()

    def tag(self, key: str) -> str | None:
        return dict(self.tags).get(key)


def escape_tag(value: str) -> str:
    return "".join(_ESCAPES.get(ch, ch) for ch in value)


def unescape_tag(value: str) -> str:
    out: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            out.append(_UNESCAPES.get(nxt, nxt))
        else:
            out.append(ch)
    return "".join(out)


def parse(raw: bytes) -> Line:
    """One line without its CRLF. Raises LineError for invalid UTF-8 or an empty line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LineError("utf8", "line is not valid UTF-8", _command_of(raw)) from None
    tags: list[tuple[str, str]] = []
    if text.startswith("@"):
        tag_text, _, text = text[1:].partition(" ")
        for item in tag_text.split(";"):
            if item:
                key, _, value = item.partition("=")
                tags.append((key, unescape_tag(value)))
    text = text.lstrip(" ")
    source = ""
    if text.startswith(":"):
        source, _, text = text[1:].partition(" ")
        text = text.lstrip(" ")
    trailing: str | None = None
    if " :" in text:
        text, trailing = text.split(" :", 1)
    elif text.startswith(":"):
        text, trailing = "", text[1:]
    words = text.split()
    if not words:
        raise LineError("empty", "no command")
    params = words[1:]
    if trailing is not None:
        params.append(trailing)
    if len(params) > MAX_PARAMS:  # RFC 2812: the rest belongs to the last parameter
        params = params[: MAX_PARAMS - 1] + [" ".join(params[MAX_PARAMS - 1 :])]
    return Line(words[0].upper(), tuple(params), source, tuple(tags))


def _command_of(raw: bytes) -> str:
    """The command word of an unreadable line, for the FAIL reply that names it."""
    words = raw.split(b" ")
    while words and (words[0].startswith((b"@", b":")) or not words[0]):
        words = words[1:]
    word = words[0].decode("ascii", "replace").upper() if words else "*"
    return word if word.isalnum() and len(word) <= 20 else "*"


def format_line(line: Line) -> bytes:
    """The wire form with CRLF. The last parameter is sent as a trailing one when it
    must be (empty, has a space, starts with ':'); CR, LF and NUL never reach the wire."""
    parts: list[str] = []
    if line.tags:
        parts.append("@" + ";".join(f"{k}={escape_tag(v)}" if v else k for k, v in line.tags))
    if line.source:
        parts.append(":" + line.source)
    parts.append(line.command)
    params = [_clean(p) for p in line.params]
    if params:
        last = params[-1]
        parts += params[:-1]
        parts.append(":" + last if (not last or " " in last or last.startswith(":")) else last)
    return (" ".join(parts) + "\r\n").encode("utf-8")


def _clean(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ").replace("\0", "")


def body_size(line: Line) -> int:
    """Bytes of the line without its tags, CRLF included: what MAX_LINE bounds."""
    return len(format_line(dataclasses.replace(line, tags=())))


class Splitter:
    """Cuts a byte stream into lines; every line (and the buffer) is bounded in bytes.

    A line whose body is longer than MAX_LINE (or whose tags are longer than MAX_TAGS)
    is dropped whole, up to its end, and reported once as ``too_long``: the buffer
    never holds more than one line's bound.
    """

    def __init__(self, max_line: int = MAX_LINE, max_tags: int = MAX_TAGS) -> None:
        self.max_line = max_line
        self.max_tags = max_tags
        self._buf = bytearray()
        self._skipping = False  # inside an over-long line: drop up to its LF

    def feed(self, data: bytes) -> list[bytes | LineError]:
        """Whole lines (without CR LF) and errors, in the order they came."""
        out: list[bytes | LineError] = []
        self._buf += data
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if not self._skipping and len(self._buf) > self.max_line + self.max_tags:
                    out.append(self._too_long(bytes(self._buf[:64])))
                    self._skipping = True
                if self._skipping:
                    self._buf.clear()
                return out
            raw = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if self._skipping:
                self._skipping = False
                continue
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            if not raw.strip(b" "):
                continue  # empty lines are ignored (RFC 2812 §2.3.1)
            tag_len = raw.find(b" ") + 1 if raw.startswith(b"@") else 0
            if tag_len > self.max_tags or len(raw) - tag_len + 2 > self.max_line:
                out.append(self._too_long(raw[tag_len : tag_len + 64]))
                continue
            out.append(raw)

    @staticmethod
    def _too_long(head: bytes) -> LineError:
        return LineError("too_long", "input line too long", _command_of(head))

    @property
    def buffered(self) -> int:
        return len(self._buf)
