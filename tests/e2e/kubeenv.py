"""A container's environment resolved the way the kubelet does it.

The process-based e2e tests (tests/e2e/test_*.py) run real Celery workers outside
the cluster, so they build the worker's environment from the live pod template
exactly as the kubelet would. (tests/e2e/pod/ and `make demo` run worker pods on the
devstack's node instead, where the kubelet resolves it; this module goes once the
process-based tests have moved there too.)

1. ``envFrom`` sources in order (``secretRef`` / ``configMapRef``, with ``prefix``);
2. then ``env`` in order, later entries overriding earlier ones: a literal
   ``value`` with ``$(VAR)`` references to variables defined before it expanded
   (``$$`` escapes a ``$``), or ``valueFrom.secretKeyRef`` /
   ``valueFrom.configMapKeyRef``. A missing Secret, ConfigMap or key is an error
   unless the reference says ``optional: true``, in which case the variable is
   left out.

``fieldRef`` and ``resourceFieldRef`` need a running pod and are refused, as are
the service-link variables the kubelet adds (no Services here).

``resolve_env`` is pure; ``workload_env`` reads the workload and its Secrets and
ConfigMaps from the cluster with kubectl. As a command,

    python -m tests.e2e.kubeenv exec -n demo deployment/orders-worker \\
        --set CELERY_BROKER_URL=redis://... -- .venv-e2e/bin/celery -A e2e_tasks worker

runs a command with that environment and nothing else from the caller's
(besides PATH, HOME and LANG), the way the container would see it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class EnvResolutionError(Exception):
    """The kubelet would refuse to start the container with this env."""


def expand(value: str, defined: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, others kept as written."""
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch != "$" or i + 1 == len(value):
            out.append(ch)
            i += 1
            continue
        nxt = value[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            end = value.find(")", i + 2)
            if end == -1:
                out.append(value[i:])
                break
            name = value[i + 2 : end]
            out.append(defined[name] if name in defined else value[i : end + 1])
            i = end + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _secret_values(obj: Mapping[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}


def _config_map_values(obj: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (obj.get("data") or {}).items()}


def _key_ref(
    ref: Mapping[str, Any],
    kind: str,
    objects: Mapping[str, Mapping[str, Any]],
    values: Callable[[Mapping[str, Any]], dict[str, str]],
    var: str,
) -> str | None:
    name, key, optional = ref.get("name", ""), ref["key"], bool(ref.get("optional", False))
    if name not in objects:
        if optional:
            return None
        raise EnvResolutionError(f"{var}: {kind} {name!r} not found")
    data = values(objects[name])
    if key not in data:
        if optional:
            return None
        raise EnvResolutionError(f"{var}: key {key!r} not found in {kind} {name!r}")
    return data[key]


def resolve_env(
    container: Mapping[str, Any],
    secrets: Mapping[str, Mapping[str, Any]],
    config_maps: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, str]:
    """The env of `container` (a pod template's container) given the namespace's objects.

    `secrets` and `config_maps` map names to the objects as the API returns them
    (a Secret's `data` base64-encoded).
    """
    config_maps = config_maps or {}
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for field, kind, objects, values in (
            ("secretRef", "Secret", secrets, _secret_values),
            ("configMapRef", "ConfigMap", config_maps, _config_map_values),
        ):
            ref = source.get(field)
            if ref is None:
                continue
            name = ref.get("name", "")
            if name not in objects:
                if ref.get("optional", False):
                    continue
                raise EnvResolutionError(f"envFrom: {kind} {name!r} not found")
            for key, value in values(objects[name]).items():
                env[prefix + key] = value
    for var in container.get("env") or []:
        name = var["name"]
        source = var.get("valueFrom")
        if source is None:
            env[name] = expand(var.get("value", ""), env)
            continue
        resolved: str | None
        if "secretKeyRef" in source:
            resolved = _key_ref(source["secretKeyRef"], "Secret", secrets, _secret_values, name)
        elif "configMapKeyRef" in source:
            resolved = _key_ref(
                source["configMapKeyRef"], "ConfigMap", config_maps, _config_map_values, name
            )
        else:
            raise EnvResolutionError(
                f"{name}: {sorted(source)} needs a running pod; not supported outside the cluster"
            )
        if resolved is not None:
            env[name] = resolved
    return env


def referenced(container: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """Names of the Secrets and ConfigMaps a container's env refers to."""
    secrets: set[str] = set()
    config_maps: set[str] = set()
    for source in container.get("envFrom") or []:
        if "secretRef" in source:
            secrets.add(source["secretRef"].get("name", ""))
        if "configMapRef" in source:
            config_maps.add(source["configMapRef"].get("name", ""))
    for var in container.get("env") or []:
        source = var.get("valueFrom") or {}
        if "secretKeyRef" in source:
            secrets.add(source["secretKeyRef"].get("name", ""))
        if "configMapKeyRef" in source:
            config_maps.add(source["configMapKeyRef"].get("name", ""))
    return secrets, config_maps


def find_container(workload: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    if name is None:
        return dict(containers[0])
    for c in containers:
        if c["name"] == name:
            return dict(c)
    raise EnvResolutionError(f"no container {name!r} in {workload['metadata']['name']}")


# Reads one object: (kind, name, namespace) -> the object, or None when absent.
Getter = Callable[[str, str, str], "dict[str, Any] | None"]


def workload_env(
    get: Getter, namespace: str, kind: str, name: str, container: str | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """(the live workload, the resolved env of its container) from the cluster."""
    workload = get(kind, name, namespace)
    if workload is None:
        raise EnvResolutionError(f"{kind}/{name} not found in namespace {namespace}")
    c = find_container(workload, container)
    secret_names, cm_names = referenced(c)
    secrets = {n: obj for n in secret_names if (obj := get("secret", n, namespace)) is not None}
    cms = {n: obj for n in cm_names if (obj := get("configmap", n, namespace)) is not None}
    return workload, resolve_env(c, secrets, cms)


def kubectl_getter(kubectl: Sequence[str] = ("kubectl",)) -> Getter:
    def get(kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        res = subprocess.run(
            [*kubectl, "get", kind, name, "-n", namespace, "-o", "json"],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            if "NotFound" in res.stderr:
                return None
            raise EnvResolutionError(f"kubectl get {kind} {name}: {res.stderr.strip()}")
        return dict(json.loads(res.stdout))

    return get


def base_env() -> dict[str, str]:
    """What a container has besides its pod spec's env: a PATH, a HOME, a locale."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.kubeenv", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for cmd in ("exec", "names"):
        p = sub.add_parser(cmd)
        p.add_argument("-n", "--namespace", required=True)
        p.add_argument("workload", help="deployment/NAME or statefulset/NAME")
        p.add_argument("-c", "--container")
        if cmd == "exec":
            p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    kind, _, name = args.workload.partition("/")
    _, env = workload_env(kubectl_getter(), args.namespace, kind, name, args.container)
    if args.cmd == "names":
        # Names only: the values are credentials.
        print(" ".join(sorted(env)))
        return 0
    if not command:
        parser.error("exec needs a command after --")
    extra = dict(item.split("=", 1) for item in args.set)
    os.execvpe(command[0], command, {**base_env(), **extra, **env})  # noqa: S606
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
