"""The Consul backend against a real Consul agent with ACLs on (default deny)."""

from __future__ import annotations

import json
import logging
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import consul
import pytest
from consul.callback import CB

from resultbackend_operator.backends import (
    REASON_ADMIN_AUTH,
    REASON_CONFLICT,
    REASON_FORBIDDEN,
    REASON_UNREACHABLE,
    REASON_WORKER_AUTH,
    BackendError,
    Owner,
)
from resultbackend_operator.backends import consul as cb

pytestmark = pytest.mark.integration


class ConsulServer(Protocol):
    """What the `consul_server` fixture of tests/conftest.py provides."""

    url: str
    management_token: str


@dataclass(frozen=True)
class Case:
    owner: Owner
    policy_name: str
    prefix: str


def _raw(server: ConsulServer, token: str) -> Any:
    """A plain py-consul client, to look at Consul independently of the module."""
    client = cb.ConsulAdmin(server.url, token).client
    return client


@pytest.fixture
def admin(consul_server: ConsulServer) -> cb.ConsulAdmin:
    return cb.ConsulAdmin(consul_server.url, consul_server.management_token)


@pytest.fixture
def mgmt(consul_server: ConsulServer) -> Any:
    return _raw(consul_server, consul_server.management_token)


@pytest.fixture
def case(admin: cb.ConsulAdmin, mgmt: Any) -> Iterator[Case]:
    suffix = uuid.uuid4().hex[:10]
    made = Case(
        owner=Owner(namespace="it", name=f"rb-{suffix}", uid=str(uuid.uuid4())),
        policy_name=f"resultbackend-it-rb-{suffix}",
        prefix=f"celery/it/rb-{suffix}",
    )
    yield made
    # Everything this test may have left, whoever owns it.
    for policy in mgmt.acl.policy.list():
        if policy["Name"] in (made.policy_name, f"{made.policy_name}-other"):
            for token in mgmt.acl.token.list(policy=policy["ID"]):
                mgmt.acl.token.delete(token["AccessorID"])
            mgmt.acl.policy.delete(policy["ID"])
    for token in mgmt.acl.token.list():
        if made.owner.name in (token.get("Description") or ""):
            mgmt.acl.token.delete(token["AccessorID"])
    mgmt.kv.delete(f"{made.prefix}/", recurse=True)
    mgmt.kv.delete(f"{made.prefix}x/", recurse=True)


def _policy(mgmt: Any, policy_id: str) -> dict[str, Any]:
    policy: dict[str, Any] = mgmt.acl.policy.read(policy_id)
    return policy


def _token(mgmt: Any, accessor_id: str) -> dict[str, Any]:
    token: dict[str, Any] = mgmt.acl.token.read(accessor_id)
    return token


def _provision(admin: cb.ConsulAdmin, case: Case) -> tuple[str, str, str]:
    policy_id, _ = cb.ensure_policy(admin, case.policy_name, case.prefix, case.owner)
    accessor, secret, _ = cb.ensure_token(admin, policy_id, case.owner, None)
    return policy_id, accessor, secret


def _token_with_rules(mgmt: Any, rules: str) -> tuple[str, str]:
    """A token whose one policy has the given HCL rules: (policy ID, SecretID)."""
    name = f"rbo-it-{uuid.uuid4().hex[:10]}"
    policy = mgmt.http.put(
        CB.json(),
        "/v1/acl/policy",
        headers=mgmt.prepare_headers(),
        data=json.dumps({"Name": name, "Rules": rules}),
    )
    token = mgmt.acl.token.create(policies_id=[policy["ID"]])
    return str(policy["ID"]), str(token["SecretID"])


def _drop_token_with_rules(mgmt: Any, policy_id: str) -> None:
    for token in mgmt.acl.token.list(policy=policy_id):
        mgmt.acl.token.delete(token["AccessorID"])
    mgmt.acl.policy.delete(policy_id)


