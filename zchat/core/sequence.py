"""Sequence numbers, message ids and dedup, sans I/O: the (user, cid) windows that make
a resend land once, and ``undo`` for a batch storage refused."""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Iterable

import msgspec

from zchat import protocol as p
from zchat.core.outcome import HistoryQuery, Outcome
from zchat.protocol import ErrorCode as E

log = logging.getLogger(__package__)  # the core's one logger: "zchat.core"

_HEX2 = [f"{i:02x}" for i in range(256)]  # the last two hex digits of a message id


def _ack(acks: dict[str, list[p.Stored]], sid: str, stored: p.Stored) -> None:
    """Append to ``acks[sid]`` without building a throwaway list as setdefault would."""
    items = acks.get(sid)
    if items is None:
        acks[sid] = [stored]
    else:
        items.append(stored)


class _Entry(msgspec.Struct, gc=False):
    """One remembered cid: when (monotonic), whose, its Stored, and whether it is gone.

    Held in its user's window and in Dedup.order at once; an entry its user's cap or a
    forget removed is only marked dead there, and skipped or compacted away later.
    Never tracked by the garbage collector (it holds only strings, a float, a bool and
    an untracked Stored): 100,000 tracked tuples made collections cost Core.send more
    than a microsecond a line.
    """

    now: float
    user: str
    stored: p.Stored
    dead: bool = False


class RecentCids(dict):  # type: ignore[type-arg]
    """One user's remembered cid -> Stored, with its entries oldest first in ``order``.

    A plain dict plus a deque beside it: ``popleft`` finds the oldest cheaply, whereas
    ``del d[next(iter(d))]`` on a full dict gets slower and slower (each call walks over
    the dead slots earlier deletions left at its front: ~4 us a line at 10,000 cids),
    and an OrderedDict costs about twice as much per insert and eviction.
    """

    __slots__ = ("order", "user")

    def __init__(self, user: str = "") -> None:
        super().__init__()
        self.order: deque[_Entry] = deque()
        self.user = user

    def drop(self, cid: str) -> None:
        """Forget ``cid`` (remembered) and mark its entry dead: from the front of
        ``order`` if it is the oldest, else from the back (a batch storage refused holds
        the newest)."""
        del self[cid]
        order = self.order
        if order[0].stored.cid == cid:
            order.popleft().dead = True
            return
        for i in range(len(order) - 1, -1, -1):
            entry = order[i]
            if entry.stored.cid == cid:
                entry.dead = True
                del order[i]
                return


