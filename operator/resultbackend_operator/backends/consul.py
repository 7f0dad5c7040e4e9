"""Consul: one ACL policy and one worker token per ResultBackend (py-consul).

Every `ensure_*` / `remove_*` reads first and writes only when something
differs, and returns whether it wrote, so a second reconcile provably writes
nothing. Objects are marked as ours by their Description (`Owner.describe()`);
anything without our marker is never changed or deleted.

Tokens (SecretIDs) never reach an exception message, a repr or a log line:
errors are rebuilt from names, the agent address and HTTP status codes only,
and the original py-consul exception (whose text is the server's response
body) is dropped from the chain.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import re
import urllib.parse
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import consul
import requests
from consul.callback import CB

from resultbackend_operator import metrics
from resultbackend_operator.api import PROVIDER
from resultbackend_operator.settings import SETTINGS

from .base import (
    REASON_ADMIN_AUTH,
    REASON_BACKEND,
    REASON_CONFLICT,
    REASON_FORBIDDEN,
    REASON_INVALID,
    REASON_UNREACHABLE,
    REASON_WORKER_AUTH,
    AdminSecretRef,
    BackendError,
    Owner,
    Provisioned,
    Superseded,
    host_port,
    register,
)

if TYPE_CHECKING:
    from resultbackend_operator.api import ResultBackend, ResultStore

log = logging.getLogger(__name__)

DEFAULT_PORT = 8500
DEFAULT_TIMEOUT = 10.0
CHECK_KEY = ".resultbackend-operator-check"
CHECK_SESSION_NAME = "resultbackend-operator-check"
# Consul accepts session TTLs from 10s to 86400s; the check needs the shortest.
CHECK_SESSION_TTL_SECONDS = 10

# The prefix is pasted into HCL rules and into the worker URL, so it is kept to
# characters that need no quoting in either: a `"` would let a user write their
# own ACL rules (e.g. `acl = "write"`) into a policy the operator creates.
_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*"
KEY_PREFIX_RE = re.compile(rf"^{_SEGMENT}(?:/{_SEGMENT})*$")
KEY_PREFIX_RULE = (
    "letters, digits, '_', '-' and '.', in segments separated by single '/', "
    "no segment starting with '.', no leading or trailing '/'"
)

_OWNER_RE = re.compile(
    r"^resultbackend-operator: ResultBackend (?P<namespace>[^/\s]+)/(?P<name>\S+) uid=(?P<uid>\S+)$"
)
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_STATUS_RE = re.compile(r"^(?P<code>[0-9]{3})\b")
GLOBAL_MANAGEMENT_POLICY_ID = "00000000-0000-0000-0000-000000000001"
# Consul's token list shows this instead of the SecretID to callers without acl:write.
_REDACTED = "<hidden>"


# --- pure logic -------------------------------------------------------------


def check_key_prefix(key_prefix: str) -> None:
    """Raise ValueError unless the prefix is safe to paste into rules and URLs."""
    if not KEY_PREFIX_RE.match(key_prefix):
        raise ValueError(f"keyPrefix {key_prefix!r} is not allowed: use {KEY_PREFIX_RULE}")


def policy_rules(key_prefix: str) -> str:
    """The worker policy: its prefix (with the trailing slash) and TTL sessions."""
    check_key_prefix(key_prefix)
    return (
        f'key_prefix "{key_prefix}/" {{ policy = "write" }}\n'
        'session_prefix "" { policy = "write" }\n'
    )


def parse_owner(description: str | None) -> Owner | None:
    """The ResultBackend named by our ownership marker, or None for anything else."""
    match = _OWNER_RE.match(description or "")
    if match is None:
        return None
    return Owner(namespace=match["namespace"], name=match["name"], uid=match["uid"])


def owned_by(description: str | None, owner: Owner) -> bool:
    found = parse_owner(description)
    return found is not None and owner.owns(found.namespace, found.name, found.uid)


@dataclass(frozen=True)
class AgentAddress:
    scheme: str
    host: str
    port: int

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}"


def parse_agent_url(url: str) -> AgentAddress:
    """`http(s)://host[:port]`; the port defaults to 8500 (Consul's, not the scheme's)."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise ValueError("Consul url must be http://host[:port] or https://host[:port]")
    return AgentAddress(parts.scheme, parts.hostname, port or DEFAULT_PORT)


