"""Requests the edge answers, not the core: claims, invites and keys (add, revoke,
list), with the connections seen per key so a revoked key can be cut."""

from __future__ import annotations

import collections
import logging
from typing import Any

import zmq
from zmq.utils import z85

from zchat import auth, keys
from zchat import protocol as p
from zchat.core import Outcome
from zchat.guard import cut_connection, peer_name

log = logging.getLogger(__package__)  # one logger for the whole broker: "zchat.broker"


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

    def _cut_key(self, key: bytes) -> int:
        """Cut the live connections seen for ``key`` (revoked, or its name banned); how many."""
        cut = 0
        for _label, fd, peer in self.key_conns.pop(key, ()):
            if peer is not None and peer_name(fd) == peer:
                cut_connection(fd)
                cut += 1
        return cut

    def _edge_request(self, sid: str, frame: zmq.Frame, req: Any, now: float, out: Outcome) -> None:
        """Claim, Invite, KeyAdd, KeyRevoke, KeyList: keys and names, answered at once
        from memory (a change of keys is stored at the next tick, see _store_keys)."""
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
        kind = type(req)
        if kind is p.Invite:
            if not auth.is_admin(user, me, self.admins):
                out.error(sid, p.ErrorCode.FORBIDDEN, "only the broker's admins make invite codes", rid=req.rid)
                return
            code = self.invites.make(now)
            if code is None:
                out.error(sid, p.ErrorCode.LIMIT_REACHED, f"{self.invites.limit} unused invite codes already", rid=req.rid)
                return
            log.info("%s made an invite code", user)
            out.replies.append((sid, p.Invited(rid=req.rid, code=code)))
            return
        mine = self.name_keys.setdefault(user, [])
        if kind is p.KeyList:
            out.replies.append((sid, p.KeysReply(rid=req.rid, keys=[z85.encode(k).decode() for k in mine])))
            return
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
            self.revoked.discard(other)
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
            if len(self.revoked) < auth.MAX_REVOKED:
                self.revoked.add(other)
            cut = self._cut_key(other)
            log.info("%s revoked key %s (%d live connection(s) cut)", user, keys.fingerprint(req.key), cut)
        self.key_writes.add(user)
        out.replies.append((sid, p.Ok(rid=req.rid)))

    async def _store_keys(self) -> None:
        """Store the key lists of names changed by KeyAdd/KeyRevoke (once a tick)."""
        for name in list(self.key_writes):
            self.key_writes.discard(name)
            stored = await self.storage.get_user(name)
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