# --- provisioning -------------------------------------------------------------


def test_ensure_creates_a_marked_policy_and_a_token_linked_to_it_alone(
    admin: cb.ConsulAdmin, mgmt: Any, case: Case
) -> None:
    policy_id, wrote_policy = cb.ensure_policy(admin, case.policy_name, case.prefix, case.owner)
    accessor, secret, wrote_token = cb.ensure_token(admin, policy_id, case.owner, None)

    assert wrote_policy
    assert wrote_token
    policy = _policy(mgmt, policy_id)
    assert policy["Name"] == case.policy_name
    assert policy["Description"] == case.owner.describe()
    assert policy["Rules"] == cb.policy_rules(case.prefix)
    token = _token(mgmt, accessor)
    assert token["SecretID"] == secret
    assert token["Description"] == case.owner.describe()
    assert [p["ID"] for p in token["Policies"]] == [policy_id]
    assert not token.get("Roles")


def test_second_ensure_writes_nothing_and_leaves_modify_indexes_unchanged(
    admin: cb.ConsulAdmin, mgmt: Any, case: Case
) -> None:
    policy_id, accessor, secret = _provision(admin, case)
    policy_index = _policy(mgmt, policy_id)["ModifyIndex"]
    token_index = _token(mgmt, accessor)["ModifyIndex"]

    again_id, wrote_policy = cb.ensure_policy(admin, case.policy_name, case.prefix, case.owner)
    again = cb.ensure_token(admin, policy_id, case.owner, secret)
    # the operator crashed before writing the Secret: same token, still no write
    recovered = cb.ensure_token(admin, policy_id, case.owner, None)

    assert (again_id, wrote_policy) == (policy_id, False)
    assert again == (accessor, secret, False)
    assert recovered == (accessor, secret, False)
    assert _policy(mgmt, policy_id)["ModifyIndex"] == policy_index
    assert _token(mgmt, accessor)["ModifyIndex"] == token_index


def test_ensure_policy_puts_back_rules_edited_by_hand(
    admin: cb.ConsulAdmin, mgmt: Any, case: Case
) -> None:
    policy_id, _, _ = _provision(admin, case)
    mgmt.http.put(
        CB.json(),
        f"/v1/acl/policy/{policy_id}",
        headers=mgmt.prepare_headers(),
        data=json.dumps(
            {
                "ID": policy_id,
                "Name": case.policy_name,
                "Description": case.owner.describe(),
                "Rules": 'key_prefix "" { policy = "write" }',
            }
        ),
    )

    _, wrote = cb.ensure_policy(admin, case.policy_name, case.prefix, case.owner)

    assert wrote
    assert _policy(mgmt, policy_id)["Rules"] == cb.policy_rules(case.prefix)


def test_stale_known_secret_returns_the_existing_token_without_writing(
    admin: cb.ConsulAdmin, case: Case
) -> None:
    policy_id, accessor, secret = _provision(admin, case)

    result = cb.ensure_token(admin, policy_id, case.owner, str(uuid.uuid4()))

    assert result == (accessor, secret, False)


def test_crash_leftover_tokens_collapse_to_the_one_the_secret_holds(
    admin: cb.ConsulAdmin, case: Case
) -> None:
    policy_id, _ = cb.ensure_policy(admin, case.policy_name, case.prefix, case.owner)
    first, _ = cb.create_token(admin, policy_id, case.owner)
    second, second_secret = cb.create_token(admin, policy_id, case.owner)
    assert len(cb.find_tokens(admin, policy_id, case.owner)) == 2

    kept = cb.ensure_token(admin, policy_id, case.owner, second_secret)
    again = cb.ensure_token(admin, policy_id, case.owner, second_secret)

    assert kept == (second, second_secret, True)
    assert again == (second, second_secret, False)
    assert [t.accessor_id for t in cb.find_tokens(admin, policy_id, case.owner)] == [second]
    assert not cb.remove_token(admin, first)  # already gone