def worker_uri(agent_url: str, key_prefix: str, one_client: bool) -> str:
    """Celery's result backend URL: `consul://host:port/<keyPrefix>[?one_client=1]`.

    Celery takes host, port and the path (its key prefix) from it; the token
    reaches workers as CONSUL_HTTP_TOKEN, which py-consul reads itself. The
    scheme is lost: Celery always talks http unless CONSUL_HTTP_SSL=true.
    """
    check_key_prefix(key_prefix)
    address = parse_agent_url(agent_url)
    uri = f"consul://{address.netloc}/{key_prefix}"
    return f"{uri}?one_client=1" if one_client else uri


def _status_of(exc: BaseException) -> int | None:
    match = _STATUS_RE.match(str(exc))
    return int(match["code"]) if match else None


def map_error(
    exc: Exception,
    *,
    action: str,
    where: str,
    denied_reason: str,
    invalid_message: str | None = None,
) -> BackendError:
    """Turn a py-consul / requests exception into a BackendError.

    The exception's own text is the server's response body; it is only looked
    at, never copied into the message.
    """
    prefix = f"Consul at {where}: {action} failed"
    if isinstance(exc, requests.RequestException):
        return BackendError(REASON_UNREACHABLE, f"{prefix}: {type(exc).__name__}", transient=True)
    if isinstance(exc, consul.ACLPermissionDenied):
        if denied_reason == REASON_WORKER_AUTH:
            return BackendError(
                REASON_WORKER_AUTH,
                f"{prefix}: the worker token was refused (HTTP 403)",
                transient=True,
            )
        if "ACL not found" in str(exc):
            return BackendError(
                REASON_ADMIN_AUTH,
                f"{prefix}: the management token is not known to Consul (HTTP 403, ACL not found)",
                transient=True,
            )
        return BackendError(
            REASON_FORBIDDEN,
            f'{prefix}: permission denied (HTTP 403); the management token needs acl = "write"',
            transient=True,
        )
    if isinstance(exc, consul.ACLDisabled):
        return BackendError(
            REASON_BACKEND, f"{prefix}: ACLs are disabled on this agent (HTTP 401)", transient=True
        )
    status = _status_of(exc)
    if status is not None and status >= 500:
        # Consul answers 500 for validation errors raised behind its RPC layer too.
        body = str(exc)
        if invalid_message is not None and "Invalid" in body and "already exists" not in body:
            return BackendError(REASON_INVALID, f"{prefix}: {invalid_message}", transient=False)
        return BackendError(REASON_UNREACHABLE, f"{prefix} (HTTP {status})", transient=True)
    if status == 400 and invalid_message is not None:
        return BackendError(REASON_INVALID, f"{prefix}: {invalid_message}", transient=False)
    suffix = f" (HTTP {status})" if status is not None else f": {type(exc).__name__}"
    return BackendError(REASON_BACKEND, f"{prefix}{suffix}", transient=True)


# --- clients ----------------------------------------------------------------


def _client(address: AgentAddress, token: str, timeout: float) -> Any:
    client = consul.Consul(
        host=address.host,
        port=address.port,
        scheme=address.scheme,
        token=token,
        connections_timeout=timeout,
    )
    # py-consul prefers CONSUL_HTTP_TOKEN from the environment over the token it
    # is given; the operator must use exactly the token it was handed.
    client.token = token
    metrics.count_requests(client.http.session, "Consul")
    return client


