"""The CRD on the real apiserver: installs, accepts the examples, rejects bad input."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, Kubectl
from tests.integration.helpers import apply, couchdb_rb, get_json, unique

pytestmark = pytest.mark.integration


def test_crd_is_established_with_short_name_and_category(kubectl: Kubectl, crd: None) -> None:
    crd_obj = get_json(kubectl, "crd", "resultbackends.resultstores.io")
    names = crd_obj["spec"]["names"]
    assert names["shortNames"] == ["rb"]
    assert "celery" in names["categories"]
    established = [c for c in crd_obj["status"]["conditions"] if c["type"] == "Established"]
    assert established[0]["status"] == "True"


def test_kubectl_explain_documents_spec_fields(kubectl: Kubectl, crd: None) -> None:
    out = kubectl("explain", "rb.spec.couchdb.database").stdout
    assert "CouchDB" in out
    out = kubectl("explain", "rb.spec.workers.urlEnvName").stdout
    assert "CELERY_RESULT_BACKEND" in out


def test_examples_apply_cleanly(kubectl: Kubectl, crd: None) -> None:
    res = kubectl("apply", "-f", str(ROOT / "examples"))
    assert "resultbackend.resultstores.io/orders" in res.stdout
    assert "resultbackend.resultstores.io/billing" in res.stdout
    kubectl("get", "rb", "-n", "demo", "orders", "billing")


def _rejected(kubectl: Kubectl, doc: dict[str, object]) -> str:
    res = kubectl("apply", "-f", "-", stdin=json.dumps(doc), check=False)
    assert res.returncode != 0, f"the apiserver accepted {doc}"
    return res.stderr


def test_unknown_type_is_rejected_naming_the_enum(
    kubectl: Kubectl, crd: None, namespace: str
) -> None:
    doc = couchdb_rb(namespace, "bad", "http://127.0.0.1:5984", "admin")
    doc["spec"]["type"] = "redis"  # type: ignore[index]
    err = _rejected(kubectl, doc)
    assert 'Unsupported value: "redis"' in err


def test_consul_type_with_couchdb_block_is_rejected(
    kubectl: Kubectl, crd: None, namespace: str
) -> None:
    doc = couchdb_rb(namespace, "bad", "http://127.0.0.1:5984", "admin")
    doc["spec"]["type"] = "consul"  # type: ignore[index]
    err = _rejected(kubectl, doc)
    assert "spec.type is consul: set spec.consul and not spec.couchdb" in err


def test_changing_type_of_an_existing_resource_is_rejected(
    kubectl: Kubectl, crd: None, namespace: str
) -> None:
    name = unique("imm")
    apply(kubectl, couchdb_rb(namespace, name, "http://127.0.0.1:5984", "admin"))
    doc = couchdb_rb(namespace, name, "http://127.0.0.1:5984", "admin")
    doc["spec"] = {
        "type": "consul",
        "consul": {"url": "http://127.0.0.1:8500", "tokenSecretRef": {"name": "t"}},
    }
    err = _rejected(kubectl, doc)
    assert "type is immutable" in err


def test_changing_the_database_is_rejected(kubectl: Kubectl, crd: None, namespace: str) -> None:
    name = unique("imm")
    doc = couchdb_rb(namespace, name, "http://127.0.0.1:5984", "admin")
    doc["spec"]["couchdb"]["database"] = "first"  # type: ignore[index]
    apply(kubectl, doc)
    doc["spec"]["couchdb"]["database"] = "second"  # type: ignore[index]
    err = _rejected(kubectl, doc)
    assert "couchdb.database is immutable" in err


def test_url_with_credentials_is_rejected(kubectl: Kubectl, crd: None, namespace: str) -> None:
    doc = couchdb_rb(namespace, "bad", "http://admin:pw@127.0.0.1:5984", "admin")
    err = _rejected(kubectl, doc)
    assert "spec.couchdb.url" in err