def test_without_a_known_secret_the_oldest_leftover_token_is_kept(
    admin: cb.ConsulAdmin, case: Case
) -> None:
    policy_id, _ = cb.ensure_policy(admin, case.policy_name, case.prefix, case.owner)
    first, first_secret = cb.create_token(admin, policy_id, case.owner)
    cb.create_token(admin, policy_id, case.owner)

    kept = cb.ensure_token(admin, policy_id, case.owner, None)

    assert kept == (first, first_secret, True)
    assert [t.accessor_id for t in cb.find_tokens(admin, policy_id, case.owner)] == [first]


def test_rotation_keeps_the_old_token_until_the_caller_removes_it(
    admin: cb.ConsulAdmin, case: Case
) -> None:
    policy_id, old, _ = _provision(admin, case)
    new, new_secret = cb.create_token(admin, policy_id, case.owner)

    during = cb.ensure_token(admin, policy_id, case.owner, new_secret, keep=[old])
    tokens_during = {t.accessor_id for t in cb.find_tokens(admin, policy_id, case.owner)}
    revoked = cb.remove_token(admin, old)

    assert during == (new, new_secret, False)
    assert tokens_during == {old, new}
    assert revoked
    assert [t.accessor_id for t in cb.find_tokens(admin, policy_id, case.owner)] == [new]


def test_tokens_and_policies_of_others_on_our_policy_are_not_ours(
    admin: cb.ConsulAdmin, mgmt: Any, case: Case
) -> None:
    policy_id, accessor, _ = _provision(admin, case)
    foreign = mgmt.acl.token.create(policies_id=[policy_id], description="made by hand")

    tokens = cb.find_tokens(admin, policy_id, case.owner)
    _, _, wrote = cb.ensure_token(admin, policy_id, case.owner, None)

    assert [t.accessor_id for t in tokens] == [accessor]
    assert not wrote
    assert _token(mgmt, foreign["AccessorID"])["Description"] == "made by hand"


