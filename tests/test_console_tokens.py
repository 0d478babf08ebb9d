"""Console tokens: single use, bound to user, VM and kind, short-lived (real Redis)."""

from __future__ import annotations

import pytest

from portal import console_tokens
from portal.console_tokens import ConsoleTokenError
from portal.extensions import queues
from portal.models import Role
from tests.conftest import make_server, make_user, make_vm


@pytest.fixture
def grant_setup(app):
    with app.app_context():
        owner = make_user("ann", Role.REGULAR)
        other = make_user("bob", Role.REGULAR)
        vm = make_vm(owner, "cons1", server=make_server(), state="running")
        yield owner, other, vm


def test_a_token_opens_its_console_once(app, grant_setup):
    owner, _, vm = grant_setup
    token = console_tokens.mint(owner, vm, "vnc")
    grant = console_tokens.redeem(token, owner.id, "vnc")
    assert (grant.user_id, grant.vm_id, grant.kind) == (owner.id, vm.id, "vnc")
    with pytest.raises(ConsoleTokenError, match="used"):
        console_tokens.redeem(token, owner.id, "vnc")  # replayed


def test_made_up_foreign_wrong_kind_and_expired_tokens_are_refused(app, grant_setup):
    owner, other, vm = grant_setup
    with pytest.raises(ConsoleTokenError):
        console_tokens.redeem("made-up-token", owner.id, "vnc")
    with pytest.raises(ConsoleTokenError, match="presented by user"):
        console_tokens.redeem(console_tokens.mint(owner, vm, "vnc"), other.id, "vnc")
    with pytest.raises(ConsoleTokenError, match="presented by user"):
        console_tokens.redeem(console_tokens.mint(owner, vm, "vnc"), None, "vnc")
    with pytest.raises(ConsoleTokenError, match="serial token"):
        console_tokens.redeem(console_tokens.mint(owner, vm, "serial"), owner.id, "vnc")
    token = console_tokens.mint(owner, vm, "vnc")
    # Expiry is Redis's own key TTL; end it now instead of sleeping through it.
    key = console_tokens._key(token)
    assert 0 < queues.redis.ttl(key) <= app.config["CONSOLE_TOKEN_SECONDS"]
    queues.redis.pexpire(key, 1)
    while queues.redis.exists(key):  # Redis drops it within milliseconds
        pass
    with pytest.raises(ConsoleTokenError, match="expired"):
        console_tokens.redeem(token, owner.id, "vnc")
    with pytest.raises(ConsoleTokenError, match="kind"):
        console_tokens.mint(owner, vm, "spice")
