"""Pure logic of the Consul backend: rules, ownership, URLs, error mapping."""

from __future__ import annotations

import consul
import pytest
import requests

from resultbackend_operator.backends import (
    REASON_ADMIN_AUTH,
    REASON_BACKEND,
    REASON_FORBIDDEN,
    REASON_INVALID,
    REASON_UNREACHABLE,
    REASON_WORKER_AUTH,
    BackendError,
    Owner,
)
from resultbackend_operator.backends import consul as cb

OWNER = Owner(namespace="shop", name="billing", uid="0b5c9b7e-1111-2222-3333-444455556666")
SECRET = "3f1d3a4e-aaaa-bbbb-cccc-ddddeeeeffff"


def test_policy_rules_grant_write_on_prefix_with_trailing_slash_and_sessions() -> None:
    assert cb.policy_rules("celery/shop/billing") == (
        'key_prefix "celery/shop/billing/" { policy = "write" }\n'
        'session_prefix "" { policy = "write" }\n'
    )


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        "/celery",
        "celery/",
        "celery//x",
        'x" { policy = "write" } acl = "write" key_prefix "y',
        "celery/$" + "{node}",
        "celery/a b",
        "celery/\n",
        "celery/../other",
        ".hidden",
        "celery/*",
    ],
)
def test_policy_rules_reject_prefixes_that_could_escape_the_hcl_string_or_path(
    prefix: str,
) -> None:
    with pytest.raises(ValueError, match="keyPrefix"):
        cb.policy_rules(prefix)


@pytest.mark.parametrize("prefix", ["celery", "celery/shop/billing", "a_b-c.d/E1", "x/v1.2"])
def test_ordinary_prefixes_are_accepted(prefix: str) -> None:
    cb.check_key_prefix(prefix)


def test_owner_description_round_trips() -> None:
    assert cb.parse_owner(OWNER.describe()) == OWNER
    assert cb.owned_by(OWNER.describe(), OWNER)


@pytest.mark.parametrize(
    "description",
    [
        None,
        "",
        "managed by hand",
        Owner("shop", "billing", "another-uid").describe(),
        Owner("other", "billing", OWNER.uid).describe(),
        OWNER.describe() + " (edited)",
    ],
)
def test_descriptions_without_our_exact_marker_are_not_ours(description: str | None) -> None:
    assert not cb.owned_by(description, OWNER)


def test_a_policy_of_the_resultbackend_we_adopt_is_ours_and_no_other() -> None:
    adopter = Owner(OWNER.namespace, OWNER.name, "new-uid", adopts=OWNER.uid)
    assert cb.owned_by(OWNER.describe(), adopter)
    assert not cb.owned_by(Owner(OWNER.namespace, OWNER.name, "third").describe(), adopter)
    assert not cb.owned_by(Owner("other", OWNER.name, OWNER.uid).describe(), adopter)


@pytest.mark.parametrize(
    ("url", "one_client", "expected"),
    [
        ("http://consul.consul.svc:8500", False, "consul://consul.consul.svc:8500/celery/x"),
        ("http://consul.consul.svc", False, "consul://consul.consul.svc:8500/celery/x"),
        ("https://consul.example:8501", False, "consul://consul.example:8501/celery/x"),
        ("https://consul.example", True, "consul://consul.example:8500/celery/x?one_client=1"),
        ("http://10.0.0.5:18500/", True, "consul://10.0.0.5:18500/celery/x?one_client=1"),
        ("http://[fd00::1]:8500", False, "consul://[fd00::1]:8500/celery/x"),
    ],
)
def test_worker_uri_carries_host_port_and_prefix(url: str, one_client: bool, expected: str) -> None:
    assert cb.worker_uri(url, "celery/x", one_client) == expected


@pytest.mark.parametrize(
    "url", ["consul.svc:8500", "ftp://consul:21", "http://:8500", "http://consul:notaport"]
)
def test_agent_urls_without_http_scheme_host_or_numeric_port_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="http"):
        cb.parse_agent_url(url)


def test_admin_repr_and_invalid_url_error_do_not_show_the_token() -> None:
    admin = cb.ConsulAdmin("http://127.0.0.1:1", SECRET)
    assert SECRET not in repr(admin)
    with pytest.raises(BackendError) as info:
        cb.ConsulAdmin("consul:8500", SECRET)
    assert info.value.reason == REASON_INVALID
    assert SECRET not in str(info.value)


def test_admin_uses_the_given_token_even_when_the_environment_sets_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-environment")
    admin = cb.ConsulAdmin("http://127.0.0.1:1", SECRET)
    assert admin.client.prepare_headers() == {"X-Consul-Token": SECRET}


