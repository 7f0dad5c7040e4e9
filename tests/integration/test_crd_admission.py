"""The three CRDs on the real apiserver: they install, document every field, and
admit or reject what design/api.md says (OpenAPI and CEL). No operator runs here.

The manifests are built in this file on purpose: these tests pin down admission,
not what the operator makes of an object.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, Kubectl

pytestmark = pytest.mark.integration

GROUP = "resultstores.io"
API_VERSION = f"{GROUP}/v1alpha2"
RB, RSTORE, CRSTORE = "ResultBackend", "ResultStore", "ClusterResultStore"
STORE_KINDS = (CRSTORE, RSTORE)
PLURALS = {CRSTORE: "clusterresultstores", RSTORE: "resultstores", RB: "resultbackends"}
SHORT = {CRSTORE: "crstore", RSTORE: "rstore", RB: "rb"}

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def crds(kubectl: Kubectl, crd: None) -> None:
    """All three CRDs established and in discovery (the `crd` fixture waits for one)."""
    names = [f"crd/{plural}.{GROUP}" for plural in PLURALS.values()]
    kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)
    deadline = time.monotonic() + 60
    for short in SHORT.values():
        while kubectl("explain", f"{short}.spec", check=False).returncode != 0:
            assert time.monotonic() < deadline, f"{short} never reached discovery"
            time.sleep(0.5)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# --- manifests ---------------------------------------------------------------------


def rb(namespace: str, name: str, **spec: Any) -> Doc:
    spec.setdefault("storeRef", {"kind": CRSTORE, "name": "couchdb-main"})
    if spec["storeRef"] is None:
        del spec["storeRef"]
    return {
        "apiVersion": API_VERSION,
        "kind": RB,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def couchdb_block(url: str = "http://couchdb.databases.svc:5984") -> Doc:
    return {"url": url, "adminSecretRef": {"name": "couchdb-admin"}}


def consul_block(url: str = "http://consul.consul.svc:8500") -> Doc:
    return {"url": url, "tokenSecretRef": {"name": "consul-management"}}


def store(kind: str, name: str, namespace: str, **spec: Any) -> Doc:
    meta = {"name": name} if kind == CRSTORE else {"name": name, "namespace": namespace}
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": spec}


# --- kubectl -------------------------------------------------------------------------


def apply(kubectl: Kubectl, doc: Doc) -> None:
    kubectl("apply", "-f", "-", stdin=json.dumps(doc))


def rejected(kubectl: Kubectl, doc: Doc) -> str:
    res = kubectl("apply", "-f", "-", stdin=json.dumps(doc), check=False)
    assert res.returncode != 0, f"the apiserver accepted {json.dumps(doc)}"
    return res.stderr


def get_json(kubectl: Kubectl, *args: str) -> Doc:
    return dict(json.loads(kubectl("get", *args, "-o", "json").stdout))


@pytest.fixture
def cluster_stores(kubectl: Kubectl) -> Iterator[list[str]]:
    """Names of ClusterResultStores a test made (cluster-scoped: no namespace cleans up)."""
    names: list[str] = []
    yield names
    for name in names:
        # Not waited for: a store waits (InUse) until the ResultBackends of the test's
        # namespace, deleted after this, are gone (when an operator runs).
        kubectl(
            "delete", "clusterresultstore", name, "--ignore-not-found", "--wait=false", check=False
        )


def store_for(kind: str, namespace: str, cluster_stores: list[str], **spec: Any) -> Doc:
    name = unique("store")
    if kind == CRSTORE:
        cluster_stores.append(name)
    return store(kind, name, namespace, **spec)


# --- installation, discovery, documentation -------------------------------------------


@pytest.mark.parametrize("kind", [CRSTORE, RSTORE, RB])
def test_crd_is_established_with_short_name_and_category(
    kubectl: Kubectl, crds: None, kind: str
) -> None:
    crd = get_json(kubectl, "crd", f"{PLURALS[kind]}.{GROUP}")
    names = crd["spec"]["names"]
    assert names["shortNames"] == [SHORT[kind]]
    assert names["categories"] == ["celery"]
    assert [v["name"] for v in crd["spec"]["versions"] if v["served"]] == ["v1alpha2"]
    established = [c for c in crd["status"]["conditions"] if c["type"] == "Established"]
    assert established[0]["status"] == "True"


def test_v1alpha1_is_not_served(kubectl: Kubectl, crds: None) -> None:
    res = kubectl("get", "--raw", f"/apis/{GROUP}/v1alpha1", check=False)
    assert res.returncode != 0
    assert "NotFound" in res.stderr or "not found" in res.stderr.lower()


def test_the_celery_category_lists_all_three_kinds(
    kubectl: Kubectl, crds: None, namespace: str, cluster_stores: list[str]
) -> None:
    crstore = store_for(CRSTORE, namespace, cluster_stores, couchdb=couchdb_block())
    rstore = store(RSTORE, "consul", namespace, consul=consul_block())
    backend = rb(
        namespace, "orders", storeRef={"kind": CRSTORE, "name": crstore["metadata"]["name"]}
    )
    for doc in (crstore, rstore, backend):
        apply(kubectl, doc)
    out = kubectl("get", "celery", "-n", namespace, "-o", "name").stdout.split()
    assert f"resultstore.{GROUP}/consul" in out
    assert f"resultbackend.{GROUP}/orders" in out
    out = kubectl("get", "celery", "-o", "name").stdout.split()
    assert f"clusterresultstore.{GROUP}/{crstore['metadata']['name']}" in out


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("rb.spec.storeRef", ["ClusterResultStore", "immutable", "kind", "name"]),
        ("rb.spec.storeRef.kind", ["ResultStore"]),
        ("rb.spec.couchdb.database", ["CouchDB", "Immutable"]),
        ("rb.spec.consul.keyPrefix", ["celery/<namespace>/<name>", "Immutable"]),
        ("rb.spec.workers.urlEnvName", ["CELERY_RESULT_BACKEND"]),
        ("rb.status.store", ["kind", "name", "type"]),
        (
            "crstore.spec.couchdb.adminSecretRef",
            ["cluster resource namespace", "name", "usernameKey", "passwordKey"],
        ),
        ("crstore.spec.namespaceSelector", ["matchLabels", "matchExpressions", "every"]),
        ("crstore.status.serverVersion", ["version"]),
        ("rstore.spec.consul.tokenSecretRef", ["ResultStore's namespace", "name", "key"]),
        ("rstore.spec.couchdb.url", ["no credentials"]),
        ("rstore.status.resultBackends", ["ResultBackends"]),
    ],
)
def test_kubectl_explain_documents_nested_fields(
    kubectl: Kubectl, crds: None, field: str, expected: list[str]
) -> None:
    out = " ".join(kubectl("explain", field).stdout.split())
    for text in expected:
        assert text in out, f"{text!r} not in `kubectl explain {field}`:\n{out}"


def _undocumented(schema: Doc, path: str) -> Iterator[str]:
    for name, sub in schema.get("properties", {}).items():
        here = f"{path}.{name}"
        refs = [s["$ref"] for s in sub.get("allOf", []) if "$ref" in s]
        if refs:  # ObjectMeta: documented by Kubernetes itself
            continue
        if not str(sub.get("description", "")).strip():
            yield here
        yield from _undocumented(sub, here)
        items = sub.get("items")
        if isinstance(items, dict) and items.get("type") == "object":
            if not str(items.get("description", "")).strip():
                yield f"{here}[]"
            yield from _undocumented(items, f"{here}[]")


def test_published_openapi_documents_every_field(kubectl: Kubectl, crds: None) -> None:
    """What `kubectl explain` reads (the apiserver's OpenAPI v3) has a description on
    every field of every kind."""
    doc = json.loads(kubectl("get", "--raw", f"/openapi/v3/apis/{GROUP}/v1alpha2").stdout)
    components = doc["components"]["schemas"]
    for kind in (CRSTORE, RSTORE, RB):
        schema = components[f"io.resultstores.v1alpha2.{kind}"]
        assert schema["description"]
        assert list(_undocumented(schema, kind)) == []


# --- printer columns, status, kubectl wait ------------------------------------------


def _header(kubectl: Kubectl, *args: str) -> list[str]:
    lines = kubectl("get", *args).stdout.splitlines()
    return lines[0].split()


def _patch_status(kubectl: Kubectl, resource: str, namespace: str | None, status: Doc) -> Doc:
    scope = ["-n", namespace] if namespace else []
    kubectl(
        "patch",
        resource,
        *scope,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )
    return get_json(kubectl, resource, *scope)


READY = {
    "type": "Ready",
    "status": "True",
    "reason": "Ready",
    "message": "ready",
    "observedGeneration": 1,
    "lastTransitionTime": "2026-11-23T10:00:00Z",
}


def test_result_backend_columns_status_and_wait(
    kubectl: Kubectl, crds: None, namespace: str, session_operator_stopped: None
) -> None:
    """The status written here stays: no operator runs meanwhile."""
    apply(kubectl, rb(namespace, "orders"))
    assert _header(kubectl, "rb", "-n", namespace) == [
        "NAME",
        "STORE",
        "TYPE",
        "READY",
        "WORKERS",
        "URL",
        "AGE",
    ]
    # Every status field the operator writes survives (nothing pruned, nothing refused).
    status = {
        "observedGeneration": 1,
        "phase": "Ready",
        "store": {"kind": CRSTORE, "name": "couchdb-main", "type": "couchdb"},
        "secretName": "orders-result-backend",
        "url": "couchdb://rb_shop_orders@couchdb.databases.svc:5984/shop-orders",
        "couchdb": {"database": "shop-orders", "user": "rb_shop_orders"},
        "consul": {"keyPrefix": "celery/a/b", "policyID": "p", "tokenAccessorID": "t"},
        "workers": {
            "selected": 2,
            "injected": 1,
            "names": ["orders-worker"],
            "conflicts": ["Deployment/orders-beat: claimed by another ResultBackend"],
        },
        "credentialsRotatedAt": "2026-11-23T10:00:00Z",
        "conditions": [READY],
    }
    got = _patch_status(kubectl, "rb/orders", namespace, status)
    assert got["status"] == status
    row = kubectl("get", "rb", "orders", "-n", namespace, "--no-headers").stdout.split()
    assert row[:6] == ["orders", "couchdb-main", "couchdb", "True", "1", status["url"]]
    wide = _header(kubectl, "rb", "-n", namespace, "-o", "wide")
    assert wide[:5] == ["NAME", "STORE", "STORE", "KIND", "TYPE"]
    assert "PHASE" in wide
    kubectl("wait", "--for=condition=Ready", "--timeout=10s", "-n", namespace, "rb/orders")


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_store_columns_status_and_wait(
    kubectl: Kubectl,
    crds: None,
    namespace: str,
    cluster_stores: list[str],
    kind: str,
    session_operator_stopped: None,
) -> None:
    """The status written here stays: no operator runs meanwhile."""
    doc = store_for(kind, namespace, cluster_stores, couchdb=couchdb_block())
    apply(kubectl, doc)
    ns = namespace if kind == RSTORE else None
    scope = ["-n", namespace] if ns else []
    assert _header(kubectl, SHORT[kind], *scope) == [
        "NAME",
        "TYPE",
        "READY",
        "VERSION",
        "BACKENDS",
        "URL",
        "AGE",
    ]
    resource = f"{SHORT[kind]}/{doc['metadata']['name']}"
    status = {
        "observedGeneration": 1,
        "type": "couchdb",
        "url": "http://couchdb.databases.svc:5984",
        "serverVersion": "3.5.0",
        "resultBackends": 12,
        "conditions": [READY],
    }
    assert _patch_status(kubectl, resource, ns, status)["status"] == status
    row = kubectl("get", resource, *scope, "--no-headers").stdout.split()
    assert row[:6] == [doc["metadata"]["name"], "couchdb", "True", "3.5.0", "12", status["url"]]
    kubectl("wait", "--for=condition=Ready", "--timeout=10s", *scope, resource)


# --- the examples ------------------------------------------------------------------


def test_examples_are_admitted(
    kubectl: Kubectl, crds: None, namespace: str, cluster_stores: list[str]
) -> None:
    """Every example object of the group passes admission (in a namespace of this test;
    cluster-scoped ones under a name of their own, deleted afterwards)."""
    ours = [
        doc
        for path in sorted((ROOT / "examples").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and str(doc.get("apiVersion", "")).startswith(f"{GROUP}/")
    ]
    assert {doc["kind"] for doc in ours} == {CRSTORE, RSTORE, RB}
    renamed = {}
    for doc in ours:
        if doc["kind"] == CRSTORE:
            renamed[doc["metadata"]["name"]] = unique(doc["metadata"]["name"])
            cluster_stores.append(renamed[doc["metadata"]["name"]])
    for doc in ours:
        doc = json.loads(json.dumps(doc))
        if doc["kind"] == CRSTORE:
            doc["metadata"]["name"] = renamed[doc["metadata"]["name"]]
        else:
            doc["metadata"]["namespace"] = namespace
        ref = doc["spec"].get("storeRef", {})
        if ref.get("kind") == CRSTORE:
            ref["name"] = renamed.get(ref["name"], ref["name"])
        apply(kubectl, doc)


# --- ResultBackend: storeRef -------------------------------------------------------


def test_store_ref_is_required(kubectl: Kubectl, crds: None, namespace: str) -> None:
    err = rejected(kubectl, rb(namespace, "bad", storeRef=None))
    assert "spec.storeRef: Required value" in err


def test_store_ref_name_is_required_and_kind_defaults_to_result_store(
    kubectl: Kubectl, crds: None, namespace: str
) -> None:
    err = rejected(kubectl, rb(namespace, "bad", storeRef={"kind": RSTORE}))
    assert "spec.storeRef.name: Required value" in err
    apply(kubectl, rb(namespace, "defaulted", storeRef={"name": "consul"}))
    got = get_json(kubectl, "rb", "defaulted", "-n", namespace)
    assert got["spec"]["storeRef"] == {"kind": RSTORE, "name": "consul"}


def test_store_ref_kind_is_one_of_the_store_kinds(
    kubectl: Kubectl, crds: None, namespace: str
) -> None:
    err = rejected(kubectl, rb(namespace, "bad", storeRef={"kind": "Secret", "name": "x"}))
    assert 'Unsupported value: "Secret"' in err


@pytest.mark.parametrize(
    "changed",
    [
        {"kind": CRSTORE, "name": "other"},  # another name
        {"kind": RSTORE, "name": "couchdb-main"},  # another kind
        {"name": "couchdb-main"},  # another kind, by its default
    ],
)
def test_store_ref_is_immutable(kubectl: Kubectl, crds: None, namespace: str, changed: Doc) -> None:
    name = unique("imm")
    apply(kubectl, rb(namespace, name, storeRef={"kind": CRSTORE, "name": "couchdb-main"}))
    err = rejected(kubectl, rb(namespace, name, storeRef=changed))
    assert "storeRef is immutable" in err
    # The same storeRef again (the rest of the spec changed) is fine.
    apply(
        kubectl,
        rb(
            namespace,
            name,
            storeRef={"kind": CRSTORE, "name": "couchdb-main"},
            deletionPolicy="Delete",
        ),
    )


def test_a_result_backend_names_no_url_and_no_secret(
    kubectl: Kubectl, crds: None, namespace: str
) -> None:
    """v1alpha1's fields are unknown now: kubectl's strict field validation says so."""
    doc = rb(namespace, "bad", couchdb={"url": "http://127.0.0.1:5984"})
    assert 'unknown field "spec.couchdb.url"' in rejected(kubectl, doc)
    doc = rb(namespace, "bad", consul={"tokenSecretRef": {"name": "t"}})
    assert 'unknown field "spec.consul.tokenSecretRef"' in rejected(kubectl, doc)
    doc = rb(namespace, "bad", type="couchdb")
    assert 'unknown field "spec.type"' in rejected(kubectl, doc)


# --- ResultBackend: option blocks --------------------------------------------------


def test_both_option_blocks_are_rejected(kubectl: Kubectl, crds: None, namespace: str) -> None:
    err = rejected(kubectl, rb(namespace, "bad", couchdb={}, consul={}))
    assert "at most one of spec.couchdb and spec.consul" in err
    # Not even on an update that adds the second one.
    name = unique("two")
    apply(kubectl, rb(namespace, name, couchdb={}))
    err = rejected(kubectl, rb(namespace, name, couchdb={}, consul={"oneClient": True}))
    assert "at most one of spec.couchdb and spec.consul" in err


@pytest.mark.parametrize(
    "prefix", ["/celery", "celery/", "a//b", "a/../b", 'celery" acl = "write', "x" * 513]
)
def test_bad_key_prefix_is_rejected(
    kubectl: Kubectl, crds: None, namespace: str, prefix: str
) -> None:
    err = rejected(kubectl, rb(namespace, "bad", consul={"keyPrefix": prefix}))
    assert "spec.consul.keyPrefix" in err


@pytest.mark.parametrize(
    ("database", "ok"),
    [
        ("shop-orders", True),
        ("a_b$c(d)e+f/g-1", True),
        ("d" * 238, True),
        ("Shop", False),
        ("1shop", False),
        ("_users", False),
        ("shop orders", False),
        ("d" * 239, False),
    ],
)
def test_database_pattern(
    kubectl: Kubectl, crds: None, namespace: str, database: str, ok: bool
) -> None:
    doc = rb(namespace, unique("db"), couchdb={"database": database})
    if ok:
        apply(kubectl, doc)
    else:
        assert "spec.couchdb.database" in rejected(kubectl, doc)


def test_url_env_name_may_not_be_the_consul_token(
    kubectl: Kubectl, crds: None, namespace: str
) -> None:
    doc = rb(namespace, "bad", workers={"urlEnvName": "CONSUL_HTTP_TOKEN"})
    assert "must not be CONSUL_HTTP_TOKEN" in rejected(kubectl, doc)


# Each case: the spec blocks at creation, then on the update (None: no block).
IMMUTABLE_CASES = {
    "changed": ({"x": "first"}, {"x": "second"}),
    "added to the block": ({}, {"x": "second"}),
    "added with the block": (None, {"x": "second"}),
    "removed from the block": ({"x": "first"}, {}),
    "removed with the block": ({"x": "first"}, None),
}
# Each case: updates that leave the identity field alone are accepted.
MUTABLE_CASES = {
    "kept": ({"x": "first"}, {"x": "first"}),
    "never set, block added": (None, {}),
    "never set, block removed": ({}, None),
}
FIELDS = {"couchdb": ("database", "orders-db"), "consul": ("keyPrefix", "celery/shop/orders")}


def _options(block: str, field: str, value: Any, blocks: Doc | None) -> Doc:
    if blocks is None:
        return {}
    inner = {field: f"{value}-{blocks['x']}" if "x" in blocks else None}
    return {block: {k: v for k, v in inner.items() if v is not None}}


@pytest.mark.parametrize("block", sorted(FIELDS))
@pytest.mark.parametrize("case", sorted(IMMUTABLE_CASES))
def test_database_and_key_prefix_cannot_change_appear_or_disappear(
    kubectl: Kubectl, crds: None, namespace: str, block: str, case: str
) -> None:
    field, value = FIELDS[block]
    before, after = IMMUTABLE_CASES[case]
    name = unique("imm")
    apply(kubectl, rb(namespace, name, **_options(block, field, value, before)))
    err = rejected(kubectl, rb(namespace, name, **_options(block, field, value, after)))
    assert f"spec.{block}.{field} is immutable" in err


@pytest.mark.parametrize("block", sorted(FIELDS))
@pytest.mark.parametrize("case", sorted(MUTABLE_CASES))
def test_other_option_changes_are_accepted(
    kubectl: Kubectl, crds: None, namespace: str, block: str, case: str
) -> None:
    field, value = FIELDS[block]
    before, after = MUTABLE_CASES[case]
    name = unique("mut")
    apply(kubectl, rb(namespace, name, **_options(block, field, value, before)))
    spec = _options(block, field, value, after)
    spec["deletionPolicy"] = "Delete"
    spec["workers"] = {"selector": {"matchLabels": {"app": "w"}}, "urlEnvName": "RESULTS"}
    spec["rotation"] = {"trigger": "2026-12-01T10:00:00Z"}
    if block == "consul" and "consul" in spec:
        spec["consul"]["oneClient"] = True
    apply(kubectl, rb(namespace, name, **spec))
    got = get_json(kubectl, "rb", name, "-n", namespace)["spec"]
    assert got["deletionPolicy"] == "Delete"
    assert (block in got) is (after is not None)


# --- stores ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("blocks", ["both", "neither"])
def test_store_needs_exactly_one_block(
    kubectl: Kubectl, crds: None, namespace: str, cluster_stores: list[str], kind: str, blocks: str
) -> None:
    spec = {"couchdb": couchdb_block(), "consul": consul_block()} if blocks == "both" else {}
    err = rejected(kubectl, store_for(kind, namespace, cluster_stores, **spec))
    assert "exactly one of spec.couchdb and spec.consul" in err


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize(("before", "after"), [("couchdb", "consul"), ("consul", "couchdb")])
def test_store_type_is_immutable_and_its_url_is_not(
    kubectl: Kubectl,
    crds: None,
    namespace: str,
    cluster_stores: list[str],
    kind: str,
    before: str,
    after: str,
) -> None:
    blocks = {"couchdb": couchdb_block, "consul": consul_block}
    doc = store_for(kind, namespace, cluster_stores, **{before: blocks[before]()})
    apply(kubectl, doc)
    doc["spec"] = {after: blocks[after]()}
    assert "the store's type is immutable" in rejected(kubectl, doc)
    # Both blocks at once is no way around it either.
    doc["spec"] = {before: blocks[before](), after: blocks[after]()}
    rejected(kubectl, doc)
    # The server moved: a new url (and another Secret) is fine.
    doc["spec"] = {before: blocks[before]("https://moved.example.com:6984")}
    ref = "adminSecretRef" if before == "couchdb" else "tokenSecretRef"
    doc["spec"][before][ref] = {"name": "rotated-admin"}
    apply(kubectl, doc)
    scope = ["-n", namespace] if kind == RSTORE else []
    got = get_json(kubectl, PLURALS[kind], doc["metadata"]["name"], *scope)
    assert got["spec"][before]["url"] == "https://moved.example.com:6984"


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("block", ["couchdb", "consul"])
@pytest.mark.parametrize(
    "url",
    [
        "http://admin:pw@127.0.0.1:5984",
        "http://admin@127.0.0.1:5984",
        "http://127.0.0.1:5984/_users",
        "ftp://127.0.0.1",
        "127.0.0.1:5984",
    ],
)
def test_store_url_with_credentials_or_a_path_is_rejected(
    kubectl: Kubectl,
    crds: None,
    namespace: str,
    cluster_stores: list[str],
    kind: str,
    block: str,
    url: str,
) -> None:
    make = couchdb_block if block == "couchdb" else consul_block
    err = rejected(kubectl, store_for(kind, namespace, cluster_stores, **{block: make(url)}))
    assert f"spec.{block}.url" in err


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_store_defaults_the_secret_keys(
    kubectl: Kubectl, crds: None, namespace: str, cluster_stores: list[str], kind: str
) -> None:
    couch = store_for(kind, namespace, cluster_stores, couchdb=couchdb_block())
    consul = store_for(kind, namespace, cluster_stores, consul=consul_block())
    scope = ["-n", namespace] if kind == RSTORE else []
    for doc in (couch, consul):
        apply(kubectl, doc)
    got = get_json(kubectl, PLURALS[kind], couch["metadata"]["name"], *scope)["spec"]
    assert got["couchdb"]["adminSecretRef"] == {
        "name": "couchdb-admin",
        "usernameKey": "username",
        "passwordKey": "password",
    }
    got = get_json(kubectl, PLURALS[kind], consul["metadata"]["name"], *scope)["spec"]
    assert got["consul"]["tokenSecretRef"] == {"name": "consul-management", "key": "token"}


def test_namespace_selector_on_a_cluster_result_store(
    kubectl: Kubectl, crds: None, namespace: str, cluster_stores: list[str]
) -> None:
    selector = {
        "matchLabels": {"resultstores.io/couchdb-main": "allowed"},
        "matchExpressions": [
            {"key": "team", "operator": "In", "values": ["shop", "billing"]},
            {"key": "quarantine", "operator": "DoesNotExist"},
        ],
    }
    doc = store_for(
        CRSTORE, namespace, cluster_stores, couchdb=couchdb_block(), namespaceSelector=selector
    )
    apply(kubectl, doc)
    got = get_json(kubectl, "clusterresultstore", doc["metadata"]["name"])
    assert got["spec"]["namespaceSelector"] == selector
    # An empty selector (every namespace) is fine; a broken requirement is not.
    doc["spec"]["namespaceSelector"] = {}
    apply(kubectl, doc)
    doc["spec"]["namespaceSelector"] = {"matchExpressions": [{"key": "team", "operator": "In"}]}
    assert "values must be non-empty" in rejected(kubectl, doc)
    doc["spec"]["namespaceSelector"] = {"matchExpressions": [{"key": "t", "operator": "Has"}]}
    assert 'Unsupported value: "Has"' in rejected(kubectl, doc)


def test_a_result_store_has_no_namespace_selector(
    kubectl: Kubectl, crds: None, namespace: str
) -> None:
    doc = store(RSTORE, "bad", namespace, couchdb=couchdb_block(), namespaceSelector={})
    assert 'unknown field "spec.namespaceSelector"' in rejected(kubectl, doc)


def test_a_store_secret_ref_names_no_namespace(
    kubectl: Kubectl, crds: None, namespace: str, cluster_stores: list[str]
) -> None:
    """The Secret's namespace is fixed (cluster resource namespace, or the store's own)."""
    block = couchdb_block()
    block["adminSecretRef"]["namespace"] = "kube-system"
    err = rejected(kubectl, store_for(CRSTORE, namespace, cluster_stores, couchdb=block))
    assert 'unknown field "spec.couchdb.adminSecretRef.namespace"' in err
