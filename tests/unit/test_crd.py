"""Structural checks of the ResultBackend CRD and the examples.

The API server is the real judge of the schema (structural, CEL compiles, CEL
cost); these tests pin down the contract of design/api.md (names, enums,
defaults, printer columns, CEL rules) and keep the CRD consistent with
`resultbackend_operator.api`, which parses what the API server accepted.
"""

from __future__ import annotations

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
CRD_PATH = ROOT / "crds" / "resultbackend.yaml"
EXAMPLES = ROOT / "examples"

Schema = dict[str, Any]


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(CRD_PATH.read_text()) if d]
    assert len(docs) == 1
    doc: dict[str, Any] = docs[0]
    return doc


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    versions = crd["spec"]["versions"]
    assert [v["name"] for v in versions] == [api.VERSION]
    found: dict[str, Any] = versions[0]
    return found


@pytest.fixture(scope="module")
def schema(version: dict[str, Any]) -> Schema:
    root: Schema = version["schema"]["openAPIV3Schema"]
    return root


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


# --- identity ------------------------------------------------------------------


def test_identity(crd: dict[str, Any], version: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == f"{api.PLURAL}.{api.GROUP}"
    spec = crd["spec"]
    assert spec["group"] == api.GROUP
    assert spec["scope"] == "Namespaced"
    names = spec["names"]
    assert names["kind"] == api.KIND
    assert names["plural"] == api.PLURAL
    assert names["singular"] == "resultbackend"
    assert names["shortNames"] == ["rb"]
    assert names["categories"] == ["celery"]
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}


# --- structure and documentation ---------------------------------------------


def test_every_field_has_a_description(schema: Schema) -> None:
    missing = []
    for path, sub in walk(schema):
        # The API server forbids anything but name/generateName rules on the root
        # metadata and publishes it as ObjectMeta, so it carries no description.
        if path == "metadata":
            continue
        # Array items and map values are documented by their array / map.
        if path.endswith(("[]", "{}")) and sub.get("type") != "object":
            continue
        if not str(sub.get("description", "")).strip():
            missing.append(path)
    assert missing == []


def test_schema_is_structural(schema: Schema) -> None:
    for path, sub in walk(schema):
        assert sub.get("type") in {"object", "array", "string", "integer", "boolean"}, path
        if sub["type"] == "array":
            assert "items" in sub, path
        assert not ("properties" in sub and "additionalProperties" in sub), path
        for req in sub.get("required", []):
            assert req in sub.get("properties", {}), f"{path} requires unknown {req}"
        # Only what the operator writes is kept; kopf keeps its state in annotations.
        assert "x-kubernetes-preserve-unknown-fields" not in sub, path


def test_required_fields(schema: Schema) -> None:
    assert schema["required"] == ["spec"]
    assert node(schema, "spec")["required"] == ["type"]
    assert set(node(schema, "spec.couchdb")["required"]) == {"url", "adminSecretRef"}
    assert set(node(schema, "spec.consul")["required"]) == {"url", "tokenSecretRef"}
    assert node(schema, "spec.couchdb.adminSecretRef")["required"] == ["name"]
    assert node(schema, "spec.consul.tokenSecretRef")["required"] == ["name"]
    assert set(node(schema, "spec.workers.selector.matchExpressions.[]")["required"]) == {
        "key",
        "operator",
    }


# --- printer columns -----------------------------------------------------------


