"""Structural checks of the three CRDs (ClusterResultStore, ResultStore, ResultBackend)
and of the examples.

The API server is the real judge of the schema (structural, CEL compiles, CEL
cost, what the rules accept: tests/integration/test_crd_admission.py); these tests
pin down the contract of design/api.md (names, enums, defaults, printer columns,
CEL rules, documentation) and keep the CRDs consistent with
`resultbackend_operator.api`, which parses what the API server accepted.
"""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from resultbackend_operator import api
from resultbackend_operator.backends import STORES

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
EXAMPLES = ROOT / "examples"

Schema = dict[str, Any]

RB = "ResultBackend"
RSTORE = "ResultStore"
CRSTORE = "ClusterResultStore"
STORE_KINDS = (CRSTORE, RSTORE)
KINDS = (CRSTORE, RSTORE, RB)

# design/api.md: names, scope, short name of each kind.
IDENTITY = {
    CRSTORE: ("clusterresultstores", "clusterresultstore", "crstore", "Cluster"),
    RSTORE: ("resultstores", "resultstore", "rstore", "Namespaced"),
    RB: ("resultbackends", "resultbackend", "rb", "Namespaced"),
}
VERSION = "v1alpha2"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def crds() -> dict[str, dict[str, Any]]:
    """kind -> its CRD, from every file of crds/ (one CRD per file)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        (doc,) = _docs(path)
        found[doc["spec"]["names"]["kind"]] = doc
    return found


def version_of(crd: dict[str, Any]) -> dict[str, Any]:
    (found,) = crd["spec"]["versions"]
    return dict(found)


def schema_of(crd: dict[str, Any]) -> Schema:
    root: Schema = version_of(crd)["schema"]["openAPIV3Schema"]
    return root


@pytest.fixture(scope="module")
def schemas(crds: dict[str, dict[str, Any]]) -> dict[str, Schema]:
    return {kind: schema_of(crd) for kind, crd in crds.items()}


@pytest.fixture(scope="module")
def rb(schemas: dict[str, Schema]) -> Schema:
    return schemas[RB]


def node(schema: Schema, path: str) -> Schema:
    """The sub-schema at a dotted path; `[]` steps into array items."""
    cur = schema
    for part in path.split("."):
        cur = cur["items"] if part == "[]" else cur["properties"][part]
    return cur


def walk(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every sub-schema with its path, the root included."""
    yield path or "<root>", schema
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}" if path else name)
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def rules(schema: Schema) -> list[dict[str, Any]]:
    return list(schema.get("x-kubernetes-validations", []))


def squash(text: str) -> str:
    return " ".join(text.split())


def undocumented(schema: Schema) -> Schema:
    """The schema without descriptions (to compare shapes that are documented apart)."""
    out = copy.deepcopy(schema)
    for _, sub in walk(out):
        sub.pop("description", None)
    return out


# --- files and identity ------------------------------------------------------------


def test_crds_folder_holds_one_crd_per_kind_and_nothing_else() -> None:
    """`kubectl apply -f crds/` installs exactly the three CRDs."""
    files = sorted(p.name for p in CRDS.iterdir())
    assert files == ["clusterresultstores.yaml", "resultbackends.yaml", "resultstores.yaml"]
    for path in CRDS.iterdir():
        (doc,) = _docs(path)
        assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
        assert doc["kind"] == "CustomResourceDefinition"
        assert path.name == f"{doc['spec']['names']['plural']}.yaml"


@pytest.mark.parametrize("kind", KINDS)
def test_identity(crds: dict[str, dict[str, Any]], kind: str) -> None:
    plural, singular, short, scope = IDENTITY[kind]
    crd = crds[kind]
    assert crd["metadata"]["name"] == f"{plural}.{api.GROUP}"
    spec = crd["spec"]
    assert spec["group"] == api.GROUP == "resultstores.io"
    assert spec["scope"] == scope
    assert spec["names"] == {
        "kind": kind,
        "listKind": f"{kind}List",
        "plural": plural,
        "singular": singular,
        "shortNames": [short],
        "categories": ["celery"],
    }
    # v1alpha2 only: v1alpha1 is no longer served (alpha, no conversion).
    assert [v["name"] for v in spec["versions"]] == [VERSION]
    version = version_of(crd)
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}
    assert "conversion" not in spec