class Dedup:
    """Remembered (user, cid) -> Stored: at most ``per_user`` per user, ``total`` in all,
    and entries older than ``window`` seconds go at the next ticks; oldest first.

    Per user so that a chatty user cannot push a quiet user's cids out before the
    quiet user's client had a chance to resend; in total so that many throwaway names
    cannot each keep a full window. ``order`` holds every entry, oldest first; the dead
    ones (``stale`` of them) do not count against ``total`` and are compacted away once
    they are most of it, so each entry is copied O(1) times on average.
    """

    def __init__(self, per_user: int = 1_000, total: int = 100_000, window: float = 900.0) -> None:
        self.per_user = per_user
        self.total = total
        self.window = window
        self.by_user: dict[str, RecentCids] = {}
        self.order: deque[_Entry] = deque()
        self.stale = 0
        # Core.send calls trim once ``order`` is longer than this: total + stale as of
        # the last trim, so live entries never exceed total (stale ones only grow).
        self.high = total

    def get(self, key: tuple[str, str]) -> p.Stored | None:
        cids = self.by_user.get(key[0])
        return None if cids is None else cids.get(key[1])

    def of(self, user: str) -> RecentCids:
        cids = self.by_user.get(user)
        if cids is None:
            cids = self.by_user[user] = RecentCids(user)
        return cids

    def add(self, user: str, stored: p.Stored, now: float) -> None:
        """Remember ``stored`` as of monotonic time ``now`` (Core.send inlines this)."""
        cids = self.of(user)
        cid = stored.cid
        if cid in cids:  # seen again (only the warm-up can do this): now the newest
            cids.drop(cid)
            self.stale += 1
        entry = _Entry(now, user, stored)
        cids[cid] = stored
        order = cids.order
        order.append(entry)
        if len(order) > self.per_user:
            old = order.popleft()
            del cids[old.stored.cid]
            old.dead = True
            self.stale += 1
        self.order.append(entry)
        if len(self.order) > self.high:
            self.trim()

    def trim(self) -> None:
        """Hold live entries to ``total`` (oldest go first); compact ``order`` once most
        of it is dead."""
        order = self.order
        if self.stale > len(order) // 2:
            self.order = order = deque([entry for entry in order if not entry.dead])
            self.stale = 0
        while len(order) - self.stale > self.total:
            self.evict_oldest()
        self.high = self.total + self.stale

    def evict_oldest(self) -> None:
        """Drop the front of ``order``, and forget its cid if it is still remembered."""
        entry = self.order.popleft()
        if entry.dead:
            self.stale -= 1
            return
        cids = self.by_user[entry.user]
        del cids[entry.stored.cid]
        entry.dead = True
        order = cids.order
        if order[0] is entry:  # the oldest of its user too, but for warm-up re-adds
            order.popleft()
        else:
            for i, known in enumerate(order):
                if known is entry:
                    del order[i]
                    break

    def expire(self, now: float, budget: int) -> int:
        """Drop entries older than the window, looking at most at ``budget``; return how
        many were looked at."""
        order = self.order
        deadline = now - self.window
        done = 0
        while order and done < budget and order[0].now < deadline:
            self.evict_oldest()
            done += 1
        return done

    def forget(self, user: str, cid: str, id: str = "") -> bool:
        """Forget ``user``'s ``cid`` (only if it names message ``id``, when given)."""
        cids = self.by_user.get(user)
        if cids is None:
            return False
        stored = cids.get(cid)
        if stored is None or (id and stored.id != id):
            return False
        cids.drop(cid)
        self.stale += 1
        return True

    def __contains__(self, key: tuple[str, str]) -> bool:
        return self.get(key) is not None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return ((user, entry.stored.cid) for user, cids in self.by_user.items() for entry in cids.order)

    def __len__(self) -> int:
        return sum(len(cids) for cids in self.by_user.values())


