"""Sign-in for IRC connections, against the same accounts as ``zchat web``
(``zchat.accounts``): a name and a password give the user's zchat identity secret.

A name with no account yet gets one at its first sign-in (the broker then decides,
when the Client claims the name, whether it may have it; if not, the account is
removed again). Attempts are rate limited per name and per address.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zchat.accounts import Accounts, SignInLimiter

log = logging.getLogger(__name__)


class Refused(Exception):
    """Sign-in refused; ``str()`` is the sentence for the user."""


class Gatekeeper:
    """Turns (name, password) into the identity secret. Without ``accounts`` (a
    personal gateway: ``zchat irc --no-accounts``) the nick alone signs in, with the
    secrets in this machine's config directory, as ``zchat talk`` does."""

    def __init__(self, accounts: Accounts | None, limiter: SignInLimiter | None = None) -> None:
        self.accounts = accounts
        if accounts is not None and limiter is None:
            from zchat.accounts import SignInLimiter

            limiter = SignInLimiter()
        self.limiter = limiter

    async def secret(self, name: str, password: str, address: str) -> tuple[str, bool]:
        """(secret, made now): ``made now`` means a new account, to remove if the
        broker refuses the name. Raises Refused."""
        if self.accounts is None:
            from zchat.config import load_secret

            return await asyncio.to_thread(load_secret, name), False
        from zchat.accounts import AccountError

        assert self.limiter is not None
        wait = self.limiter.allow(name, address)
        if wait:
            raise Refused(f"too many sign-in attempts: try again in {wait:.0f}s")
        account = self.accounts.get(name)
        if account is None:
            try:
                account = await asyncio.to_thread(self.accounts.create, name, password)
            except AccountError as exc:
                if exc.code != AccountError.TAKEN:
                    raise Refused(str(exc)) from None
            else:
                return account.secret, True
        if not await asyncio.to_thread(self.accounts.verify, name, password):
            raise Refused("wrong name or password")
        account = self.accounts.get(name)
        assert account is not None
        return account.secret, False

    def forget(self, name: str) -> None:
        """The broker refused a name whose account was made for this sign-in."""
        if self.accounts is not None:
            self.accounts.remove(name)