def test_the_operator_speaks_the_crds_version_and_names() -> None:
    assert api.VERSION == VERSION
    assert f"resultstores.io/{VERSION}" == api.API_VERSION
    assert (RB, IDENTITY[RB][0]) == (api.KIND, api.PLURAL)
    assert {kind: IDENTITY[kind][0] for kind in STORE_KINDS} == api.STORE_PLURALS


# --- structure and documentation ---------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_has_a_description(schemas: dict[str, Schema], kind: str) -> None:
    """`kubectl explain` documents every field, to the last nested one."""
    missing = []
    for path, sub in walk(schemas[kind]):
        # The API server forbids anything but name/generateName rules on the root
        # metadata and publishes it as ObjectMeta, so it carries no description.
        if path == "metadata":
            continue
        # Array items and map values that are not objects are documented by their
        # array / map (kubectl explain shows them as `<[]string>`).
        if path.endswith(("[]", "{}")) and sub.get("type") != "object":
            continue
        if not str(sub.get("description", "")).strip():
            missing.append(path)
    assert missing == []


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_structural(schemas: dict[str, Schema], kind: str) -> None:
    for path, sub in walk(schemas[kind]):
        assert sub.get("type") in {"object", "array", "string", "integer", "boolean"}, path
        if sub["type"] == "array":
            assert "items" in sub, path
        assert not ("properties" in sub and "additionalProperties" in sub), path
        for req in sub.get("required", []):
            assert req in sub.get("properties", {}), f"{path} requires unknown {req}"
        # Only what the operator writes is kept; kopf keeps its state in annotations.
        assert "x-kubernetes-preserve-unknown-fields" not in sub, path


def test_required_fields(schemas: dict[str, Schema]) -> None:
    rb = schemas[RB]
    assert rb["required"] == ["spec"]
    assert node(rb, "spec")["required"] == ["storeRef"]
    assert node(rb, "spec.storeRef")["required"] == ["name"]
    assert "required" not in node(rb, "spec.couchdb")
    assert "required" not in node(rb, "spec.consul")
    assert set(node(rb, "spec.workers.selector.matchExpressions.[]")["required"]) == {
        "key",
        "operator",
    }
    for kind in STORE_KINDS:
        store = schemas[kind]
        assert store["required"] == ["spec"]
        # Which block is required is a CEL rule: exactly one of them.
        assert "required" not in node(store, "spec")
        assert set(node(store, "spec.couchdb")["required"]) == {"url", "adminSecretRef"}
        assert set(node(store, "spec.consul")["required"]) == {"url", "tokenSecretRef"}
        assert node(store, "spec.couchdb.adminSecretRef")["required"] == ["name"]
        assert node(store, "spec.consul.tokenSecretRef")["required"] == ["name"]


def test_spec_fields(schemas: dict[str, Schema]) -> None:
    """A ResultBackend names no URL and no Secret: those belong to its store."""
    rb = schemas[RB]
    assert set(node(rb, "spec")["properties"]) == {
        "storeRef",
        "couchdb",
        "consul",
        "deletionPolicy",
        "workers",
        "rotation",
    }
    assert set(node(rb, "spec.storeRef")["properties"]) == {"kind", "name"}
    assert set(node(rb, "spec.couchdb")["properties"]) == {"database"}
    assert set(node(rb, "spec.consul")["properties"]) == {"keyPrefix", "oneClient"}
    for path, _ in walk(node(rb, "spec")):
        for name in path.lower().split("."):
            assert name != "url", path
            assert not re.search(r"secret|token|password", name), path
    assert set(node(schemas[CRSTORE], "spec")["properties"]) == {
        "couchdb",
        "consul",
        "namespaceSelector",
    }
    assert set(node(schemas[RSTORE], "spec")["properties"]) == {"couchdb", "consul"}
    for kind in STORE_KINDS:
        store = schemas[kind]
        assert set(node(store, "spec.couchdb")["properties"]) == {"url", "adminSecretRef"}
        assert set(node(store, "spec.consul")["properties"]) == {"url", "tokenSecretRef"}
        # The Secret's namespace is not the user's to choose: the cluster resource
        # namespace for a ClusterResultStore, its own for a ResultStore.
        assert set(node(store, "spec.couchdb.adminSecretRef")["properties"]) == {
            "name",
            "usernameKey",
            "passwordKey",
        }
        assert set(node(store, "spec.consul.tokenSecretRef")["properties"]) == {"name", "key"}