def test_no_token_secret_reaches_the_log(
    admin: cb.ConsulAdmin,
    consul_server: ConsulServer,
    case: Case,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    policy_id, _ = cb.ensure_policy(admin, case.policy_name, case.prefix, case.owner)
    first, first_secret = cb.create_token(admin, policy_id, case.owner)
    _, second_secret = cb.create_token(admin, policy_id, case.owner)
    cb.ensure_token(admin, policy_id, case.owner, second_secret)
    cb.check_worker(consul_server.url, second_secret, case.prefix)
    cb.check_management(admin)

    assert first in caplog.text  # the log names tokens by AccessorID
    for secret in (first_secret, second_secret, consul_server.management_token):
        assert secret not in caplog.text


def test_policy_name_held_by_someone_else_is_a_permanent_conflict(
    admin: cb.ConsulAdmin, mgmt: Any, case: Case
) -> None:
    mgmt.http.put(
        CB.json(),
        "/v1/acl/policy",
        headers=mgmt.prepare_headers(),
        data=json.dumps({"Name": case.policy_name, "Description": "hand-made", "Rules": ""}),
    )
    other = Owner(case.owner.namespace, case.owner.name, str(uuid.uuid4()))
    cb.ensure_policy(admin, f"{case.policy_name}-other", case.prefix, other)

    with pytest.raises(BackendError) as by_hand:
        cb.ensure_policy(admin, case.policy_name, case.prefix, case.owner)
    with pytest.raises(BackendError) as by_other_uid:
        cb.ensure_policy(admin, f"{case.policy_name}-other", case.prefix, case.owner)

    assert (by_hand.value.reason, by_hand.value.transient) == (REASON_CONFLICT, False)
    assert case.policy_name in by_hand.value.message
    assert (by_other_uid.value.reason, by_other_uid.value.transient) == (REASON_CONFLICT, False)
    assert other.uid in by_other_uid.value.message
    assert not cb.remove_policy(admin, case.policy_name, case.owner)
    assert any(p["Name"] == case.policy_name for p in mgmt.acl.policy.list())


# --- what the worker token may do ------------------------------------------------


def _check_sessions(mgmt: Any) -> set[str]:
    """IDs of the worker check's sessions in Consul. Compared before and after a
    check, not to none: a data dir kept from an earlier run may hold sessions of
    an operator stopped before its deferred cleanup, which Consul expires only
    a TTL after its leader comes up."""
    _, sessions = mgmt.session.list()
    return {s["ID"] for s in sessions if s.get("Name") == cb.CHECK_SESSION_NAME}


def test_worker_token_passes_the_worker_check_and_leaves_nothing_behind(
    admin: cb.ConsulAdmin, consul_server: ConsulServer, mgmt: Any, case: Case
) -> None:
    _, _, secret = _provision(admin, case)
    before = _check_sessions(mgmt)

    cb.check_worker(consul_server.url, secret, case.prefix)

    _, keys = mgmt.kv.get(f"{case.prefix}/", keys=True)
    assert keys is None
    assert _check_sessions(mgmt) <= before


def test_worker_check_passes_again_right_after_itself(
    admin: cb.ConsulAdmin, consul_server: ConsulServer, case: Case
) -> None:
    # The check's session goes, and its key with it, without Consul's lock-delay
    # keeping the next check from acquiring the key.
    _, _, secret = _provision(admin, case)

    for _ in range(3):
        cb.check_worker(consul_server.url, secret, case.prefix)


def test_worker_check_with_a_deferred_cleanup_passes_before_the_session_is_gone(
    admin: cb.ConsulAdmin, consul_server: ConsulServer, mgmt: Any, case: Case
) -> None:
    _, _, secret = _provision(admin, case)
    before = _check_sessions(mgmt)
    pending: list[Callable[[], None]] = []

    cb.check_worker(consul_server.url, secret, case.prefix, cleanup=pending.append)
    cb.check_worker(consul_server.url, secret, case.prefix)  # no contention meanwhile
    assert len(pending) == 1
    pending[0]()

    _, keys = mgmt.kv.get(f"{case.prefix}/", keys=True)
    assert keys is None
    assert _check_sessions(mgmt) <= before


def test_worker_token_reads_and_writes_under_its_prefix_and_nowhere_else(
    admin: cb.ConsulAdmin, consul_server: ConsulServer, case: Case
) -> None:
    _, _, secret = _provision(admin, case)
    worker = _raw(consul_server, secret)
    session = worker.session.create(behavior="delete", ttl=60)
    key = f"{case.prefix}/celery-task-meta-1"

    try:
        assert worker.kv.put(key, "result", acquire=session)
        assert worker.kv.get(key)[1]["Value"] == b"result"
        assert worker.kv.delete(key)
        for outside in (f"{case.prefix}x/k", case.prefix, "celery/other/k", "k"):
            with pytest.raises(consul.ACLPermissionDenied):
                worker.kv.put(outside, "x")
            with pytest.raises(consul.ACLPermissionDenied):
                worker.kv.get(outside)
        with pytest.raises(consul.ACLPermissionDenied):
            worker.acl.token.list()
    finally:
        worker.session.destroy(session)


def test_a_celery_style_client_takes_the_worker_token_from_consul_http_token(
    admin: cb.ConsulAdmin,
    consul_server: ConsulServer,
    case: Case,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, _, secret = _provision(admin, case)
    address = cb.parse_agent_url(consul_server.url)
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", secret)
    # what celery.backends.consul does: host, port and consistency, no token
    worker = consul.Consul(host=address.host, port=address.port, consistency="consistent")
    session = worker.session.create(name="celery-task-meta-1", behavior="delete", ttl=86400)

    try:
        assert worker.kv.put(f"{case.prefix}/celery-task-meta-1", "r", acquire=session)
    finally:
        worker.session.destroy(session)


def test_check_worker_with_a_revoked_token_reports_rejected_credentials(
    admin: cb.ConsulAdmin, consul_server: ConsulServer, case: Case
) -> None:
    _, accessor, secret = _provision(admin, case)
    assert cb.remove_token(admin, accessor)

    with pytest.raises(BackendError) as info:
        cb.check_worker(consul_server.url, secret, case.prefix)

    assert (info.value.reason, info.value.transient) == (REASON_WORKER_AUTH, True)
    assert secret not in str(info.value)


def test_check_worker_on_another_prefix_reports_rejected_credentials(
    admin: cb.ConsulAdmin, consul_server: ConsulServer, case: Case
) -> None:
    _, _, secret = _provision(admin, case)

    with pytest.raises(BackendError) as info:
        cb.check_worker(consul_server.url, secret, f"{case.prefix}x")

    assert info.value.reason == REASON_WORKER_AUTH


def test_check_worker_against_a_closed_port_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # nothing listens on the port once the socket is closed

    with pytest.raises(BackendError) as info:
        cb.check_worker(f"http://127.0.0.1:{port}", str(uuid.uuid4()), "celery/x", timeout=2)

    assert (info.value.reason, info.value.transient) == (REASON_UNREACHABLE, True)


# --- the management token ------------------------------------------------------


def test_check_management_accepts_the_management_token(admin: cb.ConsulAdmin) -> None:
    cb.check_management(admin)


def test_check_management_accepts_a_token_with_acl_write_that_is_not_global_management(
    consul_server: ConsulServer, mgmt: Any
) -> None:
    policy_id, secret = _token_with_rules(mgmt, 'acl = "write"')
    try:
        cb.check_management(cb.ConsulAdmin(consul_server.url, secret))
        assert not [p for p in mgmt.acl.policy.list() if not p.get("Name")]
    finally:
        _drop_token_with_rules(mgmt, policy_id)


def test_check_management_refuses_a_token_with_only_acl_read(
    consul_server: ConsulServer, mgmt: Any
) -> None:
    policy_id, secret = _token_with_rules(mgmt, 'acl = "read"')
    try:
        with pytest.raises(BackendError) as info:
            cb.check_management(cb.ConsulAdmin(consul_server.url, secret))
    finally:
        _drop_token_with_rules(mgmt, policy_id)

    assert info.value.reason == REASON_FORBIDDEN
    assert 'acl = "write"' in info.value.message
    assert secret not in str(info.value)


def test_check_management_with_an_unknown_token_is_an_auth_failure(
    consul_server: ConsulServer,
) -> None:
    unknown = str(uuid.uuid4())

    with pytest.raises(BackendError) as info:
        cb.check_management(cb.ConsulAdmin(consul_server.url, unknown))

    assert info.value.reason == REASON_ADMIN_AUTH
    assert unknown not in str(info.value)


def test_create_policy_creates_without_looking_and_gives_none_when_the_name_is_taken(
    admin: cb.ConsulAdmin, mgmt: Any, case: Case
) -> None:
    policy_id = cb.create_policy(admin, case.policy_name, case.prefix, case.owner)

    assert policy_id is not None
    assert _policy(mgmt, policy_id)["Rules"] == cb.policy_rules(case.prefix)
    assert cb.create_policy(admin, case.policy_name, case.prefix, case.owner) is None
    # the full path then finds it as ours and has nothing to change
    assert cb.ensure_policy(admin, case.policy_name, case.prefix, case.owner) == (policy_id, False)


@pytest.mark.parametrize("write", [cb.ensure_policy, cb.create_policy])
def test_writing_the_policy_without_acl_write_is_forbidden(
    consul_server: ConsulServer, mgmt: Any, case: Case, write: Callable[..., object]
) -> None:
    # create_policy skips the management check: Consul's 403 says the same.
    policy_id, secret = _token_with_rules(mgmt, 'acl = "read"')
    try:
        with pytest.raises(BackendError) as info:
            write(
                cb.ConsulAdmin(consul_server.url, secret),
                case.policy_name,
                case.prefix,
                case.owner,
            )
    finally:
        _drop_token_with_rules(mgmt, policy_id)

    assert info.value.reason == REASON_FORBIDDEN
    assert 'acl = "write"' in info.value.message
    assert secret not in str(info.value)


def test_create_policy_with_an_unknown_token_is_an_auth_failure(
    consul_server: ConsulServer, case: Case
) -> None:
    unknown = str(uuid.uuid4())

    with pytest.raises(BackendError) as info:
        cb.create_policy(
            cb.ConsulAdmin(consul_server.url, unknown), case.policy_name, case.prefix, case.owner
        )

    assert info.value.reason == REASON_ADMIN_AUTH
    assert unknown not in str(info.value)


# --- removal -------------------------------------------------------------------


def test_remove_calls_are_idempotent_and_report_whether_they_wrote(
    admin: cb.ConsulAdmin, mgmt: Any, case: Case
) -> None:
    policy_id, accessor, _ = _provision(admin, case)
    mgmt.kv.put(f"{case.prefix}/celery-task-meta-1", "r")

    removed = (
        cb.remove_owned_tokens(admin, policy_id, case.owner),
        cb.remove_policy(admin, policy_id, case.owner),
        cb.remove_keys(admin, case.prefix),
    )
    again = (
        cb.remove_owned_tokens(admin, policy_id, case.owner),
        cb.remove_policy(admin, policy_id, case.owner),
        cb.remove_policy(admin, case.policy_name, case.owner),
        cb.remove_token(admin, accessor),
        cb.remove_keys(admin, case.prefix),
    )

    assert removed == (True, True, True)
    assert again == (False, False, False, False, False)
    assert accessor not in [t["AccessorID"] for t in mgmt.acl.token.list()]
    assert mgmt.kv.get(f"{case.prefix}/celery-task-meta-1")[1] is None


def test_remove_policy_by_name_deletes_our_policy_and_its_tokens(
    admin: cb.ConsulAdmin, mgmt: Any, case: Case
) -> None:
    _, accessor, _ = _provision(admin, case)

    assert cb.remove_policy(admin, case.policy_name, case.owner)

    assert case.policy_name not in [p["Name"] for p in mgmt.acl.policy.list()]
    assert accessor not in [t["AccessorID"] for t in mgmt.acl.token.list()]


def test_remove_keys_spares_the_sibling_prefix(
    admin: cb.ConsulAdmin, mgmt: Any, case: Case
) -> None:
    mgmt.kv.put(f"{case.prefix}/a", "1")
    mgmt.kv.put(f"{case.prefix}x/b", "2")

    assert cb.remove_keys(admin, case.prefix)

    assert mgmt.kv.get(f"{case.prefix}/a")[1] is None
    assert mgmt.kv.get(f"{case.prefix}x/b")[1]["Value"] == b"2"


# --- Consul's own rules, recorded ------------------------------------------------


@pytest.mark.parametrize(("ttl", "accepted"), [("9s", False), ("10s", True), ("86400s", True),
                                               ("86401s", False)])  # fmt: skip
def test_consul_accepts_session_ttls_from_10s_to_86400s_only(
    mgmt: Any, ttl: str, accepted: bool
) -> None:
    def create() -> str:
        return str(
            mgmt.http.put(
                CB.json(is_id=True),
                "/v1/session/create",
                headers=mgmt.prepare_headers(),
                data=json.dumps({"TTL": ttl, "Behavior": "delete"}),
            )
        )

    if accepted:
        session = create()
        assert mgmt.session.info(session)[1]["TTL"] == ttl
        mgmt.session.destroy(session)
    else:
        with pytest.raises(consul.ConsulException, match="TTL"):
            create()