def test_printer_columns(version: dict[str, Any]) -> None:
    cols = {c["name"].upper(): c for c in version["additionalPrinterColumns"]}
    default = [
        c["name"].upper() for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0
    ]
    assert default == ["TYPE", "READY", "WORKERS", "URL", "AGE"]
    assert cols["TYPE"]["jsonPath"] == ".spec.type"
    assert cols["READY"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert cols["WORKERS"]["jsonPath"] == ".status.workers.injected"
    assert cols["WORKERS"]["type"] == "integer"
    assert cols["URL"]["jsonPath"] == ".status.url"
    assert cols["AGE"]["jsonPath"] == ".metadata.creationTimestamp"
    assert cols["AGE"]["type"] == "date"
    assert cols["PHASE"]["jsonPath"] == ".status.phase"
    assert cols["PHASE"]["priority"] == 1
    for col in version["additionalPrinterColumns"]:
        assert col["type"] in {"string", "integer", "number", "boolean", "date"}
        # No column may show the Secret or anything derived from credentials.
        assert "secret" not in col["jsonPath"].lower()


# --- enums and defaults --------------------------------------------------------


def _literal(annotation: Any) -> list[str]:
    return list(typing.get_args(annotation))


def test_enums(schema: Schema) -> None:
    spec_fields = api.ResultBackendSpec.model_fields
    # Every type the CRD admits has its spec block and a store module serving it.
    assert node(schema, "spec.type")["enum"] == list(api.STORE_BLOCKS) == ["couchdb", "consul"]
    assert set(node(schema, "spec.type")["enum"]) == set(STORES)
    assert node(schema, "spec.deletionPolicy")["enum"] == ["Retain", "Delete"]
    assert node(schema, "spec.deletionPolicy")["enum"] == _literal(
        spec_fields["deletion_policy"].annotation
    )
    operators = node(schema, "spec.workers.selector.matchExpressions.[].operator")["enum"]
    assert operators == ["In", "NotIn", "Exists", "DoesNotExist"]
    assert operators == _literal(api.LabelSelectorRequirement.model_fields["operator"].annotation)
    assert node(schema, "status.phase")["enum"] == _literal(api.Phase)
    assert node(schema, "status.conditions.[].status")["enum"] == ["True", "False", "Unknown"]


@pytest.mark.parametrize(
    ("path", "model", "field", "expected"),
    [
        (
            "spec.couchdb.adminSecretRef.usernameKey",
            api.CouchDBAdminSecretRef,
            "username_key",
            "username",
        ),
        (
            "spec.couchdb.adminSecretRef.passwordKey",
            api.CouchDBAdminSecretRef,
            "password_key",
            "password",
        ),
        ("spec.consul.tokenSecretRef.key", api.ConsulTokenSecretRef, "key", "token"),
        ("spec.consul.oneClient", api.ConsulSpec, "one_client", False),
        ("spec.deletionPolicy", api.ResultBackendSpec, "deletion_policy", "Retain"),
        ("spec.workers.urlEnvName", api.WorkersSpec, "url_env_name", "CELERY_RESULT_BACKEND"),
    ],
)
def test_defaults_match_the_operator(
    schema: Schema, path: str, model: type[Any], field: str, expected: object
) -> None:
    assert node(schema, path)["default"] == expected
    assert model.model_fields[field].default == expected


def test_no_default_for_identity_derived_fields(schema: Schema) -> None:
    # These default from the object's namespace/name in the operator, which a
    # schema default cannot express; the immutability rules rely on that.
    assert "default" not in node(schema, "spec.couchdb.database")
    assert "default" not in node(schema, "spec.consul.keyPrefix")


# --- patterns and formats ------------------------------------------------------


def test_database_rule_matches_the_operator(schema: Schema) -> None:
    db = node(schema, "spec.couchdb.database")
    assert db["pattern"] == api.COUCHDB_DATABASE_RE.pattern
    assert db["maxLength"] == api.COUCHDB_DATABASE_MAX


URLS = [
    ("http://couchdb.databases.svc:5984", True),
    ("https://couch.example.com/", True),
    ("http://127.0.0.1:8500", True),
    ("http://[::1]:8500", True),
    ("http://couch:5984/db", False),
    ("http://admin:pw@couch:5984", False),
    ("ftp://couch", False),
    ("couch:5984", False),
    ("http://", False),
    ("http://a b:1", False),
]


@pytest.mark.parametrize("block", ["couchdb", "consul"])
@pytest.mark.parametrize(("url", "ok"), URLS)
def test_url_pattern_agrees_with_the_operator(
    schema: Schema, block: str, url: str, ok: bool
) -> None:
    pattern = node(schema, f"spec.{block}.url")["pattern"]
    assert bool(re.search(pattern, url)) is ok
    model = api.CouchDBSpec if block == "couchdb" else api.ConsulSpec
    if block == "couchdb":
        ref = {"adminSecretRef": {"name": "a"}}
    else:
        ref = {"tokenSecretRef": {"name": "t"}}
    try:
        model.model_validate({"url": url, **ref})
        accepted = True
    except ValueError:
        accepted = False
    assert accepted is ok


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
        ('celery" acl = "write', False),
        ("celery/shop.v2/billing_x-1", True),
    ],
)
def test_key_prefix_pattern_agrees_with_the_operator(schema: Schema, prefix: str, ok: bool) -> None:
    sub = node(schema, "spec.consul.keyPrefix")
    assert (bool(re.search(sub["pattern"], prefix)) and len(prefix) >= sub["minLength"]) is ok
    try:
        api.check_key_prefix(prefix)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted is ok


