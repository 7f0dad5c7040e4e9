"""File checks of the Helm chart and the Dockerfile (no helm, no docker, no servers).

Rendering, kubeconform and install are in tests/integration/test_chart.py.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from resultbackend_operator import __version__
from tests.dockerfile import DOCKERFILE, instructions

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "resultbackend-operator"
VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"


def load_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(VALUES.read_text())
    return values


def leaves(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted paths of the values a user sets (an empty map or a list is one value)."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{path}.")
        else:
            yield path


# --- Chart.yaml and CRDs -----------------------------------------------------------


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "resultbackend-operator"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert chart["appVersion"] == pyproject["project"]["version"] == __version__


def test_chart_crds_are_copies_of_the_top_level_crds() -> None:
    """crds/ is the single source; the chart ships each of its files byte for byte."""
    tops = sorted((ROOT / "crds").glob("*.yaml"))
    assert [p.name for p in tops] == [
        "clusterresultstores.yaml",
        "resultbackends.yaml",
        "resultstores.yaml",
    ]
    for top in tops:
        copy = CHART / "crds" / top.name
        assert copy.is_file(), f"{copy} is missing: cp {top} {copy}"
        assert copy.read_bytes() == top.read_bytes(), f"{copy} differs: cp {top} {copy}"


def test_chart_crds_are_ours_or_kopf_peering() -> None:
    """Besides copies of crds/, the chart ships only Kopf's peering CRDs."""
    extra = {p.name for p in (CHART / "crds").glob("*")} - {
        p.name for p in (ROOT / "crds").glob("*.yaml")
    }
    assert extra == {"kopf-peering.yaml"}
    crds = [d for d in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text()) if d]
    assert {c["metadata"]["name"] for c in crds} == {
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    }
    for crd in crds:
        assert crd["spec"]["group"] == "kopf.dev"
        assert [v["name"] for v in crd["spec"]["versions"]] == ["v1"]


def test_chart_documents_only_the_served_version() -> None:
    """The README, NOTES and templates show resultstores.io objects of v1alpha2 only."""
    texts = [CHART / "README.md", *sorted((CHART / "templates").iterdir())]
    for path in texts:
        versions = set(re.findall(r"apiVersion: resultstores\.io/(v\w+)", path.read_text()))
        assert versions <= {"v1alpha2"}, f"{path.name}: {versions}"
    assert "apiVersion: resultstores.io/v1alpha2" in (CHART / "templates" / "NOTES.txt").read_text()


# --- values.yaml -----------------------------------------------------------------------

_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w.-]*):(?P<rest>.*)$")


def test_every_value_has_a_comment() -> None:
    """Each key is preceded by a comment line (at its indentation) or has one inline."""
    lines = VALUES.read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = _KEY.match(line)
        if not m:
            continue
        inline = "#" in m["rest"]
        prev = lines[i - 1] if i else ""
        above = prev.strip().startswith("#") and prev.startswith(m["indent"] + "#")
        if not (inline or above):
            missing.append(f"line {i + 1}: {m['key']}")
    assert not missing, f"values without a comment: {missing}"


def test_defaults() -> None:
    values = load_values()
    assert values["replicas"] == 1
    assert values["watch"] == {"scope": "cluster", "namespaces": []}
    assert values["peering"]["enabled"] is False
    assert values["metrics"] == {"enabled": False, "port": 9090}
    assert values["resources"] == {
        "requests": {"cpu": "50m", "memory": "96Mi"},
        "limits": {"cpu": "500m", "memory": "512Mi"},
    }
    assert values["serviceAccount"]["create"] is True
    # The release namespace; the templates fill it in.
    assert values["clusterResourceNamespace"] == ""
    assert values["namespacedStores"] is True
    assert values["aggregateRoles"] is True


def test_readme_documents_every_value() -> None:
    """The README's table has one row per value, and no row for a value that is gone."""
    readme = (CHART / "README.md").read_text()
    rows = set(re.findall(r"^\| `([\w.]+)` \|", readme, flags=re.MULTILINE))
    expected = set(leaves(load_values()))
    assert rows == expected, f"missing: {expected - rows}, stale: {rows - expected}"


# --- values.schema.json ------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA.read_text())
    return loaded


def _validator(schema: dict[str, Any]) -> Any:
    # jsonschema is a dev dependency for this file only (Helm uses its own validator).
    import jsonschema

    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_schema_is_valid_and_accepts_the_defaults(schema: dict[str, Any]) -> None:
    _validator(schema).validate(load_values())