def test_both_store_kinds_share_their_schema(schemas: dict[str, Schema]) -> None:
    """The two store kinds differ only in scope, namespaceSelector and where the Secret is."""
    cluster, namespaced = schemas[CRSTORE], schemas[RSTORE]
    for path in ("spec.couchdb", "spec.consul", "status"):
        assert undocumented(node(cluster, path)) == undocumented(node(namespaced, path)), path
    assert rules(node(cluster, "spec")) == rules(node(namespaced, "spec"))
    secret = "spec.couchdb.adminSecretRef.name"
    assert "cluster resource namespace" in node(cluster, secret)["description"]
    assert "ResultStore's namespace" in node(namespaced, secret)["description"]


def test_namespace_selector_is_a_label_selector(schemas: dict[str, Schema]) -> None:
    selector = node(schemas[CRSTORE], "spec.namespaceSelector")
    assert selector["x-kubernetes-map-type"] == "atomic"
    # The same LabelSelector as workers.selector (which api.LabelSelector parses).
    assert undocumented(selector) == undocumented(node(schemas[RB], "spec.workers.selector"))
    assert "every namespace" in selector["description"]


# --- printer columns -----------------------------------------------------------


READY = '.status.conditions[?(@.type=="Ready")].status'
AGE = ".metadata.creationTimestamp"


