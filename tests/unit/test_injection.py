"""Table-driven tests of the injection module: hash, env, conflicts, SSA bodies."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from resultbackend_operator.api import (
    CONFIG_HASH_ANNOTATION,
    FIELD_MANAGER,
    INJECTED_BY_ANNOTATION,
    InvalidSpec,
)
from resultbackend_operator.backends import STORES
from resultbackend_operator.injection import (
    apply_patch,
    config_hash,
    desired_env,
    encode_secret_data,
    find_conflicts,
    injected_containers,
    is_injected_by,
    needs_apply,
    owned_env,
    owns_fields,
    release_patch,
    selected_containers,
    with_type_meta,
    workload_status,
)

RB = "orders"
SECRET = "orders-result-backend"
URL_ENV = "CELERY_RESULT_BACKEND"
HASH = "0123456789abcdef0123456789abcdef"
COUCH_ENV = desired_env(SECRET, URL_ENV, STORES["couchdb"].extra_env)
CONSUL_ENV = desired_env(SECRET, URL_ENV, STORES["consul"].extra_env)
SECRET_LITERAL = "s3cr3t-literal-do-not-log"


def ours(name: str = URL_ENV, key: str = "uri", secret: str = SECRET) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def literal(name: str, value: str = SECRET_LITERAL) -> dict[str, Any]:
    return {"name": name, "value": value}


def workload(
    kind: str = "Deployment",
    containers: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    annotations: Mapping[str, str] | None = None,
    template_annotations: Mapping[str, str] | None = None,
    init_containers: Sequence[str] = (),
    managed_fields: Sequence[Mapping[str, Any]] = (),
    name: str = "orders-worker",
) -> dict[str, Any]:
    """A workload as the API server returns it; containers: name -> env."""
    if containers is None:
        containers = {"worker": [literal("LOG_LEVEL", "info")]}
    metadata: dict[str, Any] = {"name": name, "namespace": "shop", "labels": {"app": name}}
    if annotations:
        metadata["annotations"] = dict(annotations)
    if managed_fields:
        metadata["managedFields"] = [dict(m) for m in managed_fields]
    template_meta: dict[str, Any] = {"labels": {"app": name}}
    if template_annotations:
        template_meta["annotations"] = dict(template_annotations)
    pod_spec: dict[str, Any] = {
        "containers": [
            {"name": cname, "image": "celery:5", **({"env": list(env)} if env else {})}
            for cname, env in containers.items()
        ]
    }
    if init_containers:
        pod_spec["initContainers"] = [
            {"name": n, "image": "busybox", "env": []} for n in init_containers
        ]
    spec: dict[str, Any] = {
        "replicas": 2,
        "selector": {"matchLabels": {"app": name}},
        "template": {"metadata": template_meta, "spec": pod_spec},
    }
    if kind == "StatefulSet":
        spec["serviceName"] = name
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": metadata, "spec": spec}


def managed_entry(
    containers: Mapping[str, Sequence[str]],
    manager: str = FIELD_MANAGER,
    operation: str = "Apply",
    subresource: str | None = None,
) -> dict[str, Any]:
    """A managedFields entry in the shape the API server writes; containers: name -> env."""

    def key(name: str) -> str:
        return "k:" + json.dumps({"name": name}, separators=(",", ":"))

    entry: dict[str, Any] = {
        "manager": manager,
        "operation": operation,
        "apiVersion": "apps/v1",
        "time": "2026-11-23T10:00:00Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:metadata": {"f:annotations": {f"f:{INJECTED_BY_ANNOTATION}": {}}},
            "f:spec": {
                "f:template": {
                    "f:metadata": {"f:annotations": {f"f:{CONFIG_HASH_ANNOTATION}": {}}},
                    "f:spec": {
                        "f:containers": {
                            key(c): {
                                ".": {},
                                "f:name": {},
                                "f:env": {
                                    key(e): {".": {}, "f:name": {}, "f:valueFrom": {}} for e in envs
                                },
                            }
                            for c, envs in containers.items()
                        }
                    },
                }
            },
        },
    }
    if subresource:
        entry["subresource"] = subresource
    return entry


def injected(
    containers: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    env: Sequence[Mapping[str, Any]] = COUCH_ENV,
    config_hash_value: str = HASH,
    owned: Mapping[str, Sequence[str]] | None = None,
    kind: str = "Deployment",
) -> dict[str, Any]:
    """A workload that already carries our injection (and our managedFields)."""
    if containers is None:
        containers = {"worker": [literal("LOG_LEVEL", "info"), *env]}
    if owned is None:
        owned = {c: [e["name"] for e in env] for c in containers}
    return workload(
        kind=kind,
        containers=containers,
        annotations={INJECTED_BY_ANNOTATION: RB},
        template_annotations={CONFIG_HASH_ANNOTATION: config_hash_value},
        managed_fields=[managed_entry(owned)],
    )


def simulate_apply(live: Mapping[str, Any], body: Mapping[str, Any]) -> dict[str, Any]:
    """The object after a server-side apply of `body` (list-maps merged by name).

    Only what our bodies touch: annotations, the containers list-map and each
    container's env list-map; our managedFields entry is replaced accordingly.
    """
    out = copy.deepcopy(dict(live))
    meta = out["metadata"]
    meta.setdefault("annotations", {}).update(body["metadata"].get("annotations", {}))
    template = out["spec"]["template"]
    body_template = body.get("spec", {}).get("template", {})
    template["metadata"].setdefault("annotations", {}).update(
        body_template.get("metadata", {}).get("annotations", {})
    )
    owned: dict[str, list[str]] = {}
    for bc in body_template.get("spec", {}).get("containers", []):
        live_c = next(c for c in template["spec"]["containers"] if c["name"] == bc["name"])
        env = live_c.setdefault("env", [])
        for entry in bc["env"]:
            env[:] = [e for e in env if e["name"] != entry["name"]] + [entry]
        owned[bc["name"]] = [e["name"] for e in bc["env"]]
    others = [m for m in meta.get("managedFields", []) if m["manager"] != FIELD_MANAGER]
    meta["managedFields"] = [*others, managed_entry(owned)]
    return out


# --- config_hash -------------------------------------------------------------------

DATA = {"type": "Y291Y2hkYg==", "uri": "Y291Y2hkYjovL3U6cEBoOjU5ODQvZA==", "port": "NTk4NA=="}


@pytest.mark.parametrize(
    ("left", "right", "equal"),
    [
        pytest.param(DATA, dict(reversed(list(DATA.items()))), True, id="key-order-ignored"),
        pytest.param(DATA, dict(DATA), True, id="same-data-same-hash"),
        pytest.param(DATA, {**DATA, "uri": "b3RoZXI="}, False, id="changed-value-changes-hash"),
        pytest.param(DATA, {**DATA, "extra": ""}, False, id="added-key-changes-hash"),
        pytest.param({"a": "bc"}, {"ab": "c"}, False, id="key-value-boundary-is-unambiguous"),
        pytest.param({"a": "b"}, {"b": "a"}, False, id="keys-and-values-not-interchangeable"),
        pytest.param({}, {"a": ""}, False, id="empty-key-counts"),
    ],
)
def test_config_hash_depends_only_on_content(
    left: Mapping[str, str], right: Mapping[str, str], equal: bool
) -> None:
    assert (config_hash(left) == config_hash(right)) is equal


def test_config_hash_is_32_lowercase_hex_chars() -> None:
    value = config_hash(DATA)
    assert len(value) == 32
    assert set(value) <= set("0123456789abcdef")


def test_config_hash_is_pinned_so_an_operator_upgrade_does_not_roll_workers() -> None:
    # Changing the algorithm would change every workload's pod template on upgrade.
    assert config_hash({"uri": "dQ=="}) == "ace68811a82a0735474419e83fae846d"


@pytest.mark.parametrize(
    "plain",
    [
        {"uri": "couchdb://u:p@h:5984/d", "type": "couchdb"},
        {"token": "8f2c-ünï", "uri": "consul://h:8500/celery/x?one_client=1"},
        {},
    ],
)
def test_encoded_secret_data_hashes_as_the_apiserver_stores_it(
    plain: Mapping[str, str],
) -> None:

    stored = {k: base64.b64encode(v.encode("utf-8")).decode("ascii") for k, v in plain.items()}
    assert encode_secret_data(plain) == stored
    assert config_hash(encode_secret_data(plain)) == config_hash(stored)


# --- desired_env -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rb_type", "url_env", "expected"),
    [
        pytest.param(
            "couchdb",
            "CELERY_RESULT_BACKEND",
            [ours("CELERY_RESULT_BACKEND", "uri")],
            id="couchdb-url-only",
        ),
        pytest.param(
            "couchdb", "RESULTS_URL", [ours("RESULTS_URL", "uri")], id="couchdb-custom-env-name"
        ),
        pytest.param(
            "consul",
            "CELERY_RESULT_BACKEND",
            [ours("CELERY_RESULT_BACKEND", "uri"), ours("CONSUL_HTTP_TOKEN", "token")],
            id="consul-url-and-token",
        ),
        pytest.param(
            "consul",
            "RESULTS_URL",
            [ours("RESULTS_URL", "uri"), ours("CONSUL_HTTP_TOKEN", "token")],
            id="consul-custom-env-name",
        ),
    ],
)
def test_desired_env_takes_every_value_from_the_secret_by_reference(
    rb_type: Any, url_env: str, expected: list[dict[str, Any]]
) -> None:
    env = desired_env(SECRET, url_env, STORES[rb_type].extra_env)
    assert env == expected
    assert all("value" not in e for e in env)


def test_desired_env_rejects_url_env_name_that_collides_with_the_consul_token() -> None:
    with pytest.raises(InvalidSpec, match="CONSUL_HTTP_TOKEN"):
        desired_env(SECRET, "CONSUL_HTTP_TOKEN", STORES["consul"].extra_env)


def test_desired_env_allows_consul_token_name_for_couchdb() -> None:
    assert desired_env(SECRET, "CONSUL_HTTP_TOKEN", STORES["couchdb"].extra_env) == [
        ours("CONSUL_HTTP_TOKEN")
    ]


# --- selected_containers ---------------------------------------------------------

THREE: dict[str, list[dict[str, Any]]] = {"worker": [], "beat": [], "sidecar": []}


@pytest.mark.parametrize(
    ("containers", "init", "wanted", "expected"),
    [
        pytest.param(THREE, (), None, ["worker", "beat", "sidecar"], id="none-means-all"),
        pytest.param(THREE, (), ["worker"], ["worker"], id="narrowed-to-one"),
        pytest.param(
            THREE, (), ["sidecar", "worker"], ["worker", "sidecar"], id="template-order-kept"
        ),
        pytest.param(THREE, (), ["worker", "ghost"], ["worker"], id="missing-name-skipped"),
        pytest.param(THREE, (), ["ghost"], [], id="only-missing-names-gives-none"),
        pytest.param(THREE, (), [], [], id="empty-list-selects-none"),
        pytest.param({"worker": []}, ("migrate",), None, ["worker"], id="init-not-in-all"),
        pytest.param({"worker": []}, ("migrate",), ["migrate"], [], id="init-never-chosen"),
    ],
)
def test_selected_containers_narrows_to_existing_pod_template_containers(
    containers: Mapping[str, Sequence[Mapping[str, Any]]],
    init: Sequence[str],
    wanted: Sequence[str] | None,
    expected: list[str],
) -> None:
    w = workload(containers=containers, init_containers=init)
    assert selected_containers(w, wanted) == expected


def test_selected_containers_tolerates_a_workload_without_pod_template() -> None:
    assert selected_containers({"kind": "Deployment", "metadata": {"name": "x"}}, None) == []


# --- find_conflicts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("w", "env", "containers", "expected_parts"),
    [
        pytest.param(workload(), COUCH_ENV, None, [], id="fresh-workload-no-conflict"),
        pytest.param(injected(), COUCH_ENV, None, [], id="exactly-ours-is-not-a-conflict"),
        pytest.param(
            workload(annotations={INJECTED_BY_ANNOTATION: RB}),
            COUCH_ENV,
            None,
            [],
            id="claimed-by-us-no-conflict",
        ),
        pytest.param(
            workload(annotations={INJECTED_BY_ANNOTATION: "billing"}),
            COUCH_ENV,
            None,
            [["Deployment shop/orders-worker", "'billing'", INJECTED_BY_ANNOTATION]],
            id="claimed-by-another-resultbackend",
        ),
        pytest.param(
            workload(containers={"worker": [literal(URL_ENV)]}),
            COUCH_ENV,
            None,
            [["Deployment shop/orders-worker", "'worker'", URL_ENV, "literal value"]],
            id="literal-value",
        ),
        pytest.param(
            workload(containers={"worker": [ours(secret="hand-made")]}),
            COUCH_ENV,
            None,
            [["'worker'", URL_ENV, "Secret 'hand-made' key 'uri'"]],
            id="other-secret",
        ),
        pytest.param(
            workload(containers={"worker": [ours(key="url")]}),
            COUCH_ENV,
            None,
            [["'worker'", URL_ENV, "key 'url'"]],
            id="other-key-of-our-secret",
        ),
        pytest.param(
            workload(
                containers={
                    "worker": [
                        {
                            "name": URL_ENV,
                            "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "u"}},
                        }
                    ]
                }
            ),
            COUCH_ENV,
            None,
            [["'worker'", URL_ENV, "ConfigMap 'cfg'"]],
            id="configmap-ref",
        ),
        pytest.param(
            workload(
                containers={
                    "worker": [
                        {
                            "name": URL_ENV,
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                        }
                    ]
                }
            ),
            COUCH_ENV,
            None,
            [["'worker'", URL_ENV, "fieldRef"]],
            id="field-ref",
        ),
        pytest.param(
            workload(
                containers={
                    "worker": [
                        {
                            "name": URL_ENV,
                            "valueFrom": {
                                "secretKeyRef": {"name": SECRET, "key": "uri", "optional": True}
                            },
                        }
                    ]
                }
            ),
            COUCH_ENV,
            None,
            [["'worker'", URL_ENV]],
            id="our-ref-but-optional-is-not-exactly-ours",
        ),
        pytest.param(
            workload(
                containers={
                    "worker": [
                        {
                            "name": URL_ENV,
                            "value": "",
                            "valueFrom": {
                                "secretKeyRef": {"name": SECRET, "key": "uri", "optional": False}
                            },
                        }
                    ]
                }
            ),
            COUCH_ENV,
            None,
            [],
            id="empty-value-and-optional-false-still-ours",
        ),
        pytest.param(
            workload(containers={"worker": [{**ours(), "value": SECRET_LITERAL}]}),
            COUCH_ENV,
            None,
            [["'worker'", URL_ENV, "literal value"]],
            id="our-ref-plus-literal-value",
        ),
        pytest.param(
            workload(
                containers={
                    "worker": [
                        {
                            "name": URL_ENV,
                            "valueFrom": {
                                **ours()["valueFrom"],
                                "fieldRef": {"fieldPath": "metadata.name"},
                            },
                        }
                    ]
                }
            ),
            COUCH_ENV,
            None,
            [["'worker'", URL_ENV]],
            id="our-ref-plus-another-source",
        ),
        pytest.param(
            workload(containers={"worker": [ours(), ours()]}),
            COUCH_ENV,
            None,
            [["'worker'", URL_ENV, "2 times"]],
            id="duplicate-entries",
        ),
        pytest.param(
            workload(containers={"worker": [ours(), literal("CONSUL_HTTP_TOKEN")]}),
            CONSUL_ENV,
            None,
            [["'worker'", "CONSUL_HTTP_TOKEN", "literal value"]],
            id="consul-token-literal",
        ),
        pytest.param(
            workload(containers={"worker": [literal("CONSUL_HTTP_TOKEN")]}),
            COUCH_ENV,
            None,
            [],
            id="consul-token-irrelevant-for-couchdb",
        ),
        pytest.param(
            workload(containers={"worker": [], "sidecar": [literal(URL_ENV)]}),
            COUCH_ENV,
            ["worker"],
            [],
            id="clash-in-unchosen-container-ignored",
        ),
        pytest.param(
            workload(containers={"worker": [literal(URL_ENV)], "beat": [literal(URL_ENV)]}),
            COUCH_ENV,
            None,
            [["'worker'", URL_ENV], ["'beat'", URL_ENV]],
            id="every-clashing-container-reported",
        ),
        pytest.param(
            workload(
                kind="StatefulSet",
                annotations={INJECTED_BY_ANNOTATION: "billing"},
                containers={"worker": [literal(URL_ENV)]},
            ),
            COUCH_ENV,
            None,
            [["StatefulSet shop/orders-worker", "'billing'"], ["StatefulSet", URL_ENV]],
            id="statefulset-both-reasons",
        ),
    ],
)
def test_find_conflicts_reports_each_reason_to_leave_a_workload_alone(
    w: Mapping[str, Any],
    env: Sequence[Mapping[str, Any]],
    containers: Sequence[str] | None,
    expected_parts: list[list[str]],
) -> None:
    reasons = find_conflicts(w, RB, env, containers)
    assert len(reasons) == len(expected_parts), reasons
    for reason, parts in zip(reasons, expected_parts, strict=True):
        for part in parts:
            assert part in reason, (part, reason)


def test_find_conflicts_never_repeats_a_literal_value() -> None:
    w = workload(
        containers={"worker": [literal(URL_ENV), literal("CONSUL_HTTP_TOKEN")]},
        annotations={INJECTED_BY_ANNOTATION: "billing"},
    )
    reasons = find_conflicts(w, RB, CONSUL_ENV, None)
    assert len(reasons) == 3
    assert not any(SECRET_LITERAL in r for r in reasons)


# --- needs_apply -------------------------------------------------------------------


def _drop_env(w: dict[str, Any], container: str, name: str) -> dict[str, Any]:
    for c in w["spec"]["template"]["spec"]["containers"]:
        if c["name"] == container:
            c["env"] = [e for e in c.get("env", []) if e["name"] != name]
    return w


def _add_env(w: dict[str, Any], container: str, entry: dict[str, Any]) -> dict[str, Any]:
    for c in w["spec"]["template"]["spec"]["containers"]:
        if c["name"] == container:
            c.setdefault("env", []).append(entry)
    return w


def _set_annotation(w: dict[str, Any], key: str, value: str | None) -> dict[str, Any]:
    annotations = w["metadata"].setdefault("annotations", {})
    if value is None:
        annotations.pop(key, None)
    else:
        annotations[key] = value
    return w


@pytest.mark.parametrize(
    ("w", "env", "containers", "hash_", "expected"),
    [
        pytest.param(workload(), COUCH_ENV, None, HASH, True, id="fresh-workload"),
        pytest.param(injected(), COUCH_ENV, None, HASH, False, id="already-injected-same-hash"),
        pytest.param(injected(), COUCH_ENV, None, "f" * 32, True, id="secret-changed-hash"),
        pytest.param(
            _drop_env(injected(), "worker", URL_ENV),
            COUCH_ENV,
            None,
            HASH,
            True,
            id="user-deleted-our-env-var-drift",
        ),
        pytest.param(
            _add_env(injected(), "worker", literal("MY_OWN", "x")),
            COUCH_ENV,
            None,
            HASH,
            False,
            id="user-added-unrelated-env-var",
        ),
        pytest.param(
            _set_annotation(injected(), INJECTED_BY_ANNOTATION, None),
            COUCH_ENV,
            None,
            HASH,
            True,
            id="user-removed-injected-by",
        ),
        pytest.param(
            _set_annotation(injected(), "team", "payments"),
            COUCH_ENV,
            None,
            HASH,
            False,
            id="user-added-unrelated-annotation",
        ),
        pytest.param(
            injected(env=CONSUL_ENV),
            CONSUL_ENV,
            None,
            HASH,
            False,
            id="consul-already-injected",
        ),
        pytest.param(
            _drop_env(injected(env=CONSUL_ENV), "worker", "CONSUL_HTTP_TOKEN"),
            CONSUL_ENV,
            None,
            HASH,
            True,
            id="consul-token-missing",
        ),
        pytest.param(
            injected(containers={"worker": COUCH_ENV, "beat": []}, owned={"worker": [URL_ENV]}),
            COUCH_ENV,
            None,
            HASH,
            True,
            id="new-container-in-template-not-yet-injected",
        ),
        pytest.param(
            injected(containers={"worker": COUCH_ENV, "beat": []}, owned={"worker": [URL_ENV]}),
            COUCH_ENV,
            ["worker"],
            HASH,
            False,
            id="unchosen-container-without-env-is-fine",
        ),
        pytest.param(
            injected(containers={"worker": COUCH_ENV, "beat": COUCH_ENV}),
            COUCH_ENV,
            ["worker"],
            HASH,
            True,
            id="container-dropped-from-workers-containers-still-owned",
        ),
        pytest.param(
            injected(containers={"worker": [ours("OLD_URL")]}),
            desired_env(SECRET, "NEW_URL"),
            None,
            HASH,
            True,
            id="url-env-name-renamed",
        ),
        pytest.param(
            injected(
                containers={"worker": [ours("OLD_URL"), ours("NEW_URL")]},
                owned={"worker": ["OLD_URL", "NEW_URL"]},
            ),
            desired_env(SECRET, "NEW_URL"),
            None,
            HASH,
            True,
            id="old-env-name-still-owned-after-rename",
        ),
        pytest.param(
            injected(containers={"worker": [ours("OLD_URL"), ours("NEW_URL")]}, owned={}),
            desired_env(SECRET, "NEW_URL"),
            None,
            HASH,
            False,
            id="leftover-env-we-do-not-own-is-not-ours-to-remove",
        ),
        pytest.param(
            injected(containers={"worker": COUCH_ENV}, owned={}),
            COUCH_ENV,
            None,
            HASH,
            False,
            id="no-managed-fields-but-values-match",
        ),
    ],
)
def test_needs_apply_is_true_only_when_the_apply_would_change_something(
    w: Mapping[str, Any],
    env: Sequence[Mapping[str, Any]],
    containers: Sequence[str] | None,
    hash_: str,
    expected: bool,
) -> None:
    assert needs_apply(w, RB, env, containers, hash_) is expected


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet"])
@pytest.mark.parametrize("env", [COUCH_ENV, CONSUL_ENV], ids=["couchdb", "consul"])
@pytest.mark.parametrize("containers", [None, ["beat"]], ids=["all", "beat-only"])
def test_after_applying_the_patch_nothing_more_is_needed(
    kind: str, env: Sequence[Mapping[str, Any]], containers: Sequence[str] | None
) -> None:
    live = workload(kind=kind, containers={"worker": [literal("LOG_LEVEL", "info")], "beat": []})
    assert needs_apply(live, RB, env, containers, HASH)
    after = simulate_apply(live, apply_patch(live, RB, env, containers, HASH))
    assert not find_conflicts(after, RB, env, containers)
    assert not needs_apply(after, RB, env, containers, HASH)
    assert injected_containers(after, RB, env) == selected_containers(live, containers)
    assert is_injected_by(after, RB)


# --- managed fields ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        pytest.param([], {}, id="no-managed-fields"),
        pytest.param(
            [managed_entry({"worker": [URL_ENV, "CONSUL_HTTP_TOKEN"], "beat": [URL_ENV]})],
            {"worker": {URL_ENV, "CONSUL_HTTP_TOKEN"}, "beat": {URL_ENV}},
            id="our-apply-entry",
        ),
        pytest.param(
            [managed_entry({"worker": []})], {"worker": set()}, id="container-without-env"
        ),
        pytest.param(
            [managed_entry({"worker": [URL_ENV]}, manager="kubectl-client-side-apply")],
            {},
            id="other-manager-ignored",
        ),
        pytest.param(
            [managed_entry({"worker": [URL_ENV]}, operation="Update")],
            {},
            id="update-operation-ignored",
        ),
        pytest.param(
            [managed_entry({"worker": [URL_ENV]}, subresource="status")],
            {},
            id="subresource-ignored",
        ),
        pytest.param(
            [
                {
                    "manager": FIELD_MANAGER,
                    "operation": "Apply",
                    "fieldsV1": {
                        "f:spec": {
                            "f:template": {
                                "f:spec": {
                                    "f:containers": {
                                        "k:not-json": {},
                                        'k:{"port":80}': {},
                                        '{"name":"worker"}': {},
                                        'k:{"name":"worker"}': {"f:env": {"v:x": {}}},
                                    }
                                }
                            }
                        }
                    },
                }
            ],
            {"worker": set()},
            id="malformed-keys-ignored",
        ),
        pytest.param(
            [{"manager": FIELD_MANAGER, "operation": "Apply", "fieldsV1": None}],
            {},
            id="null-fields-ignored",
        ),
    ],
)
def test_owned_env_reads_our_apply_entries_from_managed_fields(
    entries: Sequence[Mapping[str, Any]], expected: dict[str, set[str]]
) -> None:
    w = workload(managed_fields=entries)
    assert owned_env(w) == expected


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        pytest.param([], False, id="none"),
        pytest.param([managed_entry({"worker": [URL_ENV]})], True, id="ours"),
        pytest.param([managed_entry({}, manager="kubectl")], False, id="someone-elses"),
        pytest.param(
            [{"manager": FIELD_MANAGER, "operation": "Apply", "fieldsV1": {}}],
            False,
            id="empty-entry",
        ),
    ],
)
def test_owns_fields_says_whether_our_manager_applied_anything(
    entries: Sequence[Mapping[str, Any]], expected: bool
) -> None:
    assert owns_fields(workload(managed_fields=entries)) is expected


# --- is_injected_by / injected_containers ------------------------------------------


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        pytest.param(None, False, id="no-annotations"),
        pytest.param({INJECTED_BY_ANNOTATION: RB}, True, id="ours"),
        pytest.param({INJECTED_BY_ANNOTATION: "billing"}, False, id="another-resultbackend"),
        pytest.param({"other": RB}, False, id="unrelated-annotation"),
    ],
)
def test_is_injected_by_reads_the_workload_annotation(
    annotations: Mapping[str, str] | None, expected: bool
) -> None:
    assert is_injected_by(workload(annotations=annotations), RB) is expected


@pytest.mark.parametrize(
    ("w", "env", "expected"),
    [
        pytest.param(injected(), COUCH_ENV, ["worker"], id="injected"),
        pytest.param(
            injected(containers={"worker": COUCH_ENV, "beat": [], "web": COUCH_ENV}),
            COUCH_ENV,
            ["worker", "web"],
            id="only-containers-with-our-env",
        ),
        pytest.param(
            injected(containers={"worker": [ours()]}, env=CONSUL_ENV),
            CONSUL_ENV,
            [],
            id="partial-consul-env-is-not-injected",
        ),
        pytest.param(
            workload(containers={"worker": COUCH_ENV}), COUCH_ENV, [], id="without-annotation"
        ),
        pytest.param(
            workload(
                containers={"worker": COUCH_ENV}, annotations={INJECTED_BY_ANNOTATION: "billing"}
            ),
            COUCH_ENV,
            [],
            id="annotated-by-another",
        ),
        pytest.param(
            _drop_env(injected(), "worker", URL_ENV), COUCH_ENV, [], id="env-deleted-by-user"
        ),
    ],
)
def test_injected_containers_lists_containers_carrying_all_our_env(
    w: Mapping[str, Any], env: Sequence[Mapping[str, Any]], expected: list[str]
) -> None:
    assert injected_containers(w, RB, env) == expected


# --- SSA bodies --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet"])
def test_apply_patch_holds_exactly_the_fields_we_own(kind: str) -> None:
    live = workload(
        kind=kind,
        containers={"worker": [literal("LOG_LEVEL", "info")], "beat": [], "sidecar": []},
        init_containers=("migrate",),
        annotations={"team": "payments"},
    )
    body = apply_patch(live, RB, CONSUL_ENV, ["worker", "beat", "migrate"], HASH)
    assert body == {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {
            "name": "orders-worker",
            "namespace": "shop",
            "annotations": {INJECTED_BY_ANNOTATION: RB},
        },
        "spec": {
            "template": {
                "metadata": {"annotations": {CONFIG_HASH_ANNOTATION: HASH}},
                "spec": {
                    "containers": [
                        {"name": "worker", "env": CONSUL_ENV},
                        {"name": "beat", "env": CONSUL_ENV},
                    ]
                },
            }
        },
    }


def test_apply_patch_does_not_share_env_dicts_with_the_caller() -> None:
    env = desired_env(SECRET, URL_ENV)
    body = apply_patch(workload(), RB, env, None, HASH)
    body["spec"]["template"]["spec"]["containers"][0]["env"][0]["name"] = "CHANGED"
    assert env[0]["name"] == URL_ENV


@pytest.mark.parametrize(
    ("w", "containers", "match"),
    [
        pytest.param(
            {k: v for k, v in workload().items() if k not in ("kind", "apiVersion")},
            None,
            "with_type_meta",
            id="list-item-without-kind",
        ),
        pytest.param(workload(kind="DaemonSet"), None, "DaemonSet", id="unsupported-kind"),
        pytest.param(workload(), ["ghost"], "no container", id="no-chosen-container"),
    ],
)
def test_apply_patch_refuses_what_it_cannot_build_safely(
    w: Mapping[str, Any], containers: Sequence[str] | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        apply_patch(w, RB, COUCH_ENV, containers, HASH)


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet"])
def test_release_patch_is_identity_only_so_our_manager_gives_up_every_field(kind: str) -> None:
    body = release_patch(injected(kind=kind))
    assert body == {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": "orders-worker", "namespace": "shop"},
    }


def test_with_type_meta_restores_kind_of_a_list_item() -> None:
    item = {
        k: v for k, v in workload(kind="StatefulSet").items() if k not in ("kind", "apiVersion")
    }
    typed = with_type_meta(item, "StatefulSet")
    assert typed["kind"] == "StatefulSet"
    assert typed["apiVersion"] == "apps/v1"
    assert "kind" not in item
    assert release_patch(typed)["kind"] == "StatefulSet"


def test_with_type_meta_rejects_other_kinds() -> None:
    with pytest.raises(ValueError, match="DaemonSet"):
        with_type_meta({}, "DaemonSet")


# --- workload_status -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("w", "containers", "hash_", "action", "current"),
    [
        pytest.param(workload(), None, HASH, "apply", False, id="fresh-apply"),
        pytest.param(injected(), None, HASH, "none", True, id="current-nothing-to-do"),
        pytest.param(injected(), None, "f" * 32, "apply", False, id="new-secret-apply"),
        pytest.param(
            workload(annotations={INJECTED_BY_ANNOTATION: "billing"}),
            None,
            HASH,
            "conflict",
            False,
            id="claimed-by-other",
        ),
        pytest.param(
            workload(containers={"worker": [literal(URL_ENV)]}),
            None,
            HASH,
            "conflict",
            False,
            id="env-clash",
        ),
        pytest.param(injected(), ["ghost"], HASH, "release", False, id="ours-no-container"),
        pytest.param(workload(), ["ghost"], HASH, "none", False, id="not-ours-no-container"),
        pytest.param(
            workload(managed_fields=[managed_entry({"worker": [URL_ENV]})]),
            ["ghost"],
            HASH,
            "release",
            False,
            id="unclaimed-leftover-fields-no-container",
        ),
        pytest.param(
            workload(
                annotations={INJECTED_BY_ANNOTATION: "billing"},
                managed_fields=[managed_entry({"worker": [URL_ENV]})],
            ),
            ["ghost"],
            HASH,
            "conflict",
            False,
            id="others-fields-never-released",
        ),
    ],
)
def test_workload_status_decides_the_action(
    w: Mapping[str, Any],
    containers: Sequence[str] | None,
    hash_: str,
    action: str,
    current: bool,
) -> None:
    state = workload_status(w, RB, COUCH_ENV, containers, hash_)
    assert state.name == "orders-worker"
    assert state.action == action
    assert state.injected is current
    assert bool(state.reasons) is (action in ("conflict", "release") or containers == ["ghost"])