def _with(path: str, value: Any) -> dict[str, Any]:
    values = load_values()
    *parents, last = path.split(".")
    node = values
    for p in parents:
        node = node[p]
    node[last] = value
    return values


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("unknown", 1),
        ("image.unknown", 1),
        ("image.pullPolicy", "Sometimes"),
        ("watch.scope", "everywhere"),
        ("watch", {"scope": "namespaces", "namespaces": []}),
        ("watch.namespaces", ["Not_A_Namespace"]),
        ("replicas", 2),
        ("replicas", "1"),
        ("checkInterval", 0),
        ("credentialCheckInterval", 0),
        ("metrics.port", 8080),
        ("metrics.port", "9090"),
        ("serviceAccount.annotations", {"a": 1}),
        ("resources.unknown", {}),
        ("extraEnv", [{"value": "no name"}]),
        ("verbose", "yes"),
        ("clusterResourceNamespace", "Not_A_Namespace"),
        ("clusterResourceNamespace", None),
        ("namespacedStores", "false"),
        ("aggregateRoles", "yes"),
    ],
)
def test_schema_rejects(schema: dict[str, Any], path: str, value: Any) -> None:
    errors = list(_validator(schema).iter_errors(_with(path, value)))
    assert errors, f"{path}={value!r} was accepted"


@pytest.mark.parametrize(
    "overrides",
    [
        {"watch": {"scope": "namespaces", "namespaces": ["a", "b"]}},
        {"peering": {"enabled": True, "name": ""}, "replicas": 2},
        {"metrics": {"enabled": True, "port": 9191}},
        {"extraEnv": [{"name": "RBO_BACKEND_TIMEOUT", "value": "5"}]},
        {"resources": {"requests": {"cpu": 1, "memory": "64Mi"}}},
        {"clusterResourceNamespace": "platform", "namespacedStores": False},
        {"aggregateRoles": False},
    ],
)
def test_schema_accepts(schema: dict[str, Any], overrides: dict[str, Any]) -> None:
    _validator(schema).validate({**load_values(), **overrides})


def test_schema_is_strict(schema: dict[str, Any]) -> None:
    """Every key of values.yaml is declared, and every object schema that declares its
    properties refuses others (free-form maps such as affinity declare none)."""

    def declared(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        props = node.get("properties")
        if not props:
            return
        assert node.get("additionalProperties") is False, f"{path or '<root>'} is not strict"
        for key, value in values.items():
            assert key in props, f"{path}{key} is not in values.schema.json"
            if isinstance(value, dict):
                declared(value, props[key], f"{path}{key}.")

    declared(load_values(), schema, "")


# --- Dockerfile ------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE)


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instr, args in dockerfile_instructions():
        if instr == "FROM":
            result.append([])
        if result:
            result[-1].append((instr, args))
    return result


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    all_instr = dockerfile_instructions()
    args = dict(a.split("=", 1) for i, a in all_instr if i == "ARG" and "=" in a)
    froms = [a for i, a in all_instr if i == "FROM"]
    assert len(froms) >= 2
    images = [
        shlex.split(f)[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", "")) for f in froms
    ]
    assert all(img == "python:3.11-slim" for img in images), images
    assert froms[0].endswith(" AS builder")


def test_dockerfile_builder_installs_with_constraints() -> None:
    builder = stages()[0]
    pip_runs = [a for i, a in builder if i == "RUN" and "pip install" in a]
    assert pip_runs, "the builder stage installs nothing with pip"
    for run in pip_runs:
        assert "-c constraints.txt" in run, run
        assert "--prefix=/install" in run, run


def test_dockerfile_final_stage() -> None:
    final = stages()[-1]
    instrs = [i for i, _ in final]
    runs = " ".join(a for i, a in final if i == "RUN")
    assert "pip" not in runs, "pip runs in the final stage"
    assert "apt-get" not in runs, "build tools in the final stage"
    assert ("COPY", "--from=builder /install /usr/local") in final
    envs = " ".join(a for i, a in final if i == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in envs
    (user,) = [a for i, a in final if i == "USER"]
    uid, _, gid = user.partition(":")
    assert re.fullmatch(r"[1-9][0-9]*", uid), "USER must be a numeric non-root uid"
    assert re.fullmatch(r"[1-9][0-9]*", gid), "USER must name a numeric non-root gid"
    assert uid == "10001", "the chart's runAsUser is 10001"
    assert instrs.index("USER") < instrs.index("ENTRYPOINT")
    (entrypoint,) = [a for i, a in final if i == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["python", "-m", "resultbackend_operator"]
    (cmd,) = [a for i, a in final if i == "CMD"]
    assert json.loads(cmd) == ["--all-namespaces", "--liveness", "http://0.0.0.0:8080/healthz"]


def test_dockerignore_admits_exactly_what_the_dockerfile_copies() -> None:
    """.dockerignore excludes everything but the COPY sources (no .venv, no .devstack)."""
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*"
    admitted = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    sources = set()
    for instr, args in dockerfile_instructions():
        if instr == "COPY" and not args.startswith("--from"):
            sources.update(s.rstrip("/") for s in shlex.split(args)[:-1])
    assert sources == admitted