class Sequencing:
    """Core's seqs and ids, and putting them back when storage refuses a batch. Mixed
    into ``Core``; reads its ``heads``, ``counter``, ``dedup`` and member indexes."""

    # ------------------------------------------------------------ seqs and ids

    def _id(self, counter: int) -> str:
        """``f"{id_prefix}{counter:x}"``, made faster: the prefix and all but the last two
        hex digits are formatted once per block of 256 ids (send inlines the fast case)."""
        high = counter >> 8
        if high != self._id_high:
            if not high:  # below 0x100 the last two digits are not zero-padded
                return f"{self._id_prefix}{counter:x}"
            self._id_high = high
            self._id_base = f"{self._id_prefix}{high:x}"
        return self._id_base + _HEX2[counter & 0xFF]

    @property
    def id_prefix(self) -> str:
        return self._id_prefix

    @id_prefix.setter
    def id_prefix(self, prefix: str) -> None:
        self._id_prefix = prefix
        self._id_high = -1  # no block formatted yet
        self._id_base = ""

    def _sequence(
        self, room: str, sender: str, text: str, kind: p.MsgKind, to: str, cid: str, now: float, out: Outcome, *topics: bytes,
        ref: int = 0,
    ) -> p.Stored:
        seq = self.heads.get(room, 0) + 1
        self.heads[room] = seq
        self.counter += 1
        ts = now + self.wall_offset
        msg = p.Msg(
            room=room, seq=seq, id=self._id(self.counter), ts=ts, sender=sender,
            text=text, kind=kind, to=to, cid=cid, epoch=self.epoch, ref=ref,
        )
        out.store.append(msg)
        for topic in topics:
            out.publish.append((topic, msg))
        stored = p.Stored(cid, room, seq, msg.id, ts)
        if cid:
            self.dedup.add(sender, stored, now)
        return stored

    # ------------------------------------------------------------ storage failures

    def undo(self, out: Outcome, code: str = E.INTERNAL) -> None:
        """Storage refused ``out.store``: put the core back as if none of it had been
        sequenced, and rewrite ``out`` so the shell carries out only the rest.

        Each room's head returns to its lowest failed seq - 1: nothing of the batch was
        stored or published, and the heads in this outcome's replies (Pong, Welcome,
        Joined, history queries) are lowered to match, so no client ever learns of those
        seqs and the next message may take them. Their cids are forgotten, so a resend
        is stored. Membership changes of ``out.members`` are reverted, newest first (a
        DM's first line made its conversation's members). Then ``out`` keeps no store,
        no member changes and no publication of those messages; their acks become
        errors, and so do the replies to the joins and parts that were undone. Tokens
        spent stay spent; cids the caps evicted for the batch stay evicted (they were
        the oldest). The errors carry ``code`` (``storage_unavailable`` when the store
        cannot take writes now, so clients know to resend later).
        """
        failed = out.store
        lowest: dict[str, int] = {}
        for msg in failed:
            if msg.seq < lowest.get(msg.room, msg.seq + 1):
                lowest[msg.room] = msg.seq
            if msg.cid:
                self.dedup.forget(msg.sender, msg.cid, msg.id)
        for room, seq in lowest.items():
            if seq > 1:
                self.heads[room] = seq - 1
            else:
                self.heads.pop(room, None)
        for room, name, member in reversed(out.members):
            self._apply_member(room, name, not member)
        for room, role, value, on in reversed(out.room_changes):
            self._apply_role(room, role, value, not on)
        if failed or out.members:
            self.count("undone_batches")
            log.debug("undid %d message(s) and %d membership change(s)", len(failed), len(out.members))
        ids = {msg.id for msg in failed}
        out.store = []
        out.members = []
        self.users.update(out.released)  # a release undone: the name is still claimed
        out.room_changes, out.tombstones, out.cut, out.released, out.edits = [], [], [], [], []
        out.publish = [(t, m) for t, m in out.publish if not (type(m) is p.Msg and m.id in ids)]
        if lowest:
            self._lower_heads(out, lowest)
        for i in out.changed:
            sid, body = out.replies[i]
            out.replies[i] = (sid, p.Error(code=code, message="could not store that change; try again", rid=body.rid))  # type: ignore[union-attr]
        out.changed = []
        acks: dict[str, list[p.Stored]] = {}
        for sid, items in out.acks.items():
            kept = []
            for item in items:
                if item.id in ids:
                    out.error(sid, code, "could not store the message; resend it", cid=item.cid)
                else:
                    kept.append(item)
            if kept:
                acks[sid] = kept
        out.acks = acks

    # ------------------------------------------------------------ several brokers

    def renumber(self, out: Outcome, given: dict[str, tuple[int, str | None, float]], heads: dict[str, int]) -> None:
        """The shared store sequenced ``out.store`` (several brokers: its script gave the
        seqs, the core's were only placeholders): ``given`` maps each message id to its
        seq, and for a (sender, cid) the store already held, to the first message's id
        and ts (None: stored now). Rewrite ``out`` to match before anything is carried
        out: stored messages take their seqs (in store, publish and acks); a duplicate is
        neither stored nor published and its sender gets the first Stored again (dedup
        across brokers); the rooms' heads become the store's (``heads``), also in this
        outcome's replies."""
        renamed: dict[str, p.Msg | None] = {}
        acked: dict[str, p.Stored] = {}
        store = []
        before: dict[str, int] = {}  # room -> the core's head before this turn's placeholders
        for msg in out.store:
            if msg.seq <= before.get(msg.room, msg.seq):
                before[msg.room] = msg.seq - 1
            seq, first_id, first_ts = given[msg.id]
            if first_id is None:
                new = msgspec.structs.replace(msg, seq=seq)
                store.append(new)
                renamed[msg.id] = new
                stored = p.Stored(msg.cid, msg.room, seq, msg.id, msg.ts)
            else:
                renamed[msg.id] = None
                stored = p.Stored(msg.cid, msg.room, seq, first_id, first_ts)
                self.count("duplicate_elsewhere")
            acked[msg.id] = stored
            if msg.cid:
                cids = self.dedup.by_user.get(msg.sender)
                if cids is not None and msg.cid in cids:
                    cids[msg.cid] = stored
        out.store = store
        out.publish = [
            (t, renamed[m.id]) if type(m) is p.Msg and m.id in renamed else (t, m)  # type: ignore[misc]
            for t, m in out.publish if not (type(m) is p.Msg and m.id in renamed and renamed[m.id] is None)
        ]
        for items in out.acks.values():
            for i, item in enumerate(items):
                if item.id in acked:
                    items[i] = acked[item.id]
        # The store's head is the real one: placeholders past it were never given out (a
        # duplicate takes no seq), and a head left on one would be a seq no reader can
        # ever fetch. What the core saw before this turn is real too (it came from the store).
        for room, head in heads.items():
            self.heads[room] = max(head, before.get(room, self.heads.get(room, 0)))
        self._retell_heads(out, heads, lambda told, real: real)

    def member_elsewhere(self, room: str, name: str, member: bool) -> bool:
        """Another broker changed ``room``'s membership (several brokers); whether that
        changed anything here."""
        if (name in self.members.get(room, ())) == member:
            return False
        self._apply_member(room, name, member)
        if member:
            self.add_user(name)
        return True

    def saw(self, room: str, seq: int) -> None:
        """Another broker stored ``seq`` in ``room`` (several brokers): the head follows."""
        if seq > self.heads.get(room, 0):
            self.heads[room] = seq

    def _lower_heads(self, out: Outcome, rooms: Iterable[str]) -> None:
        """Lower the heads this outcome's replies tell for ``rooms`` to the core's own."""
        self._retell_heads(out, rooms, min)

    def _retell_heads(self, out: Outcome, rooms: Iterable[str], pick) -> None:  # type: ignore[no-untyped-def]
        """The heads this outcome's replies tell for ``rooms``, made ``pick`` (min or max)
        of what they told and the core's own."""
        heads = self.heads
        undone = set(rooms)

        def fix(told: dict[str, int]) -> dict[str, int]:
            return {room: pick(seq, heads.get(room, 0)) if room in undone else seq for room, seq in told.items()}

        for i, (sid, body) in enumerate(out.replies):
            if type(body) is p.Pong:
                out.replies[i] = (sid, msgspec.structs.replace(body, heads=fix(body.heads)))
            elif type(body) is p.Welcome:
                out.replies[i] = (sid, msgspec.structs.replace(body, rooms=fix(body.rooms)))
            elif type(body) is p.Joined and body.room in undone:
                out.replies[i] = (sid, msgspec.structs.replace(body, head=pick(body.head, heads.get(body.room, 0))))
        out.queries = [
            dataclasses.replace(q, head=pick(q.head, heads.get(q.request.room, 0)))
            if isinstance(q, HistoryQuery) and q.request.room in undone else q
            for q in out.queries
        ]

    def forget(self, failed: Iterable[p.Msg]) -> None:
        """Storage refused a batch: forget its cids so resends are taken afresh (the old
        way, until the shell calls undo). Heads stay where they are."""
        for msg in failed:
            if msg.cid:
                self.dedup.forget(msg.sender, msg.cid, msg.id)