def test_env_name_and_formats(schema: Schema) -> None:
    env = node(schema, "spec.workers.urlEnvName")["pattern"]
    assert re.search(env, "CELERY_RESULT_BACKEND")
    assert re.search(env, "_x1")
    assert not re.search(env, "1X")
    assert not re.search(env, "A-B")
    for path in (
        "spec.rotation.trigger",
        "status.credentialsRotatedAt",
        "status.conditions.[].lastTransitionTime",
    ):
        assert node(schema, path)["format"] == "date-time", path


def test_list_and_map_types(schema: Schema) -> None:
    assert node(schema, "spec.workers.selector")["x-kubernetes-map-type"] == "atomic"
    labels = node(schema, "spec.workers.selector.matchLabels")
    assert labels["additionalProperties"]["type"] == "string"
    containers = node(schema, "spec.workers.containers")
    assert containers["x-kubernetes-list-type"] == "set"
    assert containers["items"]["type"] == "string"
    conditions = node(schema, "status.conditions")
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conditions["items"]["required"]) >= {"type", "status"}
    status = node(schema, "status")
    assert set(status["properties"]) == {
        "observedGeneration",
        "phase",
        "secretName",
        "url",
        "couchdb",
        "consul",
        "workers",
        "credentialsRotatedAt",
        "conditions",
    }
    assert set(node(schema, "status.consul")["properties"]) == {
        "keyPrefix",
        "policyID",
        "tokenAccessorID",
    }
    assert set(node(schema, "status.workers")["properties"]) == {
        "selected",
        "injected",
        "names",
        "conflicts",
    }
    assert node(schema, "status.workers.conflicts")["items"]["type"] == "string"


# --- CEL rules -----------------------------------------------------------------


def test_every_rule_has_a_message(schema: Schema) -> None:
    for path, sub in walk(schema):
        for rule in rules(sub):
            assert rule.get("message", "").strip(), f"{path}: {rule['rule']}"


def test_type_and_block_rule(schema: Schema) -> None:
    spec_rules = [squash(r["rule"]) for r in rules(node(schema, "spec"))]
    assert (
        "self.type == 'couchdb' ? has(self.couchdb) && !has(self.consul)"
        " : has(self.consul) && !has(self.couchdb)"
    ) in spec_rules


def test_type_is_immutable(schema: Schema) -> None:
    assert {"rule": "self == oldSelf", "message": "type is immutable"} in rules(
        node(schema, "spec.type")
    )


