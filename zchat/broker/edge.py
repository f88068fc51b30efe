"""Requests the edge answers, not the core: claims, invites and keys (add, revoke,
list), with the connections seen per key so a revoked key can be cut."""

from __future__ import annotations

import collections
import logging
import math
import time
from typing import Any

import zmq
from zmq.utils import z85

from zchat import auth, keys
from zchat import protocol as p
from zchat.core import Outcome
from zchat.guard import cut_connection, peer_name
from zchat.storage import StorageUnavailable

log = logging.getLogger(__package__)  # one logger for the whole broker: "zchat.broker"

#: Refusals counted against a user (guard.Refusals): what the user did, not the broker's
#: state (no_session after a restart, shutting_down, internal, storage_unavailable).
COUNTED_REFUSALS = frozenset({
    p.ErrorCode.RATE_LIMITED, p.ErrorCode.LIMIT_REACHED, p.ErrorCode.BAD_REQUEST, p.ErrorCode.BAD_VERSION,
    p.ErrorCode.BAD_ENCODING, p.ErrorCode.BAD_FRAME, p.ErrorCode.TOO_LARGE, p.ErrorCode.FORBIDDEN,
})


class Edge:
    """Edge requests (a mixin of Broker): names and keys live here, not in the core."""

    def _note_connection(self, label: str, frame: zmq.Frame) -> None:
        """Remember which TCP connection a key's hello or subscription came on, so that
        revoking the key can cut it (a few per key; its peer's port tells a reused
        descriptor from the connection itself)."""
        try:
            key_text, fd = frame.get("X-Key"), frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return
        if not key_text or fd < 0:
            return
        key = z85.decode(key_text)
        if key not in self.key_names:
            return
        conns = self.key_conns.setdefault(key, collections.deque(maxlen=16))
        entry = (label, fd, peer_name(fd))
        if entry not in conns:
            conns.append(entry)

    def _edge_request(self, sid: str, frame: zmq.Frame, req: Any, now: float, out: Outcome) -> None:
        """Claim, Invite, KeyAdd, KeyRevoke, KeyList: keys and names. Claim and KeyList
        are answered at once; the others once stored (queued for _serve_edge)."""
        if type(req) is p.Claim:
            self._claim(sid, frame, req, now, out)
            return
        try:
            user, key_text = frame.get("User-Id"), frame.get("X-Key")
        except zmq.ZMQError:
            return
        if self.insecure_plaintext or not key_text or user == p.LOOKER:
            out.error(sid, p.ErrorCode.FORBIDDEN, "keys and invites need a named CURVE session", rid=req.rid)
            return
        me = z85.decode(key_text)
        if type(req) is p.KeyList:
            mine = self.name_keys.get(user, [])
            out.replies.append((sid, p.KeysReply(rid=req.rid, keys=[z85.encode(k).decode() for k in mine])))
            return
        self.edge_queue.append((sid, req, user, me))  # answered once stored (_serve_edge, this turn)

    async def _serve_edge(self, now: float, out: Outcome) -> None:
        """Invite, KeyAdd, KeyRevoke: in effect in memory at once, stored before the
        ``ok`` (a broker stopped right after still knows them); storing that fails is
        answered storage_unavailable (a revocation still holds in memory)."""
        queue, self.edge_queue = self.edge_queue, []
        for sid, req, user, me in queue:
            try:
                await self._edge_write(sid, req, user, me, now, out)
            except Exception as exc:
                log.error("storing a %s of %s failed: %r", type(req).__name__, user, exc)
                code = p.ErrorCode.STORAGE_UNAVAILABLE if isinstance(exc, StorageUnavailable) else p.ErrorCode.INTERNAL
                out.error(sid, code, "could not store that change; try again", rid=req.rid)

    async def _edge_write(self, sid: str, req: Any, user: str, me: bytes, now: float, out: Outcome) -> None:
        kind = type(req)
        if kind is p.Invite:
            if not auth.is_admin(user, me, self.admins):
                out.error(sid, p.ErrorCode.FORBIDDEN, "only the broker's admins make invite codes", rid=req.rid)
                return
            code = auth.new_invite_code()
            wall = time.time()
            if not await self.storage.add_invite(code, wall + auth.INVITE_TTL, wall, auth.MAX_INVITES):
                out.error(sid, p.ErrorCode.LIMIT_REACHED, f"{auth.MAX_INVITES} unused invite codes already", rid=req.rid)
                return
            log.info("%s made an invite code", user)
            out.replies.append((sid, p.Invited(rid=req.rid, code=code)))
            return
        mine = self.name_keys.setdefault(user, [])
        if not keys.valid_key(req.key):
            out.error(sid, p.ErrorCode.BAD_REQUEST, "expected a 40-character Z85 public key", rid=req.rid)
            return
        other = z85.decode(req.key)
        if kind is p.KeyAdd:
            if other in self.key_names:
                out.error(sid, p.ErrorCode.BAD_REQUEST, "that key owns a name already", rid=req.rid)
                return
            if len(mine) >= auth.MAX_DEVICES:
                out.error(sid, p.ErrorCode.LIMIT_REACHED, f"a name has at most {auth.MAX_DEVICES} keys", rid=req.rid)
                return
            if other in self.revoked:  # authorised again: forgotten first, then listed
                self.revoked.discard(other)
                self.barred.pop(req.key, None)
                await self.storage.set_revoked(other, False, time.time(), auth.MAX_REVOKED)
            mine.append(other)
            self.key_names[other] = user
            log.info("%s authorised key %s", user, keys.fingerprint(req.key))
        else:  # KeyRevoke
            if other not in mine:
                out.error(sid, p.ErrorCode.BAD_REQUEST, "that key is not one of this name's", rid=req.rid)
                return
            if len(mine) == 1:
                out.error(sid, p.ErrorCode.BAD_REQUEST, "that is the name's last key", rid=req.rid)
                return
            mine.remove(other)
            del self.key_names[other]
            self.revoked.add(other)
            if len(self.revoked) > auth.MAX_REVOKED:  # storage keeps the newest; so do we, roughly
                self.revoked.discard(next(iter(self.revoked - {other})))
            cut = self._cut_key(other, math.inf)
            log.info("%s revoked key %s (%d live connection(s) cut)", user, keys.fingerprint(req.key), cut)
            await self.storage.set_revoked(other, True, time.time(), auth.MAX_REVOKED)  # before the list: it wins at ZAP
        self.key_writes.add(user)
        await self._store_keys()
        out.replies.append((sid, p.Ok(rid=req.rid)))

    # ------------------------------------------------ cutting a key's connections

    def _cut_key(self, key: bytes, until: float = 0.0) -> int:
        """Cut the connections ``key`` said hello, subscribed or pushed on, now; with
        ``until`` (a revoked key: math.inf, for this run; a cool-off's end) any other of
        its connections too, at its next frame. Without it (a ban, which an unban lifts)
        only those seen. Returns how many were cut now."""
        if until > 0:
            if len(self.barred) >= auth.MAX_REVOKED:
                now = time.monotonic()
                self.barred = {k: t for k, t in self.barred.items() if t > now}
            self.barred[z85.encode(key).decode()] = until
        cut = 0
        for _label, fd, peer in self.key_conns.pop(key, ()):
            if peer is not None and peer_name(fd) == peer:
                cut_connection(fd)
                cut += 1
        return cut

    def _barred(self, frame: zmq.Frame, now: float) -> bool:
        """Whether ``frame`` came from a revoked or cooling-off key (then its connection
        is cut and the frame dropped)."""
        try:
            key_text = frame.get("X-Key")
        except zmq.ZMQError:
            return False
        until = self.barred.get(key_text)
        if until is None:
            return False
        if until <= now:
            del self.barred[key_text]
            return False
        try:
            cut_connection(frame.get(zmq.SRCFD))
        except zmq.ZMQError:
            pass
        self.core.count("barred_frames")  # type: ignore[union-attr]
        return True

    def _pulled(self, frame: zmq.Frame, now: float) -> bool:
        """A PULL frame may be taken (False: a barred key's, dropped and cut). Its
        connection is noted once per descriptor, so a cut reaches the PUSH too."""
        if self.barred and self._barred(frame, now):
            return False
        try:
            fd, key_text = frame.get(zmq.SRCFD), frame.get("X-Key")
        except zmq.ZMQError:
            return True
        if self.pull_fds.get(fd) != key_text:
            self.pull_fds[fd] = key_text
            self._note_connection("chat", frame)
        return True

    def _refused(self, sid: str, err: p.Error, now: float, weight: float = 1.0) -> None:
        """Count a refusal sent to ``sid``'s user, weighing ``weight`` (a refused big line:
        its tokens); one that keeps ignoring retry_after past the limit is cut: every
        connection of its keys, and its keys refused at ZAP for the cool-off (logged once)."""
        session = self.core.sessions.get(sid)  # type: ignore[union-attr]
        if session is None or session.name == p.LOOKER:  # look-only sessions share one budget
            return
        name = session.name
        if not self.refusals.refused(name, now, err.retry_after, weight):
            return
        cooloff = self.refusals.cooloff
        cut = sum(self._cut_key(key, now + cooloff) for key in self.name_keys.get(name, ()))
        log.warning(
            "%r ignores retry_after: refusals weighing %d (a line: a token per started 4 KiB) within %.0fs; %d connection(s) cut, its keys refused for %.0fs",
            name, self.refusals.limit, self.refusals.window, cut, cooloff,
        )

    async def _store_keys(self) -> None:
        """Store the key lists of names changed by KeyAdd/KeyRevoke (before the ok; a
        list that failed to store is tried again once a tick)."""
        for name in list(self.key_writes):
            stored = await self.storage.get_user(name)
            self.key_writes.discard(name)
            wanted = auth.key_digest(self.name_keys.get(name, []))
            if stored == wanted:
                continue
            if stored is None or not await self.storage.release_user(name, stored) or not await self.storage.add_user(name, wanted):
                log.warning("could not store the keys of %r", name)

    def _claim(self, sid: str, frame: zmq.Frame, req: p.Claim, now: float, out: Outcome) -> None:
        """A look-only connection asks that its key own ``req.name``: remember that
        (bounded, for claim_timeout) and say ok; the client dials again and the ZAP
        handler decides (_finish_claim). Nothing is stored here."""
        try:
            user, key_text = frame.get("User-Id"), frame.get("X-Key")
        except zmq.ZMQError:
            user, key_text = "", ""
        if user != p.LOOKER or not key_text:
            out.error(sid, p.ErrorCode.BAD_REQUEST, "this connection owns a name already", rid=req.rid)
            return
        if not p.valid_name(req.name):
            out.error(sid, p.ErrorCode.BAD_NAME, f"bad name {req.name!r}: use a-z, 0-9, '_', '-' (max {p.MAX_NAME_LEN})", rid=req.rid)
            return
        if not self.intents.add(z85.decode(key_text), req, now + self.claims.timeout):
            out.error(sid, p.ErrorCode.LIMIT_REACHED, "too many claims in progress: try again shortly", rid=req.rid, retry_after=1.0)
            return
        out.replies.append((sid, p.Ok(rid=req.rid)))
