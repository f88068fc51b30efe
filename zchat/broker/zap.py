"""The ZAP handler: every connection's credentials (CURVE keys, or PLAIN for tests)
decided here, including claims of new names and their expiry."""

from __future__ import annotations

import hmac
import logging
import time

import zmq
from zmq.utils import z85

from zchat import auth, keys
from zchat import protocol as p
from zchat.broker.constants import BATCH
from zchat.sockio import recv_parts
from zchat.storage import StorageError

log = logging.getLogger(__package__)  # one logger for the whole broker: "zchat.broker"


class Zap:
    """ZAP authentication (a mixin of Broker): who a connection is, from its key."""

    async def _expire_claims(self, now: float) -> None:
        """Free names claimed more than claim_timeout ago by a handshake that never said
        hello (call once a tick). A name whose owner said hello, joined or sent is kept."""
        core = self.core
        if core is None:
            return
        if self.key_writes:
            await self._store_keys()
        if self.barred and now >= self.barred_sweep:  # cool-offs over: frames need no look-up again
            self.barred = {k: t for k, t in self.barred.items() if t > now}
            self.barred_sweep = now + 10.0
        for name, digest in self.claims.due(now):
            if name in core.devices or name in core.rooms_of or name in core.dedup.by_user:
                continue
            try:
                released = await self.storage.release_user(name, digest)
            except StorageError as exc:
                log.warning("could not release the unused name %r: %s", name, exc)
                continue
            if released:
                core.release_user(name)
                if self.digests.get(name) == digest:
                    del self.digests[name]
                for key in self.name_keys.pop(name, []):  # a key's claim, released: the key owns nothing again
                    self.key_names.pop(key, None)
                log.info("name %r released: its handshake said no hello within %.0fs", name, self.claims.timeout)

    async def _zap(self) -> None:
        await self._expire_claims(time.monotonic())  # also done once a tick by run()
        for _ in range(BATCH):
            try:
                frames = recv_parts(self.zap)
            except zmq.Again:
                return
            version, request_id, _domain, address, _identity, mechanism, *creds = frames + [b""] * max(0, 6 - len(frames))
            try:
                verdict = await self._decide(mechanism, creds, address.decode(errors="replace"))
            except Exception:
                log.exception("ZAP decision failed")
                verdict = auth.Verdict(b"500", "internal error")
            self.zap.send_multipart([version, request_id, verdict.status, verdict.text.encode(), verdict.user_id.encode(), verdict.metadata])
            key = "accepted" if verdict.status == b"200" else "refused"
            self.stats.zap[key] = self.stats.zap.get(key, 0) + 1
            if key == "refused":
                self._zap_refused(address.decode(errors="replace"))

    def _zap_refused(self, address: str) -> None:
        """Every refused handshake cost a CURVE handshake and a decision: an address
        refused past the limit has its new connections cut at accept for a while."""
        now = time.monotonic()
        if self.zap_refusals.refused(address, now) and self.guard is not None:
            cooloff = self.zap_refusals.cooloff
            self.guard.bar(address, now + cooloff)
            log.warning(
                "%s: %d handshakes refused within %.0fs: its new connections are cut at accept for %.0fs",
                address, self.zap_refusals.limit, self.zap_refusals.window, cooloff,
            )

    async def _decide(self, mechanism: bytes, creds: list[bytes], address: str) -> auth.Verdict:
        if not self.insecure_plaintext:
            return await self._decide_curve(mechanism, creds, address)
        if mechanism != b"PLAIN" or len(creds) != 2:
            return auth.Verdict(b"400", "use the PLAIN mechanism")
        name = creds[0].decode("ascii", "replace")
        stored = self.digests.get(name)
        if stored is None and p.valid_name(name):
            stored = await self.storage.get_user(name)
        verdict = auth.check_plain(creds[0], creds[1], stored, self.reserved)
        if verdict.claim is not None:
            now = time.monotonic()
            wait = self.claims.wait(address, now)
            if wait:
                verdict = auth.Verdict(b"400", f"too many new names from {address}: try again in {wait:.0f}s")
            elif await self.storage.add_user(name, verdict.claim):
                self.core.add_user(name)  # type: ignore[union-attr]
                self.claims.claimed(address, name, verdict.claim, now)
                log.info("name %r claimed from %s", name, address)
            else:  # another broker claimed it first; decide again against that owner
                stored = await self.storage.get_user(name)
                verdict = auth.check_plain(creds[0], creds[1], stored, self.reserved)
        if verdict.status == b"200" and name in self.core.banned:  # type: ignore[union-attr]
            verdict = auth.Verdict(b"400", f"{name!r} is banned from this broker")
        if verdict.status == b"200":
            self.digests[name] = verdict.claim or stored or b""
        else:
            log.info("refused %r from %s: %s", name, address, verdict.text)
        return verdict

    async def _decide_curve(self, mechanism: bytes, creds: list[bytes], address: str) -> auth.Verdict:
        """A CURVE handshake: the client's key owns a name, or is finishing a claim it
        made (auth.Intents), or it is a look-only session that may make one."""
        if mechanism != b"CURVE" or len(creds) != 1 or len(creds[0]) != 32:
            return auth.Verdict(b"400", "use the CURVE mechanism")
        key = creds[0]
        if key in self.revoked:  # first: a revocation stored before the key list wins
            return auth.Verdict(b"400", "this key was revoked")
        now = time.monotonic()
        name = self.key_names.get(key)
        if name is not None:
            if name in self.core.banned:  # type: ignore[union-attr]
                return auth.Verdict(b"400", f"{name!r} is banned from this broker")
            left = self.refusals.left(name, now) if self.refusals.cooling else 0.0
            if left:
                return auth.Verdict(b"400", f"{name!r} ignored retry_after: cooling off for {left:.0f}s more")
            return auth.owned(name, key)
        intent = self.intents.take(key, now)
        if intent is None:
            return auth.looker(key)
        verdict = await self._finish_claim(key, intent, address, now)
        if verdict.status != b"200":
            log.info("refused the claim of %r from %s: %s", intent.name, address, verdict.text)
        return verdict

    async def _finish_claim(self, key: bytes, intent: "auth.Intent", address: str, now: float) -> auth.Verdict:
        name = intent.name
        stored = await self.storage.get_user(name)
        admin = auth.is_admin(name, key, self.admins)
        if stored is None:
            refusal = auth.may_register(name, self.reserved, self.registration, admin, intent.invite)
            if refusal:
                return auth.Verdict(b"400", refusal)
            wait = self.claims.wait(address, now)
            if wait:
                return auth.Verdict(b"400", f"too many new names from {address}: try again in {wait:.0f}s")
            expires = 0.0
            if auth.needs_invite(self.registration, admin):  # used up in one step: of two claims, one wins
                expires = await self.storage.use_invite(intent.invite, time.time())
                if not expires:
                    return auth.Verdict(b"400", auth.INVITE_REFUSED)
            owned = auth.key_digest([key])
            if not await self.storage.add_user(name, owned):
                if expires:  # not this code's fault: it stays good
                    await self.storage.add_invite(intent.invite, expires, time.time(), auth.MAX_INVITES + 1)
                return auth.Verdict(b"400", f"name {name!r} is taken")
            self.core.add_user(name)  # type: ignore[union-attr]
            self.claims.claimed(address, name, owned, now)
            log.info("name %r claimed by key %s from %s", name, keys.fingerprint(z85.encode(key)), address)
        elif auth.owner_keys(stored):
            return auth.Verdict(b"400", f"name {name!r} is taken")  # devices are added with `zchat keys add`
        elif intent.secret and hmac.compare_digest(intent.secret, stored.hex()):
            owned = auth.key_digest([key])
            if not (await self.storage.release_user(name, stored) and await self.storage.add_user(name, owned)):
                return auth.Verdict(b"400", f"name {name!r} changed while moving it to a key: try again")
            log.info("name %r moved from its PLAIN secret to key %s", name, keys.fingerprint(z85.encode(key)))
        else:
            return auth.Verdict(b"400", f"name {name!r} is taken (a PLAIN-era name moves to a key only with its secret)")
        self.key_names[key] = name
        self.name_keys[name] = [key]
        if admin:
            self.core.admins.add(name)  # type: ignore[union-attr]
        return auth.owned(name, key)