@pytest.mark.parametrize(("block", "field"), [("couchdb", "database"), ("consul", "keyPrefix")])
def test_identity_fields_are_immutable_including_presence(
    schema: Schema, block: str, field: str
) -> None:
    expected = (
        f"has(self.{field}) == has(oldSelf.{field}) && "
        f"(!has(self.{field}) || self.{field} == oldSelf.{field})"
    )
    found = [r for r in rules(node(schema, f"spec.{block}")) if squash(r["rule"]) == expected]
    assert len(found) == 1
    assert "immutable" in found[0]["message"]


def test_cel_inputs_are_bounded(schema: Schema) -> None:
    # CEL cost is estimated from the largest possible input: every string and
    # list a rule reads has a bound.
    for path in (
        "spec.couchdb.database",
        "spec.consul.keyPrefix",
        "spec.workers.urlEnvName",
    ):
        assert "maxLength" in node(schema, path), path
    assert "maxItems" in node(schema, "spec.workers.selector.matchExpressions")
    assert "enum" in node(schema, "spec.type")


# --- examples ------------------------------------------------------------------


def _example_files() -> list[Path]:
    return sorted(p for p in EXAMPLES.glob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _check(schema: Schema, value: Any, path: str) -> list[str]:
    """A small validator for the keywords this CRD uses (not a full OpenAPI one)."""
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


def _result_backends() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in _example_files()
        for doc in _docs(path)
        if doc.get("kind") == api.KIND
    ]


def test_examples_cover_both_types() -> None:
    types = sorted(doc["spec"]["type"] for _, doc in _result_backends())
    assert types == ["consul", "couchdb"]


@pytest.mark.parametrize(
    ("path", "doc"), _result_backends(), ids=lambda v: v.name if isinstance(v, Path) else ""
)
def test_example_is_valid_and_parses(schema: Schema, path: Path, doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == api.API_VERSION
    assert _check(schema, doc, "") == []
    defaulted = _apply_defaults(schema, doc)
    for body in (doc, defaulted):
        meta = {**body["metadata"], "uid": "0b5a4a4e-8a3c-4a57-9e0e-2f1f1c4b6b10", "generation": 1}
        rb = api.parse({**body, "metadata": meta})
        assert rb.namespace == "demo"
        assert rb.spec.type == body["spec"]["type"]
        if rb.spec.type == "couchdb":
            assert rb.couchdb_database == f"{rb.namespace}-{rb.name}"
        else:
            assert rb.consul_key_prefix == f"celery/{rb.namespace}/{rb.name}"
    assert defaulted["spec"]["workers"]["urlEnvName"] == "CELERY_RESULT_BACKEND"


@pytest.mark.parametrize("path", _example_files(), ids=lambda p: p.name)
def test_example_file_is_self_contained(path: Path) -> None:
    docs = _docs(path)
    # `kubectl apply -f examples/` applies the files in name order, so each file
    # creates the namespace it needs before its other objects.
    assert docs[0]["kind"] == "Namespace"
    assert docs[0]["metadata"]["name"] == "demo"
    for doc in docs[1:]:
        assert doc["metadata"]["namespace"] == "demo", doc["metadata"]["name"]
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    workloads = [d for d in docs if d["kind"] in {"Deployment", "StatefulSet"}]
    for doc in docs:
        if doc["kind"] != api.KIND:
            continue
        rb = api.parse({**doc, "metadata": {**doc["metadata"], "uid": "u"}})
        if rb.spec.couchdb is not None:
            admin = rb.spec.couchdb.admin_secret_ref
            secret_name, keys = admin.name, {admin.username_key, admin.password_key}
        else:
            assert rb.spec.consul is not None
            token = rb.spec.consul.token_secret_ref
            secret_name, keys = token.name, {token.key}
        secret = secrets[secret_name]
        assert keys <= set(secret.get("stringData", {})) | set(secret.get("data", {}))
        selector = rb.spec.workers.selector
        assert selector is not None
        matched = [w for w in workloads if selector.matches(w["metadata"].get("labels"))]
        assert matched, f"{rb.name}: the selector matches no workload in {path.name}"
