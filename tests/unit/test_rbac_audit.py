"""devstack/rbac-audit's logic on hand-written audit events and rules (no servers).

`make integration` runs the script itself over the audit log of the run.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import DEFAULT_OPERATOR_RELEASE, OPERATOR_NAMESPACE

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "devstack" / "rbac-audit"
SA = "system:serviceaccount:resultbackend-system:rbo-resultbackend-operator"


def _load() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("rbac_audit", str(SCRIPT))
    spec = importlib.util.spec_from_loader("rbac_audit", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["rbac_audit"] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


audit = _load()


def event(
    verb: str,
    resource: str | None,
    *,
    group: str = "",
    namespace: str | None = "ns1",
    subresource: str | None = None,
    user: str = SA,
    code: int = 200,
    decision: str = "allow",
    audit_id: str | None = None,
    stage: str = "ResponseComplete",
    at: str = "2026-01-01T10:00:00.000000Z",
    uri: str = "/apis/x",
    message: str = "",
) -> str:
    entry: dict[str, Any] = {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "Metadata",
        "auditID": audit_id or f"id-{verb}-{resource}-{namespace}-{subresource}-{user}-{at}",
        "stage": stage,
        "requestURI": uri,
        "verb": verb,
        "user": {"username": user, "groups": ["system:serviceaccounts"]},
        "responseStatus": {"metadata": {}, "code": code},
        "requestReceivedTimestamp": at,
        "annotations": {"authorization.k8s.io/decision": decision},
    }
    if message:
        entry["responseStatus"]["message"] = message
    if resource is not None:
        ref: dict[str, Any] = {"resource": resource, "apiVersion": "v1"}
        if group:
            ref["apiGroup"] = group
        if namespace:
            ref["namespace"] = namespace
        if subresource:
            ref["subresource"] = subresource
        entry["objectRef"] = ref
    return json.dumps(entry, separators=(",", ":"))


def test_defaults_are_the_identity_the_tests_give_the_operator() -> None:
    assert audit.DEFAULT_RELEASE == DEFAULT_OPERATOR_RELEASE
    assert audit.DEFAULT_NAMESPACE == OPERATOR_NAMESPACE


def test_collect_counts_each_request_once_as_group_resource_verb() -> None:
    lines = [
        event(
            "watch",
            "deployments",
            group="apps",
            namespace=None,
            audit_id="w",
            stage="ResponseStarted",
        ),
        event("watch", "deployments", group="apps", namespace=None, audit_id="w"),
        event("list", "deployments", group="apps", namespace="ns1"),
        event("patch", "resultbackends", group="resultstores.io", subresource="status"),
        event("get", "secrets", at="2026-01-01T10:00:01.000000Z"),
        event("get", "secrets", at="2026-01-01T10:00:02.000000Z"),
    ]
    usage = audit.collect(lines, SA)
    assert usage.requests == {
        ("apps", "deployments", "watch"): 1,
        ("apps", "deployments", "list"): 1,
        ("resultstores.io", "resultbackends/status", "patch"): 1,
        ("", "secrets", "get"): 2,
    }
    assert usage.cluster_wide == {("apps", "deployments", "watch")}
    assert ("apps", "deployments", "list") in usage.namespaced
    assert not usage.denied


def test_collect_keeps_only_the_user_and_the_window() -> None:
    admin_as_sa = json.loads(event("get", "secrets", user="devstack-admin"))
    admin_as_sa["impersonatedUser"] = {"username": SA}
    lines = [
        event("get", "secrets", user="devstack-admin"),
        json.dumps(admin_as_sa),
        event("get", "secrets", user=SA + "-other"),
        event("list", "secrets", at="2026-01-01T09:59:59.999999Z"),
        event("create", "secrets", at="2026-01-01T10:00:00.000000Z"),
    ]
    usage = audit.collect(lines, SA, audit.parse_time("2026-01-01T10:00:00.000000Z"))
    assert usage.requests == {("", "secrets", "create"): 1}


def test_collect_tells_rbac_denials_from_admission_refusals_and_discovery() -> None:
    lines = [
        event("list", "secrets", code=403, decision="forbid"),
        event(
            "create",
            "events",
            namespace="t-1234",
            code=403,
            message='events "kopf-event-abc" is forbidden: unable to create new content '
            "in namespace t-1234 because it is being terminated",
        ),
        event("get", None, uri="/apis/apps/v1?timeout=32s"),
    ]
    usage = audit.collect(lines, SA)
    assert usage.denied == {("", "secrets", "list"): 1}
    assert ("", "secrets", "list") not in usage.requests
    assert usage.requests == {("", "events", "create"): 1}
    ((perm, message),) = usage.refused
    assert perm == ("", "events", "create")
    assert "t-1234" not in message
    assert "<namespace>" in message
    assert usage.non_resource == {"/apis/apps/v1": 1}
    assert usage.total == 3


def test_collect_flags_secret_lists_and_watches_beyond_the_operators_own() -> None:
    own = "/api/v1/secrets?labelSelector=app.kubernetes.io%2Fmanaged-by%3Dresultbackend-operator"
    usage = audit.collect(
        [
            event("list", "secrets", namespace=None, uri=own),
            event(
                "watch",
                "secrets",
                namespace=None,
                uri=own + "&watch=true",
                at="2026-01-01T10:00:01Z",
            ),
            event(
                "list", "secrets", uri="/api/v1/namespaces/ns1/secrets", at="2026-01-01T10:00:02Z"
            ),
            event("get", "secrets", uri="/api/v1/namespaces/ns1/secrets/admin"),
        ],
        SA,
    )
    assert usage.unfiltered_secrets == {("list", "/api/v1/namespaces/ns1/secrets"): 1}


def test_audit_files_include_rotated_backups_written_since(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    old = tmp_path / "audit-2026-01-01T09-00-00.000.log"
    recent = tmp_path / "audit-2026-01-01T10-30-00.000.log"
    for path in (log, old, recent):
        path.write_text("")
    since = audit.parse_time("2026-01-01T10:00:00Z")
    os.utime(old, (since.timestamp() - 60, since.timestamp() - 60))
    os.utime(recent, (since.timestamp() + 60, since.timestamp() + 60))
    os.utime(log, (since.timestamp() + 120, since.timestamp() + 120))
    assert audit.audit_files(log, since) == [recent, log]
    assert audit.audit_files(log, None) == [old, recent, log]


def test_expand_and_resource_names() -> None:
    rules = [
        {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": ["x"]},
    ]
    assert audit.expand(rules) == {
        ("apps", "deployments", "patch"),
        ("apps", "statefulsets", "patch"),
        ("", "configmaps", "get"),
    }
    assert audit.restricted(rules) == {("", "configmaps", "get")}


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ({"apiGroups": ["*"], "resources": ["secrets"], "verbs": ["get"]}, "`*` in apiGroups"),
        ({"apiGroups": ["apps"], "resources": ["*"], "verbs": ["get"]}, "`*` in resources"),
        ({"apiGroups": [""], "resources": ["secrets"], "verbs": ["*"]}, "`*` in verbs"),
        ({"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]}, "pods/exec"),
        ({"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}, "nodes"),
        ({"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}, "pods"),
        ({"apiGroups": [""], "resources": ["namespaces"], "verbs": ["create"]}, "cluster-wide"),
        (
            {
                "apiGroups": ["apiextensions.k8s.io"],
                "resources": ["customresourcedefinitions"],
                "verbs": ["patch"],
            },
            "cluster-wide write",
        ),
        (
            {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["bind"]},
            "escalation",
        ),
        ({"nonResourceURLs": ["/metrics"], "verbs": ["get"]}, "nonResourceURLs"),
    ],
)
def test_hygiene_rejects_broad_and_dangerous_rules(rule: dict[str, Any], problem: str) -> None:
    problems = audit.hygiene([rule])
    assert any(problem in p for p in problems), problems


def test_hygiene_accepts_the_operators_kind_of_rules() -> None:
    rules = [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "patch"]},
        {
            "apiGroups": ["kopf.dev"],
            "resources": ["clusterkopfpeerings"],
            "verbs": ["get", "list", "watch", "patch"],
        },
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["list", "watch"],
        },
    ]
    assert audit.hygiene(rules) == []


def _usage(*lines: str) -> Any:
    return audit.collect(list(lines), SA)


def test_table_is_ok_only_when_used_equals_granted() -> None:
    usage = _usage(event("get", "secrets"), event("create", "secrets"))
    granted = {("", "secrets", "get"), ("", "secrets", "create")}
    lines, ok = audit.table(usage, granted, set())
    assert ok
    assert lines[0].split() == [
        "API",
        "group",
        "resource",
        "verb",
        "requests",
        "scope",
        "chart",
        "result",
    ]

    _, ok = audit.table(usage, granted | {("", "secrets", "patch")}, set())
    assert not ok, "a granted permission nobody used must fail"

    lines, ok = audit.table(usage, {("", "secrets", "get")}, set())
    assert not ok, "a used permission the chart lacks must fail"
    assert any("NOT GRANTED" in line for line in lines)


def test_table_fails_on_denials_and_accepts_admission_only_permissions() -> None:
    (admission_only,) = audit.ADMISSION_ONLY
    usage = _usage(event("get", "secrets"))
    _, ok = audit.table(usage, {("", "secrets", "get"), admission_only}, set())
    assert ok

    denied = _usage(event("get", "secrets"), event("list", "secrets", code=403, decision="forbid"))
    lines, ok = audit.table(denied, {("", "secrets", "get")}, set())
    assert not ok
    assert any("DENIED" in line for line in lines)


def test_parse_time_reads_the_audit_logs_and_makes_timestamps() -> None:
    assert audit.parse_time("2026-11-23T13:03:46.434438Z") == datetime.fromisoformat(
        "2026-11-23T13:03:46.434438+00:00"
    )
