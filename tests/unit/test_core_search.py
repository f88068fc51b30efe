"""Who may find what, in the core, with plain values: the shell only runs the query."""

from __future__ import annotations

from tests.unit.test_core_moderation import error, private_room, request
from zchat import protocol as p
from zchat.core import Limits, SearchQuery
from zchat.protocol import ErrorCode as E


def test_may_read_public_rooms_own_private_rooms_own_dms() -> None:
    core = private_room("bob")
    assert core.may_read("dave", "general") and core.may_read("dave", "anything")
    assert core.may_read("bob", "sec") and not core.may_read("dave", "sec")
    assert core.may_read("bob", "@bob:carol") and not core.may_read("dave", "@bob:carol")
    assert not core.may_read("bob", "@nonsense") and not core.may_read(p.LOOKER, "sec")


def test_a_search_is_checked_then_handed_to_the_shell() -> None:
    core = private_room("bob")
    out = request(core, "s-bob", "bob", p.Search(rid=5, text="hello", room="sec"))
    assert out.queries == [SearchQuery("s-bob", p.Search(rid=5, text="hello", room="sec"), "bob")] and not out.replies
    assert error(request(core, "s-dave", "dave", p.Search(rid=5, text="hello", room="sec"))).code == E.FORBIDDEN
    assert error(request(core, "s-dave", "dave", p.Search(rid=5, text=" \t"))).code == E.BAD_REQUEST
    assert request(core, "s-dave", "dave", p.Search(rid=5, text="hello")).queries  # every room: the shell filters


def test_searches_draw_from_their_own_bucket() -> None:
    core = private_room()
    core.limits = Limits(search_rate=1.0, search_burst=2.0)
    for _ in range(2):
        assert request(core, "s-bob", "bob", p.Search(rid=5, text="x"), now=0.0).queries
    refused = error(request(core, "s-bob", "bob", p.Search(rid=5, text="x"), now=0.0))
    assert refused.code == E.RATE_LIMITED and refused.retry_after == 1.0
    assert request(core, "s-bob", "bob", p.Search(rid=5, text="x"), now=1.0).queries
