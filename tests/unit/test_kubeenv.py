"""The kubelet-style env resolution the e2e tests and the demo use (tests/e2e/kubeenv.py)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.e2e.kubeenv import (
    EnvResolutionError,
    expand,
    find_container,
    referenced,
    resolve_env,
    workload_env,
)


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


SECRET = {"metadata": {"name": "rb"}, "data": {"uri": b64("consul://h:8500/p"), "token": b64("t")}}


def ref(name: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"valueFrom": {"secretKeyRef": {"name": name, "key": key, **extra}}}


def test_literals_and_secret_refs() -> None:
    container = {
        "env": [
            {"name": "A", "value": "1"},
            {"name": "CELERY_RESULT_BACKEND", **ref("rb", "uri")},
            {"name": "CONSUL_HTTP_TOKEN", **ref("rb", "token")},
            {"name": "EMPTY"},
        ]
    }
    assert resolve_env(container, {"rb": SECRET}) == {
        "A": "1",
        "CELERY_RESULT_BACKEND": "consul://h:8500/p",
        "CONSUL_HTTP_TOKEN": "t",
        "EMPTY": "",
    }


def test_no_env_at_all() -> None:
    assert resolve_env({"name": "c"}, {}) == {}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("$(A)-x", "1-x"),
        ("$(MISSING)", "$(MISSING)"),
        ("$$(A)", "$(A)"),
        ("$$", "$"),
        ("a$b", "a$b"),
        ("tail$", "tail$"),
        ("$(A", "$(A"),
        ("$(A)$(A)", "11"),
    ],
)
def test_expansion_follows_kubernetes(value: str, expected: str) -> None:
    assert expand(value, {"A": "1"}) == expected


def test_only_earlier_variables_expand_and_later_entries_override() -> None:
    container = {
        "env": [
            {"name": "B", "value": "$(A)"},
            {"name": "A", "value": "1"},
            {"name": "C", "value": "$(A)"},
            {"name": "A", "value": "2"},
        ]
    }
    assert resolve_env(container, {}) == {"B": "$(A)", "A": "2", "C": "1"}


def test_env_from_with_prefix_then_env_overrides() -> None:
    container = {
        "envFrom": [
            {"secretRef": {"name": "rb"}, "prefix": "RB_"},
            {"configMapRef": {"name": "cm"}},
        ],
        "env": [{"name": "RB_token", "value": "mine"}, {"name": "X", "value": "$(LEVEL)"}],
    }
    cms = {"cm": {"data": {"LEVEL": "debug"}}}
    assert resolve_env(container, {"rb": SECRET}, cms) == {
        "RB_uri": "consul://h:8500/p",
        "RB_token": "mine",
        "LEVEL": "debug",
        "X": "debug",
    }


def test_config_map_key_ref() -> None:
    container = {
        "env": [{"name": "L", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "LEVEL"}}}]
    }
    assert resolve_env(container, {}, {"cm": {"data": {"LEVEL": "info"}}}) == {"L": "info"}


def test_missing_secret_or_key_is_an_error_unless_optional() -> None:
    with pytest.raises(EnvResolutionError, match="Secret 'gone' not found"):
        resolve_env({"env": [{"name": "U", **ref("gone", "uri")}]}, {})
    with pytest.raises(EnvResolutionError, match="key 'nope' not found"):
        resolve_env({"env": [{"name": "U", **ref("rb", "nope")}]}, {"rb": SECRET})
    with pytest.raises(EnvResolutionError, match="envFrom: Secret 'gone'"):
        resolve_env({"envFrom": [{"secretRef": {"name": "gone"}}]}, {})
    optional = {
        "envFrom": [{"secretRef": {"name": "gone", "optional": True}}],
        "env": [
            {"name": "U", **ref("gone", "uri", optional=True)},
            {"name": "V", **ref("rb", "nope", optional=True)},
        ],
    }
    assert resolve_env(optional, {"rb": SECRET}) == {}


def test_pod_only_sources_are_refused() -> None:
    container = {"env": [{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}
    with pytest.raises(EnvResolutionError, match="fieldRef"):
        resolve_env(container, {})


def _deployment(*containers: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"name": "w"},
        "spec": {"template": {"spec": {"containers": list(containers)}}},
    }


def test_referenced_and_find_container() -> None:
    c = {
        "name": "worker",
        "envFrom": [{"configMapRef": {"name": "cm"}}, {"secretRef": {"name": "s1"}}],
        "env": [
            {"name": "A", **ref("s2", "k")},
            {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "cm2", "key": "k"}}},
        ],
    }
    assert referenced(c) == ({"s1", "s2"}, {"cm", "cm2"})
    d = _deployment({"name": "side"}, c)
    assert find_container(d)["name"] == "side"
    assert find_container(d, "worker")["name"] == "worker"
    with pytest.raises(EnvResolutionError, match="no container 'x'"):
        find_container(d, "x")


def test_workload_env_reads_only_what_the_container_references() -> None:
    objects = {
        ("deployment", "w"): _deployment(
            {"name": "worker", "env": [{"name": "CELERY_RESULT_BACKEND", **ref("rb", "uri")}]}
        ),
        ("secret", "rb"): SECRET,
    }
    asked: list[tuple[str, str, str]] = []

    def get(kind: str, name: str, ns: str) -> dict[str, Any] | None:
        asked.append((kind, name, ns))
        return objects.get((kind, name))

    live, env = workload_env(get, "ns", "deployment", "w", "worker")
    assert live is objects[("deployment", "w")]
    assert env == {"CELERY_RESULT_BACKEND": "consul://h:8500/p"}
    assert asked == [("deployment", "w", "ns"), ("secret", "rb", "ns")]
    with pytest.raises(EnvResolutionError, match="not found in namespace ns"):
        workload_env(get, "ns", "deployment", "nope")
