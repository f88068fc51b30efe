"""The broker's fixed names and bounds: the ZAP endpoint and domain, the requests the
edge (not the core) answers, and the bounds of one turn and one publication."""

from __future__ import annotations

from zchat import protocol as p

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"zchat"
EDGE_REQUESTS = (p.Claim, p.Invite, p.KeyAdd, p.KeyRevoke, p.KeyList)
BATCH = 128  # most messages taken from one socket per loop turn: bounds a turn, so the wait of everyone else
#: A Batch publication grows to about this many bytes at most (text counted as bytes
#: per character: a bound, not a measure): 256 KiB, so the per-subscriber queue of
#: pub_hwm publications holds at most pub_hwm * 320 KiB or so.
MAX_PUBLICATION_BYTES = 256 * 1024