def test_token_secret_is_not_in_the_token_repr() -> None:
    token = cb._token_from(
        {
            "AccessorID": "acc",
            "SecretID": SECRET,
            "Description": OWNER.describe(),
            "Policies": [{"ID": "p1", "Name": "n"}],
            "CreateIndex": 5,
            "ModifyIndex": 6,
        },
        "p1",
    )
    assert token.secret_id == SECRET
    assert token.exclusive
    assert SECRET not in repr(token)


@pytest.mark.parametrize(
    ("listed", "exclusive"),
    [
        ({"Policies": [{"ID": "p1"}, {"ID": "p2"}]}, False),
        ({"Policies": [{"ID": "p1"}], "Roles": [{"ID": "r"}]}, False),
        ({"Policies": [{"ID": "p1"}], "ServiceIdentities": [{"ServiceName": "web"}]}, False),
        ({"Policies": [{"ID": "p1"}], "Roles": []}, True),
    ],
)
def test_a_token_is_exclusive_only_when_linked_to_the_policy_alone(
    listed: dict[str, object], exclusive: bool
) -> None:
    token = cb._token_from({"AccessorID": "acc", **listed}, "p1")
    assert token.exclusive is exclusive


def test_redacted_secret_in_a_listing_counts_as_unknown() -> None:
    token = cb._token_from(
        {"AccessorID": "acc", "SecretID": "<hidden>", "Policies": [{"ID": "p1"}]}, "p1"
    )
    assert token.secret_id is None


def _map(
    exc: Exception, denied: str = REASON_FORBIDDEN, invalid: str | None = None
) -> BackendError:
    return cb.map_error(
        exc, action="doing it", where="http://c:8500", denied_reason=denied, invalid_message=invalid
    )


@pytest.mark.parametrize(
    ("exc", "denied", "reason", "transient"),
    [
        (requests.ConnectionError(f"refused {SECRET}"), REASON_FORBIDDEN, REASON_UNREACHABLE, True),
        (requests.Timeout(SECRET), REASON_WORKER_AUTH, REASON_UNREACHABLE, True),
        (consul.ConsulException(f"500 No cluster leader {SECRET}"), REASON_FORBIDDEN,
         REASON_UNREACHABLE, True),
        (consul.ConsulException("503 rate limited"), REASON_WORKER_AUTH, REASON_UNREACHABLE, True),
        (consul.ACLPermissionDenied(f"Permission denied: token {SECRET} lacks acl:write"),
         REASON_FORBIDDEN, REASON_FORBIDDEN, True),
        (consul.ACLPermissionDenied("ACL not found"), REASON_FORBIDDEN, REASON_ADMIN_AUTH, True),
        (consul.ACLPermissionDenied("ACL not found"), REASON_WORKER_AUTH, REASON_WORKER_AUTH,
         True),
        (consul.ACLPermissionDenied("Permission denied"), REASON_WORKER_AUTH,
         REASON_WORKER_AUTH, True),
        (consul.ACLDisabled("ACL support disabled"), REASON_FORBIDDEN, REASON_BACKEND, True),
        (consul.ConsulException("429 too many"), REASON_FORBIDDEN, REASON_BACKEND, True),
        (consul.ConsulException(f"Failed to decode JSON: {SECRET}"), REASON_FORBIDDEN,
         REASON_BACKEND, True),
    ],
)  # fmt: skip
def test_errors_map_to_reasons_without_the_server_text(
    exc: Exception, denied: str, reason: str, transient: bool
) -> None:
    err = _map(exc, denied)
    assert (err.reason, err.transient) == (reason, transient)
    assert SECRET not in err.message
    assert SECRET not in str(err)
    assert err.message.startswith("Consul at http://c:8500: doing it failed")


def test_forbidden_message_names_the_missing_acl_write() -> None:
    err = _map(consul.ACLPermissionDenied("Permission denied"))
    assert 'acl = "write"' in err.message


def test_consul_validation_errors_become_invalid_when_the_caller_knows_what_was_invalid() -> None:
    body = "500 Invalid Policy: invalid Name. Only alphanumeric characters"
    err = _map(consul.ConsulException(body), invalid="bad policy name")
    assert (err.reason, err.transient) == (REASON_INVALID, False)
    assert err.message.endswith("bad policy name")
    # without that knowledge a 500 is an outage, and a duplicate name is a race
    assert _map(consul.ConsulException(body)).reason == REASON_UNREACHABLE
    race = consul.ConsulException("500 Invalid Policy: A Policy with Name 'x' already exists")
    assert _map(race, invalid="bad policy name").reason == REASON_UNREACHABLE


def test_bad_request_with_known_cause_is_invalid_and_permanent() -> None:
    err = _map(consul.ConsulException("400 Policy decoding failed"), invalid="bad input")
    assert (err.reason, err.transient) == (REASON_INVALID, False)
    assert _map(consul.ConsulException("400 nope")).reason == REASON_BACKEND