def _columns(crd: dict[str, Any]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    cols = version_of(crd)["additionalPrinterColumns"]
    default = [c["name"].upper() for c in cols if c.get("priority", 0) == 0]
    return default, {c["name"].upper(): c for c in cols}


def test_printer_columns_of_result_backends(crds: dict[str, dict[str, Any]]) -> None:
    default, cols = _columns(crds[RB])
    assert default == ["STORE", "TYPE", "READY", "WORKERS", "URL", "AGE"]
    expected = {
        "STORE": (".spec.storeRef.name", "string"),
        "TYPE": (".status.store.type", "string"),
        "READY": (READY, "string"),
        "WORKERS": (".status.workers.injected", "integer"),
        "URL": (".status.url", "string"),
        "AGE": (AGE, "date"),
        # -o wide
        "STORE KIND": (".spec.storeRef.kind", "string"),
        "PHASE": (".status.phase", "string"),
    }
    assert {name: (c["jsonPath"], c["type"]) for name, c in cols.items()} == expected
    assert cols["STORE KIND"]["priority"] == cols["PHASE"]["priority"] == 1


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_printer_columns_of_stores(crds: dict[str, dict[str, Any]], kind: str) -> None:
    default, cols = _columns(crds[kind])
    assert default == ["TYPE", "READY", "VERSION", "BACKENDS", "URL", "AGE"]
    assert {name: (c["jsonPath"], c["type"]) for name, c in cols.items()} == {
        "TYPE": (".status.type", "string"),
        "READY": (READY, "string"),
        "VERSION": (".status.serverVersion", "string"),
        "BACKENDS": (".status.resultBackends", "integer"),
        "URL": (".status.url", "string"),
        "AGE": (AGE, "date"),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_printer_columns_show_no_secret(crds: dict[str, dict[str, Any]], kind: str) -> None:
    for col in version_of(crds[kind])["additionalPrinterColumns"]:
        assert col["type"] in {"string", "integer", "number", "boolean", "date"}
        # No column may show a Secret or anything derived from credentials.
        assert not re.search(r"secret|token|password|user", col["jsonPath"], re.IGNORECASE)
        # Every path a column shows exists in the schema (a typo shows an empty column).
        if col["jsonPath"] != AGE:
            path = col["jsonPath"].lstrip(".").split("[")[0]
            node(schema_of(crds[kind]), path)


# --- enums and defaults --------------------------------------------------------


def test_store_blocks(schemas: dict[str, Schema]) -> None:
    """Every store type the CRDs admit has its spec blocks and a store module serving it."""
    blocks = list(api.STORE_BLOCKS)
    assert blocks == ["couchdb", "consul"]
    assert set(blocks) == set(STORES)
    for kind in STORE_KINDS:
        assert [b for b in node(schemas[kind], "spec")["properties"] if b in blocks] == blocks
    assert [b for b in node(schemas[RB], "spec")["properties"] if b in blocks] == blocks


def test_enums(rb: Schema) -> None:
    assert node(rb, "spec.storeRef.kind")["enum"] == list(STORE_KINDS)
    assert node(rb, "spec.deletionPolicy")["enum"] == ["Retain", "Delete"]
    operators = node(rb, "spec.workers.selector.matchExpressions.[].operator")["enum"]
    assert operators == ["In", "NotIn", "Exists", "DoesNotExist"]
    assert node(rb, "status.phase")["enum"] == [
        "Pending",
        "Provisioning",
        "Ready",
        "Degraded",
        "Deleting",
        "Failed",
    ]
    assert node(rb, "status.conditions.[].status")["enum"] == ["True", "False", "Unknown"]


def test_enums_agree_with_the_operator(rb: Schema) -> None:
    def literal(model: Any, field: str) -> list[str]:
        return list(typing.get_args(model.model_fields[field].annotation))

    kinds = node(rb, "spec.storeRef.kind")["enum"]
    assert set(kinds) == set(literal(api.StoreRef, "kind"))
    assert node(rb, "spec.deletionPolicy")["enum"] == literal(
        api.ResultBackendSpec, "deletion_policy"
    )
    operators = node(rb, "spec.workers.selector.matchExpressions.[].operator")["enum"]
    assert operators == literal(api.LabelSelectorRequirement, "operator")
    assert node(rb, "status.phase")["enum"] == list(typing.get_args(api.Phase))


STORE_DEFAULTS = [
    (
        "spec.couchdb.adminSecretRef.usernameKey",
        "CouchDBAdminSecretRef",
        "username_key",
        "username",
    ),
    (
        "spec.couchdb.adminSecretRef.passwordKey",
        "CouchDBAdminSecretRef",
        "password_key",
        "password",
    ),
    ("spec.consul.tokenSecretRef.key", "ConsulTokenSecretRef", "key", "token"),
]
RB_DEFAULTS = [
    ("spec.storeRef.kind", "StoreRef", "kind", "ResultStore"),
    ("spec.consul.oneClient", "ConsulOptions", "one_client", False),
    ("spec.deletionPolicy", "ResultBackendSpec", "deletion_policy", "Retain"),
    ("spec.workers.urlEnvName", "WorkersSpec", "url_env_name", "CELERY_RESULT_BACKEND"),
]


DEFAULTS = [(k, *d) for k in STORE_KINDS for d in STORE_DEFAULTS] + [(RB, *d) for d in RB_DEFAULTS]


@pytest.mark.parametrize(("kind", "path", "model", "field", "expected"), DEFAULTS)
def test_defaults(
    schemas: dict[str, Schema], kind: str, path: str, model: str, field: str, expected: object
) -> None:
    assert node(schemas[kind], path)["default"] == expected


def test_defaults_agree_with_the_operator() -> None:
    """The operator's models default the same way (for a CRD applied without defaulting,
    and for the unit tests' bodies)."""
    for _, _, model, field, expected in DEFAULTS:
        assert getattr(api, model).model_fields[field].default == expected, (model, field)


def test_defaults_are_the_only_ones(schemas: dict[str, Schema]) -> None:
    expected = {
        RB: {d[0] for d in RB_DEFAULTS},
        CRSTORE: {d[0] for d in STORE_DEFAULTS},
        RSTORE: {d[0] for d in STORE_DEFAULTS},
    }
    for kind, schema in schemas.items():
        assert {path for path, sub in walk(schema) if "default" in sub} == expected[kind]


def test_no_default_for_identity_derived_fields(rb: Schema) -> None:
    # These default from the object's namespace/name in the operator, which a
    # schema default cannot express; the immutability rules rely on that.
    assert "default" not in node(rb, "spec.couchdb.database")
    assert "default" not in node(rb, "spec.consul.keyPrefix")


# --- patterns and formats ------------------------------------------------------


def test_database_rule_matches_the_operator(rb: Schema) -> None:
    db = node(rb, "spec.couchdb.database")
    assert db["pattern"] == api.COUCHDB_DATABASE_RE.pattern == "^[a-z][a-z0-9_$()+/-]*$"
    assert db["maxLength"] == api.COUCHDB_DATABASE_MAX == 238


URLS = [
    ("http://couchdb.databases.svc:5984", True),
    ("https://couch.example.com/", True),
    ("http://127.0.0.1:8500", True),
    ("http://[::1]:8500", True),
    ("http://couch:5984/db", False),
    ("http://admin:pw@couch:5984", False),
    ("http://admin@couch:5984", False),
    ("ftp://couch", False),
    ("couch:5984", False),
    ("http://", False),
    ("http://a b:1", False),
]


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("block", ["couchdb", "consul"])
@pytest.mark.parametrize(("url", "ok"), URLS)
def test_url_pattern(schemas: dict[str, Schema], kind: str, block: str, url: str, ok: bool) -> None:
    sub = node(schemas[kind], f"spec.{block}.url")
    assert bool(re.search(sub["pattern"], url)) is ok
    assert sub["maxLength"] == 2048


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("block", ["couchdb", "consul"])
def test_url_rule_agrees_with_the_operator(kind: str, block: str) -> None:
    ref = (
        {"adminSecretRef": {"name": "a"}}
        if block == "couchdb"
        else {"tokenSecretRef": {"name": "t"}}
    )
    for url, ok in URLS:
        body = {"kind": kind, "metadata": {"name": "s"}, "spec": {block: {"url": url, **ref}}}
        try:
            api.parse_store(body)
            accepted = True
        except ValueError:
            accepted = False
        assert accepted is ok, url


@pytest.mark.parametrize(
    ("prefix", "ok"),
    [
        ("celery/shop/billing", True),
        ("c", True),
        ("a/b", True),
        ("/celery", False),
        ("celery/", False),
        ("/", False),
        ("", False),
        ("a//b", False),
        ("a/../b", False),
        ('celery" acl = "write', False),
        ("celery/shop.v2/billing_x-1", True),
        ("x" * 512, True),
        ("x" * 513, False),
    ],
)
def test_key_prefix_pattern_agrees_with_the_operator(rb: Schema, prefix: str, ok: bool) -> None:
    sub = node(rb, "spec.consul.keyPrefix")
    assert sub["pattern"] == api.KEY_PREFIX_RE.pattern
    assert sub["maxLength"] == api.KEY_PREFIX_MAX
    admitted = sub["minLength"] <= len(prefix) <= sub["maxLength"]
    assert (bool(re.search(sub["pattern"], prefix)) and admitted) is ok
    try:
        api.check_key_prefix(prefix)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted is ok


def test_env_name_and_formats(schemas: dict[str, Schema]) -> None:
    rb = schemas[RB]
    env = node(rb, "spec.workers.urlEnvName")["pattern"]
    assert re.search(env, "CELERY_RESULT_BACKEND")
    assert re.search(env, "_x1")
    assert not re.search(env, "1X")
    assert not re.search(env, "A-B")
    for path in (
        "spec.rotation.trigger",
        "status.credentialsRotatedAt",
        "status.conditions.[].lastTransitionTime",
    ):
        assert node(rb, path)["format"] == "date-time", path
    for kind in STORE_KINDS:
        assert node(schemas[kind], "status.conditions.[].lastTransitionTime")["format"] == (
            "date-time"
        )


def test_list_and_map_types(schemas: dict[str, Schema]) -> None:
    rb = schemas[RB]
    assert node(rb, "spec.workers.selector")["x-kubernetes-map-type"] == "atomic"
    labels = node(rb, "spec.workers.selector.matchLabels")
    assert labels["additionalProperties"]["type"] == "string"
    containers = node(rb, "spec.workers.containers")
    assert containers["x-kubernetes-list-type"] == "set"
    assert containers["items"]["type"] == "string"
    for schema in schemas.values():
        conditions = node(schema, "status.conditions")
        assert conditions["x-kubernetes-list-type"] == "map"
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]
        assert set(conditions["items"]["required"]) >= {"type", "status"}
        # metav1.Condition's shape: the operator's conditions are written as they are.
        assert set(conditions["items"]["properties"]) == {
            "type",
            "status",
            "observedGeneration",
            "lastTransitionTime",
            "reason",
            "message",
        }


def test_result_backend_status_admits_every_field_the_operator_writes(rb: Schema) -> None:
    # A field missing here would be pruned from every status write without a word.
    status = node(rb, "status")
    assert set(status["properties"]) == {
        "observedGeneration",
        "phase",
        "store",
        "secretName",
        "url",
        "couchdb",
        "consul",
        "workers",
        "credentialsRotatedAt",
        "conditions",
    }
    assert set(node(rb, "status.store")["properties"]) == {"kind", "name", "type"}
    assert set(node(rb, "status.couchdb")["properties"]) == {"database", "user"}
    assert set(node(rb, "status.consul")["properties"]) == {
        "keyPrefix",
        "policyID",
        "tokenAccessorID",
    }
    assert set(node(rb, "status.workers")["properties"]) == {
        "selected",
        "injected",
        "names",
        "conflicts",
    }
    assert node(rb, "status.workers.conflicts")["items"]["type"] == "string"


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_store_status(schemas: dict[str, Schema], kind: str) -> None:
    status = node(schemas[kind], "status")
    assert set(status["properties"]) == {
        "observedGeneration",
        "type",
        "url",
        "serverVersion",
        "resultBackends",
        "conditions",
    }
    assert node(status, "resultBackends")["type"] == "integer"
    # Every Ready reason of design/api.md is documented where kubectl explain shows it.
    reasons = node(status, "conditions")["description"]
    for reason in (
        "SecretNotFound",
        "SecretKeyMissing",
        "AdminAuthFailed",
        "Forbidden",
        "Unreachable",
        "UnsupportedVersion",
        "InUse",
    ):
        assert reason in reasons


# --- CEL rules -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_rule_has_a_message(schemas: dict[str, Schema], kind: str) -> None:
    for path, sub in walk(schemas[kind]):
        for rule in rules(sub):
            assert rule.get("message", "").strip(), f"{path}: {rule['rule']}"


def _rule(schema: Schema, expected: str) -> dict[str, Any]:
    found = [r for r in rules(schema) if squash(r["rule"]) == expected]
    assert len(found) == 1, f"{expected!r} not among {[squash(r['rule']) for r in rules(schema)]}"
    return found[0]


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_store_has_exactly_one_block_of_an_immutable_type(
    schemas: dict[str, Schema], kind: str
) -> None:
    spec = node(schemas[kind], "spec")
    assert len(rules(spec)) == 2
    one = _rule(spec, "has(self.couchdb) != has(self.consul)")
    assert "exactly one" in one["message"]
    # A transition rule (oldSelf): runs on updates only. The url inside a block may change.
    kept = _rule(
        spec,
        "has(self.couchdb) == has(oldSelf.couchdb) && has(self.consul) == has(oldSelf.consul)",
    )
    assert "immutable" in kept["message"]
    for block in ("couchdb", "consul"):
        for path, sub in walk(node(spec, block)):
            assert not rules(sub), f"{block}.{path}: the url and the Secret may change"


def test_result_backend_has_at_most_one_option_block(rb: Schema) -> None:
    rule = _rule(node(rb, "spec"), "!(has(self.couchdb) && has(self.consul))")
    assert "at most one" in rule["message"]


def test_store_ref_is_immutable_as_a_whole(rb: Schema) -> None:
    ref = node(rb, "spec.storeRef")
    assert [squash(r["rule"]) for r in rules(ref)] == ["self == oldSelf"]
    assert "storeRef is immutable" in rules(ref)[0]["message"]
    # Nothing below it has a rule of its own (kind and name go with the whole).
    for path, sub in walk(ref):
        if path != "<root>":
            assert not rules(sub), path


@pytest.mark.parametrize(("block", "field"), [("couchdb", "database"), ("consul", "keyPrefix")])
def test_identity_fields_are_immutable_including_presence(
    rb: Schema, block: str, field: str
) -> None:
    """Neither changed, nor added, nor removed, whether or not the block itself comes or goes.

    The rule sits on spec (a transition rule on the block would not run when the block
    appears or disappears), and guards every has() on a nested field by the block's own
    has() (has(self.couchdb.database) is an error when spec.couchdb is absent).
    """
    now = f"has(self.{block}) && has(self.{block}.{field})"
    before = f"has(oldSelf.{block}) && has(oldSelf.{block}.{field})"
    expected = (
        f"{now} ? {before} && self.{block}.{field} == oldSelf.{block}.{field}"
        f" : !has(oldSelf.{block}) || !has(oldSelf.{block}.{field})"
    )
    rule = _rule(node(rb, "spec"), expected)
    assert rule["message"].startswith(f"spec.{block}.{field} is immutable")
    assert rule["fieldPath"] == f".{block}.{field}"
    node(rb, f"spec{rule['fieldPath']}")  # the fieldPath exists in the schema


def test_url_env_name_is_not_the_consul_token(rb: Schema) -> None:
    rule = _rule(node(rb, "spec.workers.urlEnvName"), "self != 'CONSUL_HTTP_TOKEN'")
    assert "CONSUL_HTTP_TOKEN" in rule["message"]


def test_rules_are_where_expected(schemas: dict[str, Schema]) -> None:
    """No rule hides anywhere else (each one is pinned by a test above)."""
    found = {
        (kind, path) for kind, schema in schemas.items() for path, sub in walk(schema) if rules(sub)
    }
    selector_items = "matchExpressions[]"
    assert found == {
        (RB, "spec"),
        (RB, "spec.storeRef"),
        (RB, "spec.workers.urlEnvName"),
        (RB, f"spec.workers.selector.{selector_items}"),
        (CRSTORE, "spec"),
        (CRSTORE, f"spec.namespaceSelector.{selector_items}"),
        (RSTORE, "spec"),
    }
    assert len(rules(node(schemas[RB], "spec"))) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_cel_inputs_are_bounded(schemas: dict[str, Schema], kind: str) -> None:
    # CEL cost is estimated from the largest possible input: every string and list a
    # rule reads has a bound.
    schema = schemas[kind]
    for path, sub in walk(schema):
        if sub.get("type") == "array" and path.endswith("matchExpressions"):
            assert "maxItems" in sub, path
    if kind == RB:
        for path in ("spec.couchdb.database", "spec.consul.keyPrefix", "spec.workers.urlEnvName"):
            assert "maxLength" in node(schema, path), path
        assert "maxLength" in node(schema, "spec.storeRef.name")
        assert "enum" in node(schema, "spec.storeRef.kind")


# --- examples ------------------------------------------------------------------


def _example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def _check(schema: Schema, value: Any, path: str) -> list[str]:
    """A small validator for the keywords these CRDs use (not a full OpenAPI one)."""
    errors: list[str] = []
    kind = schema.get("type")
    python_types: dict[str, Any] = {
        "object": dict,
        "array": list,
        "string": str,
        "boolean": bool,
        "integer": int,
    }
    if kind and not isinstance(value, python_types[kind]):
        return [f"{path}: expected {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{path}: too long")
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: too short")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for req in schema.get("required", []):
            if req not in value:
                errors.append(f"{path}.{req}: required")
        for key, sub in value.items():
            if key in props:
                errors += _check(props[key], sub, f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += _check(schema["additionalProperties"], sub, f"{path}.{key}")
            elif path != ".metadata":  # ObjectMeta is not in the CRD schema
                errors.append(f"{path}.{key}: unknown field")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{path}: too many items")
        for i, item in enumerate(value):
            errors += _check(schema["items"], item, f"{path}[{i}]")
    return errors


def _apply_defaults(schema: Schema, value: Any) -> Any:
    """Structural defaulting as the API server does it: only where the parent exists."""
    if isinstance(value, dict):
        out = dict(value)
        for key, sub in schema.get("properties", {}).items():
            if key not in out and "default" in sub:
                out[key] = sub["default"]
            if key in out:
                out[key] = _apply_defaults(sub, out[key])
        return out
    if isinstance(value, list) and "items" in schema:
        return [_apply_defaults(schema["items"], item) for item in value]
    return value


def _ours() -> list[tuple[str, dict[str, Any]]]:
    """Every example object of our API group, with its file's name."""
    return [
        (path.name, doc)
        for path in _example_files()
        for doc in _docs(path)
        if str(doc.get("apiVersion", "")).startswith(f"{api.GROUP}/")
    ]


def _with_identity(body: dict[str, Any]) -> dict[str, Any]:
    meta = {**body["metadata"], "uid": "0b5a4a4e-8a3c-4a57-9e0e-2f1f1c4b6b10", "generation": 1}
    return {**body, "metadata": meta}


def test_examples_cover_every_kind_and_store_type() -> None:
    """design/api.md's examples: a ClusterResultStore per store type, a namespaced
    ResultStore, and ResultBackends that reference them."""
    objs = [doc for _, doc in _ours()]
    kinds = {doc["kind"] for doc in objs}
    assert kinds == set(KINDS)
    cluster_types = {
        next(b for b in api.STORE_BLOCKS if b in doc["spec"])
        for doc in objs
        if doc["kind"] == CRSTORE
    }
    assert cluster_types == set(api.STORE_BLOCKS)
    stores = {
        (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])
        for doc in objs
        if doc["kind"] in STORE_KINDS
    }
    for doc in objs:
        if doc["kind"] != RB:
            continue
        ref = doc["spec"]["storeRef"]
        kind = ref.get("kind", RSTORE)
        namespace = doc["metadata"]["namespace"] if kind == RSTORE else ""
        assert (kind, namespace, ref["name"]) in stores, f"{doc['metadata']['name']}: {ref}"


@pytest.mark.parametrize(
    ("filename", "doc"),
    _ours(),
    ids=lambda v: v if isinstance(v, str) else f"{v['kind']}/{v['metadata']['name']}",
)
def test_example_is_valid_and_parses(
    schemas: dict[str, Schema], filename: str, doc: dict[str, Any]
) -> None:
    assert doc["apiVersion"] == api.API_VERSION, filename
    schema = schemas[doc["kind"]]
    assert _check(schema, doc, "") == []
    defaulted = _apply_defaults(schema, doc)
    for body in (doc, defaulted):
        if doc["kind"] == RB:
            parsed = api.parse(_with_identity(body))
            assert parsed.name == doc["metadata"]["name"]
        else:
            store = api.parse_store(_with_identity(body))
            assert store.kind == doc["kind"]
            if doc["kind"] == CRSTORE:
                assert "namespace" not in doc["metadata"]
            else:
                assert doc["metadata"]["namespace"]
    if doc["kind"] == RB:
        assert defaulted["spec"]["storeRef"]["kind"] in STORE_KINDS
        if "workers" in doc["spec"]:  # a ResultBackend without workers injects nothing
            assert defaulted["spec"]["workers"]["urlEnvName"] == "CELERY_RESULT_BACKEND"