class ConsulAdmin:
    """A Consul agent address plus the management token (acl = "write")."""

    def __init__(self, url: str, management_token: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        try:
            self.address = parse_agent_url(url)
        except ValueError as exc:
            raise BackendError(REASON_INVALID, str(exc), transient=False) from None
        self.timeout = timeout
        self.client: Any = _client(self.address, management_token, timeout)

    @property
    def url(self) -> str:
        return self.address.url

    def __repr__(self) -> str:
        return f"ConsulAdmin(url={self.url!r})"

    @contextlib.contextmanager
    def call(self, action: str, invalid_message: str | None = None) -> Iterator[None]:
        try:
            yield
        except (consul.ConsulException, requests.RequestException) as exc:
            raise map_error(
                exc,
                action=action,
                where=self.url,
                denied_reason=REASON_FORBIDDEN,
                invalid_message=invalid_message,
            ) from None


# --- policy -----------------------------------------------------------------


def _find_policy(admin: ConsulAdmin, id_or_name: str) -> dict[str, Any] | None:
    """The policy with this name (or ID), or None: one request, whatever the number of policies.

    Listing every policy to find one made each reconcile O(ResultBackends) in
    Consul and the whole of a burst quadratic.
    """
    paths = [f"/v1/acl/policy/name/{urllib.parse.quote(id_or_name, safe='')}"]
    if _UUID_RE.fullmatch(id_or_name):
        paths.append(f"/v1/acl/policy/{id_or_name}")
    with admin.call(f"reading ACL policy {id_or_name!r}"):
        for path in paths:
            policy: dict[str, Any] | None = admin.client.http.get(
                CB.json(allow_404=True), path, headers=admin.client.prepare_headers()
            )
            if policy is not None:
                return policy
    return None


def _write_policy(
    admin: ConsulAdmin,
    policy_id: str | None,
    name: str,
    description: str,
    rules: str,
    *,
    exists_ok: bool = False,
) -> dict[str, Any] | None:
    """Create (no `policy_id`) or update the policy; None when `exists_ok` and
    a policy of that name exists already (Consul: HTTP 500 "already exists")."""
    # py-consul's policy.create/update json.dumps() the rules a second time,
    # which turns HCL text into a JSON string literal Consul cannot parse; the
    # body is therefore built here and sent through py-consul's own transport.
    body: dict[str, Any] = {"Name": name, "Description": description, "Rules": rules}
    path = "/v1/acl/policy"
    if policy_id is not None:
        body["ID"] = policy_id
        path = f"/v1/acl/policy/{policy_id}"
    verb = "updating" if policy_id else "creating"
    try:
        written: dict[str, Any] = admin.client.http.put(
            CB.json(), path, headers=admin.client.prepare_headers(), data=json.dumps(body)
        )
    except (consul.ConsulException, requests.RequestException) as exc:
        if exists_ok and isinstance(exc, consul.ConsulException) and "already exists" in str(exc):
            return None
        raise map_error(
            exc,
            action=f"{verb} ACL policy {name!r}",
            where=admin.url,
            denied_reason=REASON_FORBIDDEN,
            invalid_message=(
                f"Consul rejected ACL policy {name!r}; policy names allow only letters, "
                "digits, '-', '_' and a single '/', at most 128 characters"
            ),
        ) from None
    return written


def _conflict(kind: str, name: str, owner: Owner, found: str | None) -> NoReturn:
    other = parse_owner(found)
    held_by = (
        f"ResultBackend {other.namespace}/{other.name} (uid {other.uid})"
        if other
        else "something else"
    )
    raise BackendError(
        REASON_CONFLICT,
        f"Consul {kind} {name!r} already exists and belongs to {held_by}, "
        f"not to ResultBackend {owner.namespace}/{owner.name} (uid {owner.uid})",
        transient=False,
    )


def _rules_for(key_prefix: str) -> str:
    try:
        return policy_rules(key_prefix)
    except ValueError as exc:
        raise BackendError(REASON_INVALID, str(exc), transient=False) from None


def create_policy(admin: ConsulAdmin, name: str, key_prefix: str, owner: Owner) -> str | None:
    """Create the worker policy without looking first: its ID, or None if the name is taken.

    For a ResultBackend of which nothing is known to exist yet (no worker
    Secret): one request where `ensure_policy` makes two. Consul checks
    acl:write before anything else, so a management token that may not write
    fails here as clearly as `check_management` would say it.
    """
    created = _write_policy(
        admin, None, name, owner.describe(), _rules_for(key_prefix), exists_ok=True
    )
    if created is None:
        return None
    log.info("created Consul ACL policy %s", name)
    return str(created["ID"])


def ensure_policy(admin: ConsulAdmin, name: str, key_prefix: str, owner: Owner) -> tuple[str, bool]:
    """The worker policy exists with our rules and marker: (policy ID, wrote)."""
    rules = _rules_for(key_prefix)
    description = owner.describe()
    existing = _find_policy(admin, name)
    if existing is None:
        created = _write_policy(admin, None, name, description, rules)
        assert created is not None
        log.info("created Consul ACL policy %s", name)
        return str(created["ID"]), True
    if not owned_by(existing.get("Description"), owner):
        _conflict("ACL policy", name, owner, existing.get("Description"))
    policy_id = str(existing["ID"])
    if existing.get("Rules") == rules and existing.get("Description") == description:
        return policy_id, False
    _write_policy(admin, policy_id, name, description, rules)
    log.info("updated Consul ACL policy %s", name)
    return policy_id, True


def remove_policy(admin: ConsulAdmin, policy_id_or_name: str, owner: Owner) -> bool:
    """Delete the policy if it is ours; missing or someone else's: nothing to do (False).

    Our tokens on it go first: Consul keeps a token whose policy is deleted,
    linked to nothing, where no later policy filter finds it.
    """
    stub = _find_policy(admin, policy_id_or_name)
    if stub is None:
        return False
    if not owned_by(stub.get("Description"), owner):
        log.warning(
            "not deleting Consul ACL policy %s: it is not owned by ResultBackend %s/%s",
            stub.get("Name"),
            owner.namespace,
            owner.name,
        )
        return False
    remove_owned_tokens(admin, str(stub["ID"]), owner)
    with admin.call(f"deleting ACL policy {stub.get('Name')!r}"):
        admin.client.acl.policy.delete(stub["ID"])
    log.info("deleted Consul ACL policy %s", stub.get("Name"))
    return True


# --- tokens -----------------------------------------------------------------


@dataclass(frozen=True)
class ConsulToken:
    """One of our worker tokens as Consul lists it. The SecretID stays out of repr."""

    accessor_id: str
    description: str
    policy_ids: tuple[str, ...]
    exclusive: bool  # linked to exactly our policy and nothing else
    create_index: int
    modify_index: int
    secret_id: str | None = field(default=None, repr=False, compare=False)


def _token_from(listed: dict[str, Any], policy_id: str) -> ConsulToken:
    policy_ids = tuple(str(p.get("ID")) for p in listed.get("Policies") or ())
    extra = any(
        listed.get(key)
        for key in ("Roles", "ServiceIdentities", "NodeIdentities", "TemplatedPolicies")
    )
    secret = listed.get("SecretID")
    return ConsulToken(
        accessor_id=str(listed["AccessorID"]),
        description=str(listed.get("Description") or ""),
        policy_ids=policy_ids,
        exclusive=policy_ids == (policy_id,) and not extra,
        create_index=int(listed.get("CreateIndex") or 0),
        modify_index=int(listed.get("ModifyIndex") or 0),
        secret_id=secret if secret and secret != _REDACTED else None,
    )


def find_tokens(admin: ConsulAdmin, policy_id: str, owner: Owner) -> list[ConsulToken]:
    """Our tokens linked to the policy, oldest first."""
    with admin.call("listing ACL tokens of the worker policy"):
        listed = admin.client.acl.token.list(policy=policy_id) or []
    ours = [_token_from(t, policy_id) for t in listed if owned_by(t.get("Description"), owner)]
    return sorted(ours, key=lambda t: (t.create_index, t.accessor_id))


def _secret_of(admin: ConsulAdmin, token: ConsulToken) -> str:
    if token.secret_id is not None:
        return token.secret_id
    try:
        with admin.call(f"reading ACL token {token.accessor_id}"):
            read = admin.client.acl.token.read(token.accessor_id)
    except BackendError as exc:
        if exc.reason != REASON_ADMIN_AUTH:
            raise
        # 403 "ACL not found" here most likely means the token vanished after it
        # was listed (the management token was just used for the listing).
        raise BackendError(
            REASON_BACKEND,
            f"Consul at {admin.url}: ACL token {token.accessor_id} disappeared while "
            "being read; retrying",
            transient=True,
        ) from None
    if not read or not read.get("SecretID") or read["SecretID"] == _REDACTED:
        raise BackendError(
            REASON_FORBIDDEN,
            f"Consul at {admin.url}: ACL token {token.accessor_id} was listed but its secret "
            'could not be read; the management token needs acl = "write"',
            transient=True,
        )
    return str(read["SecretID"])


def create_token(admin: ConsulAdmin, policy_id: str, owner: Owner) -> tuple[str, str]:
    """A new worker token linked to the policy alone: (AccessorID, SecretID)."""
    with admin.call("creating the worker ACL token"):
        created = admin.client.acl.token.create(
            policies_id=[policy_id], description=owner.describe()
        )
    log.info("created Consul ACL token %s", created["AccessorID"])
    return str(created["AccessorID"]), str(created["SecretID"])


def remove_token(admin: ConsulAdmin, accessor_id: str) -> bool:
    """Delete a token by AccessorID; False when it is already gone.

    Deleting directly, without reading first: Consul answers a read of a
    missing token with the same 403 "token does not exist: ACL not found" it
    gives an unknown caller token, while a delete of a missing token is a 404.
    """
    with admin.call(f"deleting ACL token {accessor_id}"):
        deleted = bool(admin.client.acl.token.delete(accessor_id))
    if deleted:
        log.info("deleted Consul ACL token %s", accessor_id)
    return deleted


def remove_owned_tokens(admin: ConsulAdmin, policy_id: str, owner: Owner) -> bool:
    """Delete every token of ours linked to the policy (the deletion path)."""
    wrote = False
    for token in find_tokens(admin, policy_id, owner):
        wrote = remove_token(admin, token.accessor_id) or wrote
    return wrote


def ensure_token(
    admin: ConsulAdmin,
    policy_id: str,
    owner: Owner,
    known_secret: str | None,
    keep: Collection[str] = (),
    keep_others: bool = False,
) -> tuple[str, str, bool]:
    """Exactly one worker token of ours on the policy: (AccessorID, SecretID, wrote).

    The token whose SecretID is `known_secret` (what the Secret already holds)
    wins; otherwise the oldest of ours. Other tokens of ours on the policy are
    crash leftovers and are deleted, except AccessorIDs in `keep` (an old token
    a rotation in progress revokes later), or all of them with `keep_others`
    (pods may still use a superseded token). A token of ours with extra links
    (roles, other policies) is not the one we made and is replaced.
    """
    tokens = find_tokens(admin, policy_id, owner)
    candidates = [t for t in tokens if t.exclusive]
    chosen: tuple[ConsulToken, str] | None = None
    if known_secret is not None:
        for token in candidates:
            secret = _secret_of(admin, token)
            if secret == known_secret:
                chosen = (token, secret)
                break
    if chosen is None and candidates:
        chosen = (candidates[0], _secret_of(admin, candidates[0]))

    wrote = False
    if chosen is None:
        accessor_id, secret_id = create_token(admin, policy_id, owner)
        wrote = True
    else:
        accessor_id, secret_id = chosen[0].accessor_id, chosen[1]
        if chosen[0].description != owner.describe():
            _mark_token(admin, accessor_id, policy_id, owner)  # adopted: now its owner's
            wrote = True
    for token in tokens:
        if token.accessor_id != accessor_id and not keep_others and token.accessor_id not in keep:
            wrote = remove_token(admin, token.accessor_id) or wrote
    return accessor_id, secret_id, wrote


def _mark_token(admin: ConsulAdmin, accessor_id: str, policy_id: str, owner: Owner) -> None:
    """Name `owner` in the token's Description (its secret and policy stay as they are)."""
    body = {
        "AccessorID": accessor_id,
        "Description": owner.describe(),
        "Policies": [{"ID": policy_id}],
    }
    with admin.call(f"updating ACL token {accessor_id}"):
        admin.client.http.put(
            CB.json(),
            f"/v1/acl/token/{accessor_id}",
            headers=admin.client.prepare_headers(),
            data=json.dumps(body),
        )
    log.info("marked Consul ACL token %s as %s/%s's", accessor_id, owner.namespace, owner.name)


# --- KV ---------------------------------------------------------------------


def remove_keys(admin: ConsulAdmin, key_prefix: str) -> bool:
    """Delete everything under `<keyPrefix>/`; False when nothing was there.

    The trailing slash matters: `celery/a/` never matches `celery/ab/...`.
    """
    try:
        check_key_prefix(key_prefix)
    except ValueError as exc:
        raise BackendError(REASON_INVALID, str(exc), transient=False) from None
    prefix = f"{key_prefix}/"
    with admin.call(f"listing keys under {prefix!r}"):
        _, keys = admin.client.kv.get(prefix, keys=True)
    if not keys:
        return False
    with admin.call(f"deleting keys under {prefix!r}"):
        admin.client.kv.delete(prefix, recurse=True)
    log.info("deleted %d Consul keys under %s", len(keys), prefix)
    return True


# --- checks -----------------------------------------------------------------


def check_management(admin: ConsulAdmin) -> None:
    """Fail early, with a clear reason, when the management token cannot write ACLs.

    `token/self` proves the token exists. A policy without a name proves
    acl:write without writing anything: Consul checks acl:write before it
    validates the policy, so a token that may write gets "no Name is set"
    (HTTP 500) and one that may not gets HTTP 403. The probe is skipped for
    tokens holding the builtin global-management policy, since it leaves an
    error line in the agent's log.
    """
    with admin.call("reading the management token (acl/token/self)"):
        own = admin.client.acl.token.read_self() or {}
    if any(p.get("ID") == GLOBAL_MANAGEMENT_POLICY_ID for p in own.get("Policies") or ()):
        return
    try:
        admin.client.http.put(
            CB.json(),
            "/v1/acl/policy",
            headers=admin.client.prepare_headers(),
            data=json.dumps({"Name": ""}),
        )
    except consul.ConsulException as exc:
        status = _status_of(exc)
        if status is not None and status >= 500 and "no Name is set" in str(exc):
            return
        raise map_error(
            exc, action="checking acl:write", where=admin.url, denied_reason=REASON_FORBIDDEN
        ) from None
    except requests.RequestException as exc:
        raise map_error(
            exc, action="checking acl:write", where=admin.url, denied_reason=REASON_FORBIDDEN
        ) from None
    raise BackendError(
        REASON_BACKEND,
        f"Consul at {admin.url}: checking acl:write failed: a policy without a name was accepted",
        transient=True,
    )


def agent_version(admin: ConsulAdmin) -> str:
    """The agent's version (`/v1/agent/version`; an agent without it: `agent/self`),
    once `/v1/status/leader` showed the cluster has a leader (no write succeeds without)."""
    headers = admin.client.prepare_headers()
    with admin.call("asking for the cluster's leader"):
        leader = admin.client.http.get(CB.json(), "/v1/status/leader", headers=headers)
    if not leader:
        raise BackendError(
            REASON_UNREACHABLE, f"Consul at {admin.url} has no cluster leader", transient=True
        )
    with admin.call("reading the agent's version"):
        answer = admin.client.http.get(
            CB.json(allow_404=True), "/v1/agent/version", headers=headers
        )
        if answer is None:
            config = (admin.client.agent.self() or {}).get("Config") or {}
            return str(config.get("Version") or "")
    return str(answer.get("HumanVersion") or "")


def _now(fn: Callable[[], None]) -> None:
    fn()


def check_worker(
    url: str,
    token: str,
    key_prefix: str,
    timeout: float = DEFAULT_TIMEOUT,
    cleanup: Callable[[Callable[[], None]], object] | None = None,
) -> None:
    """Do what a Celery worker does, as the worker token.

    Create a TTL session (behaviour delete), write a key of that session's own
    under the prefix acquired by it, destroy the session (which deletes the
    key). The key is not read back: Consul's `write` on a key prefix includes
    `read`, and no rule can allow the one without the other, so the write
    answers for both. `cleanup` runs the destroy (e.g. a thread pool's submit:
    the result is known once the key is written); None runs it here.
    """
    try:
        check_key_prefix(key_prefix)
        address = parse_agent_url(url)
    except ValueError as exc:
        raise BackendError(REASON_INVALID, str(exc), transient=False) from None
    client = _client(address, token, timeout)
    action = "the worker check"
    try:
        action = "creating a session as the worker"
        # lock_delay 0: the next check may take the key as soon as this
        # session is gone (Consul's default would refuse it for 15 s).
        session_id = client.session.create(
            name=CHECK_SESSION_NAME,
            behavior="delete",
            ttl=CHECK_SESSION_TTL_SECONDS,
            lock_delay=0,
        )
        # One key per check: checks never contend, even while a destroy is pending.
        key = f"{key_prefix}/{CHECK_KEY}-{session_id[:8]}"
        try:
            action = f"writing {key!r} as the worker"
            acquired = client.kv.put(key, "ok", acquire=session_id)
            if not acquired:
                raise BackendError(
                    REASON_BACKEND,
                    f"Consul at {address.url}: the worker could not acquire {key!r} "
                    "(another check holds it?)",
                    transient=True,
                )
        finally:
            # Behaviour "delete": destroying the session deletes the key with it
            # (one Raft write less than deleting it first), and should the
            # destroy fail, the TTL's expiry does the same.
            def destroy() -> None:
                with contextlib.suppress(consul.ConsulException, requests.RequestException):
                    client.session.destroy(session_id)

            (cleanup or _now)(destroy)
    except (consul.ConsulException, requests.RequestException) as exc:
        raise map_error(
            exc, action=action, where=address.url, denied_reason=REASON_WORKER_AUTH
        ) from None


# --- the store ----------------------------------------------------------------------


def secret_data(url: str, key_prefix: str, one_client: bool, token: str) -> dict[str, str]:
    """The worker Secret's data (Service Binding keys, Celery's URL and the token)."""
    host, port = host_port(url, DEFAULT_PORT)
    return {
        "type": "consul",
        "provider": PROVIDER,
        "uri": worker_uri(url, key_prefix, one_client),
        "host": host,
        "port": str(port),
        "keyPrefix": key_prefix,
        "token": token,
    }


class ConsulStore:
    """A Consul cluster with ACLs: a policy for the key prefix and sessions, a token."""

    type = "consul"
    api_kind = "Consul"
    # A rotation makes a new token; pods still running with the old one keep it
    # until they rolled (or the grace passed).
    keeps_superseded = True
    # Celery's Consul URL has no place for a token: py-consul reads it from here.
    extra_env: Mapping[str, str] = {"CONSUL_HTTP_TOKEN": "token"}

    def admin_secret(self, store: ResultStore, namespace: str) -> AdminSecretRef:
        assert store.spec.consul is not None
        ref = store.spec.consul.token_secret_ref
        return AdminSecretRef(namespace, ref.name, {"token": ref.key})

    def check_admin(self, url: str, admin: Mapping[str, str]) -> str:
        conn = ConsulAdmin(url, admin["token"], timeout=SETTINGS.backend_timeout)
        version = agent_version(conn)
        check_management(conn)
        return version

    def provision(
        self,
        rb: ResultBackend,
        admin: Mapping[str, str],
        existing: Mapping[str, str] | None,
        *,
        rotate: bool,
        superseded: Superseded,
        io: concurrent.futures.Executor,
    ) -> Provisioned:
        """Policy and token; `superseded` says whether tokens a rotation replaced
        must be kept for now (pods may still use them) and, if not, why they may go.

        With no worker Secret yet (`existing` None) nothing is expected in Consul:
        the policy is created without looking first and, when that succeeds, the
        token too (a policy made this instant has no tokens to look for).
        """
        url, one_client = rb.url, rb.consul_options.one_client
        conn = ConsulAdmin(url, admin["token"], timeout=SETTINGS.backend_timeout)
        owner, prefix, name = Owner.of(rb), rb.consul_key_prefix, rb.consul_policy_name
        revoked = None
        policy_id = None
        if existing is None and not rotate:
            policy_id = create_policy(conn, name, prefix, owner)
        if policy_id is not None:
            accessor, token = create_token(conn, policy_id, owner)
            writes = 2
        else:
            check_management(conn)
            policy_id, wrote = ensure_policy(conn, name, prefix, owner)
            writes = int(wrote)
            known = (existing or {}).get("token") or None
            if rotate:
                # The old token stays valid until the workers run with the new one.
                accessor, token = create_token(conn, policy_id, owner)
                writes += 1
            else:
                accessor, token, wrote = ensure_token(
                    conn, policy_id, owner, known, keep_others=superseded.keep
                )
                writes += int(wrote)
                if wrote and token == known:
                    revoked = f"revoked superseded worker token(s): {superseded.why}"
        return Provisioned(
            secret_data=secret_data(url, prefix, one_client, token),
            fields={
                "url": worker_uri(url, prefix, one_client),
                "consul": {"keyPrefix": prefix, "policyID": policy_id, "tokenAccessorID": accessor},
            },
            writes=writes,
            revoked=revoked,
            pending=rotate or superseded.keep,
        )

    def check_worker(
        self, rb: ResultBackend, secret_data: Mapping[str, str], io: concurrent.futures.Executor
    ) -> None:
        # The session's destroy need not hold up the answer: it goes to `io`.
        check_worker(
            rb.url,
            secret_data.get("token", ""),
            secret_data.get("keyPrefix", ""),
            timeout=SETTINGS.backend_timeout,
            cleanup=io.submit,
        )

    def remove(self, rb: ResultBackend, admin: Mapping[str, str]) -> str:
        conn = ConsulAdmin(rb.url, admin["token"], timeout=SETTINGS.backend_timeout)
        # remove_policy also revokes our tokens linked to it (a token whose policy is
        # gone would otherwise linger, linked to nothing).
        remove_policy(conn, rb.consul_policy_name, Owner.of(rb))
        remove_keys(conn, rb.consul_key_prefix)
        return f"deleted {self.describe(rb)}"

    def describe(self, rb: ResultBackend) -> str:
        return f"keys under {rb.consul_key_prefix}/, policy {rb.consul_policy_name} and its token"


STORE = register(ConsulStore())
