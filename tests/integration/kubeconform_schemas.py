"""JSON schemas for kubeconform, generated locally (no download at test time).

kubeconform looks schemas up as
`<dir>/v<kubernetes version>-standalone-strict/<kind><suffix>.json` when it runs with
`-strict -kubernetes-version X -schema-location <dir>`. This module writes that layout:

- built-in kinds from the running apiserver's `/openapi/v2` (so the schemas are those
  of our pinned Kubernetes version), each file carrying the definitions it references;
- custom kinds from CRD manifests (their `openAPIV3Schema`).

"Strict" means what kubeconform's upstream schemas mean by it: every object schema
that lists its properties rejects any other property.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

Schema = dict[str, Any]

INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
QUANTITY = {"oneOf": [{"type": "string"}, {"type": "number"}]}
_SPECIAL_DEFS = {
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": INT_OR_STRING,
    "io.k8s.apimachinery.pkg.api.resource.Quantity": QUANTITY,
}


def schema_dir(root: Path, kubernetes_version: str) -> Path:
    """The folder kubeconform reads for `-kubernetes-version` with `-strict`."""
    return root / f"v{kubernetes_version.lstrip('v')}-standalone-strict"


def file_name(kind: str, api_version: str) -> str:
    """kubeconform's file name for a kind (pkg/registry/registry.go, schemaPath)."""
    group, _, version = api_version.rpartition("/")
    suffix = f"-{group.split('.')[0].lower()}-{version.lower()}" if group else f"-{version}"
    return f"{kind.lower()}{suffix}.json"


_SCHEMA_KEYWORDS = ("items", "additionalProperties", "not", "additionalItems")
_SCHEMA_LIST_KEYWORDS = ("allOf", "anyOf", "oneOf")
_SCHEMA_MAP_KEYWORDS = ("properties", "patternProperties", "definitions")


def strictify(schema: Any) -> Any:
    """A copy where objects with listed properties forbid others; int-or-string fixed.

    Walks schema keywords only: a property *named* "type" or "properties" (as in
    JSONSchemaProps) is a name in a map, not a keyword.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_KEYWORDS:
        if isinstance(out.get(key), dict):
            out[key] = strictify(out[key])
        elif key == "items" and isinstance(out.get(key), list):
            out[key] = [strictify(s) for s in out[key]]
    for key in _SCHEMA_LIST_KEYWORDS:
        if isinstance(out.get(key), list):
            out[key] = [strictify(s) for s in out[key]]
    for key in _SCHEMA_MAP_KEYWORDS:
        if isinstance(out.get(key), dict):
            out[key] = {name: strictify(s) for name, s in out[key].items()}
    if out.get("format") == "int-or-string" or out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.pop("format", None)
        out.update(copy.deepcopy(INT_OR_STRING))
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _refs(schema: Any) -> Iterator[str]:
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/definitions/"):
            yield ref[len("#/definitions/") :]
        for value in schema.values():
            yield from _refs(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _refs(value)


def _closure(definitions: dict[str, Schema], start: str) -> dict[str, Schema]:
    seen: dict[str, Schema] = {}
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen[name] = definitions[name]
        todo.extend(_refs(definitions[name]))
    return seen


def from_openapi_v2(swagger: Schema, out: Path) -> list[str]:
    """Write one schema per kind the apiserver serves; returns the file names."""
    out.mkdir(parents=True, exist_ok=True)
    definitions: dict[str, Schema] = {
        name: copy.deepcopy(_SPECIAL_DEFS.get(name)) or strictify(d)
        for name, d in swagger["definitions"].items()
    }
    written = []
    for name, definition in swagger["definitions"].items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            schema = dict(definitions[name])
            schema["definitions"] = _closure(definitions, name)
            schema["$schema"] = "http://json-schema.org/draft-07/schema#"
            fname = file_name(gvk["kind"], api_version)
            (out / fname).write_text(json.dumps(schema))
            written.append(fname)
    return written


def from_crds(crds: Iterable[Schema], out: Path) -> list[str]:
    """Write one schema per served version of each CRD; returns the file names."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for crd in crds:
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema: Schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            # The apiserver adds these to every custom resource's schema implicitly.
            props = schema.setdefault("properties", {})
            props.setdefault("apiVersion", {"type": "string"})
            props.setdefault("kind", {"type": "string"})
            props.setdefault("metadata", {"type": "object"})
            schema = strictify(schema)
            schema["$schema"] = "http://json-schema.org/draft-07/schema#"
            fname = file_name(kind, f"{group}/{version['name']}")
            (out / fname).write_text(json.dumps(schema))
            written.append(fname)
    return written
