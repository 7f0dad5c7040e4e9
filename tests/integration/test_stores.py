"""Issue 14's acceptance on the real stack: stores own the server and its admin Secret.

- A ResultBackend author (a ServiceAccount holding the aggregated `edit` role in its
  namespace, acting with its own token) may create ResultBackends but no store, cannot
  read a ClusterResultStore's admin Secret, and no ResultBackend it can write makes the
  operator connect anywhere but the store's URL (a loopback listener named in every
  field it can set hears nothing); the apiserver's audit log shows the operator read no
  Secret of that namespace but its own worker Secrets.
- A ClusterResultStore's namespaceSelector admits and refuses namespaces, and a
  relabelled namespace flips its ResultBackends within seconds, both ways; one that
  loses the store keeps its Secret and what it provisioned.
- A store in use waits for its last ResultBackend (Ready reason InUse), which it still
  serves for that deletion, then goes.
- A wrong admin password turns the store AdminAuthFailed and its ResultBackends
  StoreNotReady without touching worker credentials or workloads; fixing it recovers.
- `kubectl get crstore,rstore,rb` shows api.md's columns with the operator's values.

Nothing is mocked: the operator is the session's (the chart's ServiceAccount), the
stores are the devstack's CouchDB API server and Consul.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import (
    OPERATOR_NAMESPACE,
    OPERATOR_RELEASE,
    OPERATOR_TEST_ENV,
    ConsulServer,
    CouchDBServer,
    Helm,
    Kubectl,
    OperatorProcess,
    docs,
    render,
    write_token_kubeconfig,
)
from tests.integration.helpers import (
    admin_secret,
    apply,
    condition,
    consul_store,
    couchdb_admin_secret,
    couchdb_store,
    get_json,
    result_backend,
    secret_data,
    try_get_json,
    unique,
    wait_for,
    wait_for_runs,
)

pytestmark = pytest.mark.integration

GROUP = "resultstores.io"
CRSTORE, RSTORE = "ClusterResultStore", "ResultStore"
# Where the test operator reads ClusterResultStores' admin Secrets (tests/conftest.py).
CLUSTER_NS = OPERATOR_TEST_ENV["RBO_CLUSTER_RESOURCE_NAMESPACE"]
# The only Secrets the operator may list or watch (devstack/rbac-audit's OWN_SECRETS).
OWN_SECRETS = "app.kubernetes.io/managed-by=resultbackend-operator"
# How long a relabelled namespace may take to flip its ResultBackends ("within seconds").
FLIP = 20.0

Doc = dict[str, Any]


# --- waiting on what the operator writes ---------------------------------------------


def _ready_as(obj: Doc | None, status: str, reason: str | None) -> Doc | None:
    """`obj` if its Ready condition is `status` (and `reason`) for its current generation
    (the condition's own observedGeneration: a deletion moves a custom resource's
    generation, and the store's deletion path writes only its conditions)."""
    if obj is None:
        return None
    cond = condition(obj, "Ready")
    if (
        cond is not None
        and cond.get("status") == status
        and (reason is None or cond.get("reason") == reason)
        and cond.get("observedGeneration") == obj["metadata"].get("generation")
    ):
        return obj
    return None


def _what(resource: str, status: str, reason: str | None) -> str:
    return f"{resource} Ready={status}" + (f" ({reason})" if reason else "")


def wait_rb(
    kubectl: Kubectl,
    ns: str,
    name: str,
    status: str = "True",
    reason: str | None = None,
    timeout: float = 60.0,
) -> Doc:
    """The ResultBackend once its Ready is `status` (and `reason`), observed."""
    return wait_for(
        _what(f"ResultBackend {ns}/{name}", status, reason),
        lambda: _ready_as(try_get_json(kubectl, "resultbackend", name, "-n", ns), status, reason),
        timeout,
    )


def scope_of(kind: str, ns: str) -> list[str]:
    return ["-n", ns] if kind == RSTORE else []


def wait_store(
    kubectl: Kubectl,
    kind: str,
    ns: str,
    name: str,
    status: str = "True",
    reason: str | None = None,
    timeout: float = 60.0,
) -> Doc:
    """The store once its Ready is `status` (and `reason`), observed."""
    return wait_for(
        _what(f"{kind} {name}", status, reason),
        lambda: _ready_as(
            try_get_json(kubectl, kind.lower(), name, *scope_of(kind, ns)), status, reason
        ),
        timeout,
    )


def events_about(kubectl: Kubectl, kind: str, name: str, ns: str | None = None) -> list[Doc]:
    """Events about an object (a cluster-scoped store's go to the operator's namespace)."""
    selector = f"involvedObject.kind={kind},involvedObject.name={name}"
    where = ["-n", ns] if ns else ["-A"]
    out = kubectl("get", "events", *where, "--field-selector", selector, "-o", "json").stdout
    return list(json.loads(out).get("items") or [])


def wait_event(
    kubectl: Kubectl,
    kind: str,
    name: str,
    ns: str | None,
    text: str,
    timeout: float = 30.0,
) -> Doc:
    """An Event about the object whose reason or message says `text`."""

    def probe() -> Doc | None:
        for ev in events_about(kubectl, kind, name, ns):
            if text == ev.get("reason") or text in (ev.get("message") or ""):
                return ev
        return None

    return wait_for(f"an Event about {kind} {name} saying {text!r}", probe, timeout)


def wait_for_log(operator: OperatorProcess, marker: str, count: int, timeout: float = 30.0) -> None:
    """Until the operator has logged `marker` `count` more times (its runs, at DEBUG)."""
    start = operator.logs.count(marker)
    wait_for(
        f"{count} x {marker.strip()!r} in the operator's log",
        lambda: operator.logs.count(marker) >= start + count,
        timeout,
    )


# --- the stores' own view ------------------------------------------------------------


def couch_admin(server: CouchDBServer) -> requests.Session:
    s = requests.Session()
    s.auth = (server.admin_user, server.admin_password)
    return s


def couch_status(server: CouchDBServer, path: str) -> int:
    """HTTP status of an admin GET of `path` (a database, `_users/...`)."""
    return couch_admin(server).get(f"{server.url}/{path}", timeout=10).status_code


def couch_objects(server: CouchDBServer, rb: Doc) -> dict[str, int]:
    """What a CouchDB ResultBackend provisioned, with the status an admin GET answers:
    its database and both its users (the Secret's and the rotation's spare)."""
    database, user = rb["status"]["couchdb"]["database"], rb["status"]["couchdb"]["user"]
    paths = [urllib.parse.quote(database, safe="")]
    paths += [f"_users/org.couchdb.user:{u}" for u in (user, f"{user}_b")]
    return {p: couch_status(server, p) for p in paths}


def couch_worker_reads(server: CouchDBServer, data: dict[str, str]) -> int:
    """HTTP status of the worker user reading its database (what the workers do)."""
    db = urllib.parse.quote(data["database"], safe="")
    return requests.get(
        f"{server.url}/{db}", auth=(data["username"], data["password"]), timeout=10
    ).status_code


def consul_get(server: ConsulServer, path: str) -> requests.Response:
    return requests.get(
        f"{server.url}{path}", headers={"X-Consul-Token": server.management_token}, timeout=10
    )


def consul_objects(server: ConsulServer, rb: Doc) -> dict[str, bool]:
    """Whether the policy and the token of a Consul ResultBackend exist."""
    ids = rb["status"]["consul"]
    policies = {p["ID"] for p in consul_get(server, "/v1/acl/policies").json()}
    tokens = {t["AccessorID"] for t in consul_get(server, "/v1/acl/tokens").json()}
    return {
        "policy": ids["policyID"] in policies,
        "token": ids["tokenAccessorID"] in tokens,
    }


# --- objects a test makes, and their cleanup -----------------------------------------


@pytest.fixture
def namespaces(kubectl: Kubectl) -> Iterator[Callable[[], str]]:
    """Namespaces of the test's own. Afterwards their ResultBackends go first (while
    their stores still serve them), then their ResultStores, then the namespaces."""
    made: list[str] = []

    def make() -> str:
        name = unique("t-st")
        kubectl("create", "namespace", name)
        made.append(name)
        return name

    yield make
    for ns in made:
        kubectl("delete", "resultbackend", "--all", "-n", ns, "--timeout=60s", check=False)
        kubectl("delete", "resultstore", "--all", "-n", ns, "--timeout=30s", check=False)
        kubectl("delete", "namespace", ns, "--wait=false", check=False)


@dataclass
class ClusterStores:
    """ClusterResultStores a test made, with their admin Secrets in the cluster resource
    namespace; cluster-scoped, so removed explicitly (their ResultBackends first)."""

    kubectl: Kubectl
    names: list[str] = field(default_factory=list)

    def couchdb(self, server: CouchDBServer, selector: Doc | None = None) -> str:
        name = unique("crs-couch")
        self.names.append(name)
        apply(
            self.kubectl,
            couchdb_admin_secret(CLUSTER_NS, f"{name}-admin", server),
            couchdb_store("", name, server.url, f"{name}-admin", kind=CRSTORE, selector=selector),
        )
        return name

    def consul(self, server: ConsulServer, selector: Doc | None = None) -> str:
        name = unique("crs-consul")
        self.names.append(name)
        apply(
            self.kubectl,
            admin_secret(CLUSTER_NS, f"{name}-admin", {"token": server.management_token}),
            consul_store("", name, server.url, f"{name}-admin", kind=CRSTORE, selector=selector),
        )
        return name

    def cleanup(self) -> None:
        listed = self.kubectl("get", "resultbackend", "-A", "-o", "json", check=False)
        items = json.loads(listed.stdout).get("items", []) if listed.returncode == 0 else []
        for name in self.names:
            for rb in items:
                ref = rb["spec"].get("storeRef") or {}
                if ref.get("kind") == CRSTORE and ref.get("name") == name:
                    meta = rb["metadata"]
                    self.kubectl(
                        "delete", "rb", meta["name"], "-n", meta["namespace"], "--timeout=60s",
                        check=False,
                    )  # fmt: skip
            self.kubectl(
                "delete", "clusterresultstore", name, "--ignore-not-found", "--timeout=60s",
                check=False,
            )  # fmt: skip
            self.kubectl(
                "delete", "secret", f"{name}-admin", "-n", CLUSTER_NS, "--ignore-not-found",
                check=False,
            )  # fmt: skip


@pytest.fixture
def cluster_stores(kubectl: Kubectl) -> Iterator[ClusterStores]:
    stores = ClusterStores(kubectl)
    yield stores
    stores.cleanup()


def only(ns: str) -> Doc:
    """A namespaceSelector that selects namespace `ns` alone (its built-in name label)."""
    return {"matchLabels": {"kubernetes.io/metadata.name": ns}}


def deployment(ns: str, name: str, labels: dict[str, str]) -> Doc:
    """A worker Deployment without replicas: injection changes its template all the same."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {"name": "worker", "image": "localhost/rbo/busybox:1", "command": ["true"]}
                    ]
                },
            },
        },
    }


# --- 1. no way around the store ------------------------------------------------------


class Listener:
    """A TCP listener on 127.0.0.1 (random port) that records every connection it gets:
    the peer and the request line, never the headers' values (they may hold credentials)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.heard: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    head = conn.recv(4096)
                except OSError:
                    head = b""
                line = head.split(b"\r\n", 1)[0][:200]
                names = [h.split(b":", 1)[0] for h in head.split(b"\r\n")[1:] if b":" in h]
                self.heard.append(f"{peer[0]}:{peer[1]} {line!r} headers {names!r}")
                with contextlib.suppress(OSError):
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


def _grants(kubectl: Kubectl, role: str, resource: str, verb: str) -> bool:
    rules = get_json(kubectl, "clusterrole", role).get("rules") or []
    return any(
        GROUP in (r.get("apiGroups") or [])
        and resource in (r.get("resources") or [])
        and verb in (r.get("verbs") or [])
        for r in rules
    )


def edit_user(kubectl: Kubectl, ns: str, directory: Path) -> Kubectl:
    """kubectl as a ServiceAccount of `ns` bound to the aggregated ClusterRole `edit` there
    (a RoleBinding), with its own token, once the controller-manager has aggregated the
    chart's roles into the built-in ones."""
    wait_for(
        "the controller-manager to aggregate the chart's roles into edit, view and admin",
        lambda: (
            _grants(kubectl, "edit", "resultbackends", "create")
            and _grants(kubectl, "edit", "resultstores", "get")
            and _grants(kubectl, "view", "resultstores", "get")
            and _grants(kubectl, "admin", "resultstores", "create")
        ),
        timeout=60,
    )
    # ResultStores are written by admins only.
    assert not _grants(kubectl, "edit", "resultstores", "create")
    assert not _grants(kubectl, "edit", "clusterresultstores", "create")
    kubectl("create", "serviceaccount", "author", "-n", ns)
    kubectl(
        "create", "rolebinding", "author-edit", "--clusterrole=edit",
        f"--serviceaccount={ns}:author", "-n", ns,
    )  # fmt: skip
    path = directory / "author.kubeconfig"
    write_token_kubeconfig(kubectl, ns, "author", path)
    author = Kubectl(env={**kubectl.env, "KUBECONFIG": str(path)}, binary=kubectl.binary)
    who = json.loads(author("auth", "whoami", "-o", "json").stdout)
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:author"
    return author


def _forbidden(res: Any, what: str) -> None:
    assert res.returncode != 0, f"{what} was allowed"
    assert "forbidden" in res.stderr.lower(), res.stderr


def operator_username(helm: Helm) -> str:
    """Who the operator is to the apiserver: the chart's ServiceAccount of the session's
    release (as devstack/rbac-audit finds it)."""
    objs = docs(render(helm, release=OPERATOR_RELEASE, namespace=OPERATOR_NAMESPACE, crds=False))
    (sa,) = [o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"]
    return f"system:serviceaccount:{OPERATOR_NAMESPACE}:{sa}"


def audit_entries(stack_env: dict[str, str], username: str, since: dt.datetime) -> list[Doc]:
    """The apiserver's audit entries of `username` received at or after `since`, once per
    request (the log and its rotated backup; Metadata level, JSON lines)."""
    state = Path(stack_env.get("RBO_DEVSTACK_DIR") or Path(__file__).parents[2] / ".devstack")
    log = state / "logs" / "audit.log"
    files = [*sorted(log.parent.glob("audit-*.log"), key=lambda p: p.stat().st_mtime), log]
    needle = json.dumps(username)
    seen: set[str] = set()
    out: list[Doc] = []
    for path in files:
        if not path.is_file() or path.stat().st_mtime < since.timestamp():
            continue
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if needle not in line:
                    continue
                entry = json.loads(line)
                if (entry.get("user") or {}).get("username") != username:
                    continue
                received = dt.datetime.fromisoformat(entry["requestReceivedTimestamp"])
                if received < since or entry["auditID"] in seen:
                    continue
                seen.add(entry["auditID"])
                out.append(entry)
    return out


def secret_reads(entries: list[Doc]) -> list[tuple[str, str, str, str]]:
    """(verb, namespace, name, labelSelector) of every get/list/watch of Secrets."""
    out = []
    for e in entries:
        ref = e.get("objectRef") or {}
        if ref.get("resource") != "secrets" or ref.get("subresource"):
            continue
        if e["verb"] not in ("get", "list", "watch"):
            continue
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(e.get("requestURI", "")).query)
        selector = ",".join(query.get("labelSelector", []))
        out.append((e["verb"], ref.get("namespace", ""), ref.get("name", ""), selector))
    return out


def assert_secret_reads(
    stack_env: dict[str, str],
    helm: Helm,
    since: dt.datetime,
    ns: str,
    allowed: set[str],
    read: str,
) -> None:
    """By the audit log since `since`: the operator read (get) no Secret of `ns` but
    `allowed`, and listed or watched Secrets (there or cluster-wide) only by its own
    label. `read` is a Secret of `ns` it must have read (so the log was the right one)."""
    reads = secret_reads(audit_entries(stack_env, operator_username(helm), since))
    here = [r for r in reads if r[1] == ns]
    assert any(verb == "get" and name == read for verb, _, name, _ in here), (
        f"no read of Secret {ns}/{read} by the operator in the audit log: {reads}"
    )
    strays = [
        r
        for r in here
        if (r[0] == "get" and r[2] not in allowed) or (r[0] != "get" and r[3] != OWN_SECRETS)
    ]
    assert strays == [], f"the operator read Secrets of {ns} beyond {sorted(allowed)}: {strays}"
    unfiltered = [r for r in reads if r[0] != "get" and r[3] != OWN_SECRETS]
    assert unfiltered == [], f"Secrets listed or watched beyond the operator's own: {unfiltered}"


def test_a_result_backend_author_has_no_way_around_the_store(
    kubectl: Kubectl,
    namespaces: Callable[[], str],
    cluster_stores: ClusterStores,
    couchdb_server: CouchDBServer,
    consul_server: ConsulServer,
    operator: OperatorProcess,
    helm: Helm,
    stack_env: dict[str, str],
    listener: Listener,
    tmp_path: Path,
) -> None:
    since = dt.datetime.now(dt.UTC)
    ns = namespaces()
    # The platform team: one store of each type for this namespace, admin Secrets in the
    # cluster resource namespace. In the application namespace, another team's Secret.
    couch = cluster_stores.couchdb(couchdb_server, selector=only(ns))
    cons = cluster_stores.consul(consul_server, selector=only(ns))
    decoy = "payments-db"
    apply(kubectl, admin_secret(ns, decoy, {"username": "payments", "password": unique("pw")}))
    wait_store(kubectl, CRSTORE, "", couch)
    wait_store(kubectl, CRSTORE, "", cons)

    author = edit_user(kubectl, ns, tmp_path)
    url, port = listener.url, listener.port
    names: list[str] = []  # every ResultBackend tried: their worker Secrets may be read

    def rb(name: str, store: str, **spec: Any) -> Doc:
        names.append(name)
        doc = result_backend(ns, name, store, "Delete", kind=CRSTORE, **spec)
        doc["metadata"]["annotations"] = {f"{GROUP}/url": url, "example.com/server": url}
        doc["metadata"]["labels"] = {"server": f"127.0.0.1-{port}"}
        return doc

    def create(doc: Doc, *flags: str) -> Any:
        return author("create", *flags, "-f", "-", stdin=json.dumps(doc), check=False)

    # It may create a ResultBackend ...
    honest = unique("honest")
    res = create(rb(honest, couch, workers={"selector": {"matchLabels": {"app": "w"}}}))
    assert res.returncode == 0, res.stderr
    # ... but no store of either kind, and it cannot read the store's admin Secret.
    _forbidden(
        create(couchdb_store(ns, "mine", url, decoy)), "creating a ResultStore as the edit user"
    )
    _forbidden(
        create(couchdb_store(ns, "mine", url, decoy, kind=CRSTORE)),
        "creating a ClusterResultStore as the edit user",
    )
    for verb in (["get", "secret", f"{couch}-admin"], ["get", "secrets"]):
        _forbidden(
            author(*verb, "-n", CLUSTER_NS, check=False),
            f"`kubectl {' '.join(verb)} -n {CLUSTER_NS}` as the edit user",
        )

    # Every field the author can set, pointed at the listener. What the schema refuses:
    refused = {
        "storeRef.name is a URL": rb(unique("r"), url),
        "storeRef.name is host:port": rb(unique("r"), f"127.0.0.1:{port}"),
        "couchdb.database is a URL": rb(unique("r"), couch, couchdb={"database": f"{url}/db"}),
        "consul.keyPrefix is a URL": rb(unique("r"), cons, consul={"keyPrefix": url}),
        "workers.urlEnvName is a URL": rb(unique("r"), couch, workers={"urlEnvName": url}),
        "workers.containers hold a URL": rb(unique("r"), couch, workers={"containers": [url]}),
        "rotation.trigger is a URL": rb(unique("r"), couch, rotation={"trigger": url}),
    }
    for what, doc in refused.items():
        for flags in ((), ("--validate=false",)):
            res = create(doc, *flags)
            assert res.returncode != 0, f"admitted although {what} ({flags})"
            assert "invalid" in res.stderr.lower(), res.stderr
    # Fields a ResultBackend does not have: kubectl's strict validation refuses them, and
    # sent without it the apiserver prunes them (what is stored is checked below).
    smuggled = {
        "couchdb": {"url": url, "adminSecretRef": {"name": decoy, "namespace": ns}},
        "storeRef": {"kind": CRSTORE, "name": couch, "namespace": ns, "url": url},
        "url": url,
        "adminSecretRef": {"name": decoy},
    }
    pruned_couch = unique("pruned")
    doc = rb(pruned_couch, couch)
    doc["spec"].update(smuggled)
    res = create(doc)
    assert res.returncode != 0
    assert "unknown field" in res.stderr, res.stderr
    assert create(doc, "--validate=false").returncode == 0
    pruned_consul = unique("pruned")
    doc = rb(pruned_consul, cons)
    doc["spec"]["consul"] = {
        "url": url,
        "address": f"127.0.0.1:{port}",
        "tokenSecretRef": {"name": decoy, "key": "password"},
    }
    res = create(doc)
    assert res.returncode != 0
    assert "unknown field" in res.stderr, res.stderr
    assert create(doc, "--validate=false").returncode == 0
    # What the schema admits, however URL-like: a store name that is an address, a key
    # prefix and a database named after the listener.
    not_found = {
        unique("addr"): {"kind": CRSTORE, "name": "127.0.0.1"},
        unique("local"): {"kind": RSTORE, "name": "localhost"},
    }
    for name, ref in not_found.items():
        doc = rb(name, couch)
        doc["spec"]["storeRef"] = ref
        res = create(doc)
        assert res.returncode == 0, res.stderr
    prefix_rb, database_rb = unique("prefix"), unique("database")
    for doc in (
        rb(prefix_rb, cons, consul={"keyPrefix": f"127.0.0.1/{port}/{ns}"}),
        rb(database_rb, couch, couchdb={"database": f"localhost-{port}-{ns}"}),
    ):
        res = create(doc)
        assert res.returncode == 0, res.stderr

    # The operator demonstrably acted on every admitted object.
    for name in (honest, pruned_couch, pruned_consul, prefix_rb, database_rb):
        wait_rb(kubectl, ns, name)
    for name in not_found:
        wait_rb(kubectl, ns, name, "False", "StoreNotFound")
    for name, block in ((pruned_couch, "couchdb"), (pruned_consul, "consul")):
        spec = get_json(kubectl, "rb", name, "-n", ns)["spec"]
        assert spec["storeRef"] == {"kind": CRSTORE, "name": couch if block == "couchdb" else cons}
        assert "url" not in spec
        assert "adminSecretRef" not in spec
        assert set(spec.get(block) or {}) <= {"database", "keyPrefix", "oneClient"}, spec
    assert (
        get_json(kubectl, "rb", prefix_rb, "-n", ns)["status"]["consul"]["keyPrefix"]
        == f"127.0.0.1/{port}/{ns}"
    )

    # The author may edit the worker Secret (edit grants Secrets of the namespace): point
    # it at the listener. The operator writes it back from the store's URL.
    worker_secret = f"{honest}-result-backend"
    written = secret_data(kubectl, ns, worker_secret)
    tampered = {
        "uri": f"couchdb://{written['username']}:x@127.0.0.1:{port}/{written['database']}",
        "host": "127.0.0.1",
        "port": str(port),
    }
    author(
        "patch", "secret", worker_secret, "-n", ns, "--type=merge",
        "-p", json.dumps({"stringData": tampered}),
    )  # fmt: skip
    wait_for(
        "the operator to write the worker Secret back",
        lambda: secret_data(kubectl, ns, worker_secret) == written,
        timeout=30,
    )
    wait_rb(kubectl, ns, honest)
    wait_for_runs(operator, ns, honest, 1)
    assert listener.heard == [], "the operator connected to a URL a ResultBackend author wrote"

    # The audit log: the operator read no Secret of this namespace but its worker Secrets
    # (no namespaced ResultStore is here), and listed or watched Secrets only by its label.
    assert_secret_reads(
        stack_env, helm, since, ns, {f"{name}-result-backend" for name in names}, worker_secret
    )
    assert listener.heard == []


# --- 2. namespaceSelector ------------------------------------------------------------


def test_namespace_selector_admits_refuses_and_follows_relabelling(
    kubectl: Kubectl,
    namespaces: Callable[[], str],
    cluster_stores: ClusterStores,
    consul_server: ConsulServer,
    operator: OperatorProcess,
) -> None:
    allowed_ns, other_ns = namespaces(), namespaces()
    store_label = f"{GROUP}/{unique('sel')}"
    store = cluster_stores.consul(consul_server, selector={"matchLabels": {store_label: "yes"}})
    kubectl("label", "namespace", allowed_ns, f"{store_label}=yes")
    wait_store(kubectl, CRSTORE, "", store)
    a, b = unique("a"), unique("b")
    apply(
        kubectl,
        result_backend(allowed_ns, a, store, "Delete", kind=CRSTORE),
        result_backend(other_ns, b, store, "Delete", kind=CRSTORE),
    )
    rb_a = wait_rb(kubectl, allowed_ns, a)
    refused = wait_rb(kubectl, other_ns, b, "False", "StoreNotAllowed")
    assert refused["status"]["phase"] == "Failed"
    assert "namespaceSelector" in (condition(refused, "Ready") or {})["message"]
    wait_event(kubectl, "ResultBackend", b, other_ns, "StoreNotAllowed")
    assert try_get_json(kubectl, "secret", f"{b}-result-backend", "-n", other_ns) is None

    # Labelled: the refused one is admitted within seconds.
    kubectl("label", "namespace", other_ns, f"{store_label}=yes")
    rb_b = wait_rb(kubectl, other_ns, b, timeout=FLIP)
    assert consul_objects(consul_server, rb_b) == {"policy": True, "token": True}

    # Unlabelled: the admitted one loses the store within seconds, and keeps its Secret and
    # what it provisioned (policy and token), unrotated.
    data = secret_data(kubectl, allowed_ns, f"{a}-result-backend")
    kubectl("label", "namespace", allowed_ns, f"{store_label}-")
    lost = wait_rb(kubectl, allowed_ns, a, "False", "StoreNotAllowed", timeout=FLIP)
    wait_event(kubectl, "ResultBackend", a, allowed_ns, "StoreNotAllowed")
    assert (condition(lost, "Provisioned") or {}).get("status") == "True"
    assert lost["status"]["consul"] == rb_a["status"]["consul"]
    assert secret_data(kubectl, allowed_ns, f"{a}-result-backend") == data
    assert consul_objects(consul_server, rb_a) == {"policy": True, "token": True}
    token = consul_get(
        consul_server, f"/v1/acl/token/{rb_a['status']['consul']['tokenAccessorID']}"
    )
    assert token.status_code == 200
    assert [p["ID"] for p in token.json()["Policies"]] == [rb_a["status"]["consul"]["policyID"]]

    # And back: admitted again with the same credentials.
    kubectl("label", "namespace", allowed_ns, f"{store_label}=yes")
    back = wait_rb(kubectl, allowed_ns, a, timeout=FLIP)
    assert back["status"]["consul"] == rb_a["status"]["consul"]
    assert secret_data(kubectl, allowed_ns, f"{a}-result-backend") == data
    assert wait_rb(kubectl, other_ns, b)["status"]["consul"] == rb_b["status"]["consul"]


# --- 3. deleting a store in use ------------------------------------------------------


@pytest.mark.parametrize(("kind", "store_type"), [(RSTORE, "couchdb"), (CRSTORE, "consul")])
def test_deleting_a_store_in_use_waits_for_its_last_result_backend(
    kubectl: Kubectl,
    namespaces: Callable[[], str],
    cluster_stores: ClusterStores,
    couchdb_server: CouchDBServer,
    consul_server: ConsulServer,
    operator: OperatorProcess,
    kind: str,
    store_type: str,
) -> None:
    ns = namespaces()
    if kind == RSTORE:
        store = unique("rs-couch")
        apply(
            kubectl,
            couchdb_admin_secret(ns, "couch-admin", couchdb_server),
            couchdb_store(ns, store, couchdb_server.url, "couch-admin"),
        )
    else:
        store = cluster_stores.consul(consul_server, selector=only(ns))
    scope = scope_of(kind, ns)
    wait_store(kubectl, kind, ns, store)
    name = unique("user")
    apply(kubectl, result_backend(ns, name, store, "Delete", kind=kind))
    rb = wait_rb(kubectl, ns, name)

    def objects() -> dict[str, Any]:
        if store_type == "couchdb":
            return dict(couch_objects(couchdb_server, rb))
        return dict(consul_objects(consul_server, rb))

    made = objects()
    assert set(made.values()) in ({200}, {True}), made

    kubectl("delete", kind.lower(), store, *scope, "--wait=false")
    in_use = wait_store(kubectl, kind, ns, store, "False", "InUse", timeout=30)
    assert in_use["metadata"].get("deletionTimestamp")
    assert in_use["status"]["resultBackends"] == 1
    assert name in (condition(in_use, "Ready") or {})["message"]
    wait_event(kubectl, kind, store, ns if kind == RSTORE else None, "InUse")
    # It still waits after its next deletion runs (every check interval, 3 s here).
    where = f"{kind} {store}" + (f" in namespace {ns}" if kind == RSTORE else "")
    wait_for_log(operator, f"{where}: deletion\n", 2)
    assert try_get_json(kubectl, kind.lower(), store, *scope) is not None

    # The last user goes (deletionPolicy Delete), through the store; then the store goes.
    kubectl("delete", "rb", name, "-n", ns, "--timeout=60s")
    wait_for(
        f"{kind} {store} to be deleted",
        lambda: try_get_json(kubectl, kind.lower(), store, *scope) is None,
        timeout=30,
    )
    gone = objects()
    if store_type == "couchdb":
        assert set(gone.values()) == {404}, gone
    else:
        assert gone == {"policy": False, "token": False}, gone


# --- 4. a wrong admin password --------------------------------------------------------


def test_a_wrong_admin_password_stops_the_store_and_touches_no_worker(
    kubectl: Kubectl,
    namespaces: Callable[[], str],
    couchdb_server: CouchDBServer,
    operator: OperatorProcess,
    helm: Helm,
    stack_env: dict[str, str],
) -> None:
    since = dt.datetime.now(dt.UTC)
    ns = namespaces()
    store, name = unique("rs-couch"), unique("orders")
    apply(
        kubectl,
        admin_secret(ns, "payments-db", {"username": "payments", "password": unique("pw")}),
        couchdb_admin_secret(ns, "couch-admin", couchdb_server),
        couchdb_store(ns, store, couchdb_server.url, "couch-admin"),
        deployment(ns, "orders-worker", {"app": "orders-worker"}),
        result_backend(
            ns,
            name,
            store,
            "Delete",
            workers={"selector": {"matchLabels": {"app": "orders-worker"}}},
        ),
    )
    wait_store(kubectl, RSTORE, ns, store)
    rb = wait_rb(kubectl, ns, name)
    assert rb["status"]["workers"]["injected"] == 1
    secret = get_json(kubectl, "secret", f"{name}-result-backend", "-n", ns)
    data = secret_data(kubectl, ns, f"{name}-result-backend")
    worker = get_json(kubectl, "deployment", "orders-worker", "-n", ns)
    env = worker["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e["name"] for e in env] == ["CELERY_RESULT_BACKEND"]
    assert couch_worker_reads(couchdb_server, data) == 200

    def unchanged() -> None:
        now = get_json(kubectl, "secret", f"{name}-result-backend", "-n", ns)
        assert now["data"] == secret["data"], "the worker Secret's data changed"
        assert now["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]
        dep = get_json(kubectl, "deployment", "orders-worker", "-n", ns)
        assert dep["spec"]["template"] == worker["spec"]["template"], "the pod template changed"
        assert dep["metadata"]["generation"] == worker["metadata"]["generation"]
        assert couch_worker_reads(couchdb_server, data) == 200, "the worker user stopped working"

    wrong = {"username": couchdb_server.admin_user, "password": unique("wrong")}
    apply(kubectl, admin_secret(ns, "couch-admin", wrong))
    failing = wait_store(kubectl, RSTORE, ns, store, "False", "AdminAuthFailed", timeout=30)
    assert wrong["password"] not in json.dumps(failing)
    wait_event(kubectl, RSTORE, store, ns, "AdminAuthFailed")
    stopped = wait_rb(kubectl, ns, name, "False", "StoreNotReady", timeout=30)
    assert "AdminAuthFailed" in (condition(stopped, "Ready") or {})["message"]
    wait_event(kubectl, "ResultBackend", name, ns, "StoreNotReady")
    # Its retries come and go (backoff 1 s to 5 s here) without touching anything.
    wait_for_runs(operator, ns, name, 2, what="full reconcile", timeout=30)
    unchanged()

    # Fixed: everything recovers, with nothing done to the ResultBackend.
    apply(kubectl, couchdb_admin_secret(ns, "couch-admin", couchdb_server))
    wait_store(kubectl, RSTORE, ns, store, timeout=30)
    recovered = wait_rb(kubectl, ns, name, timeout=30)
    assert recovered["metadata"]["generation"] == rb["metadata"]["generation"]
    assert recovered["status"]["workers"]["injected"] == 1
    assert recovered["status"].get("credentialsRotatedAt") == rb["status"].get(
        "credentialsRotatedAt"
    )
    unchanged()
    # All along, the only Secrets of the namespace it read: the namespaced store's admin
    # Secret and its worker Secret.
    assert_secret_reads(
        stack_env, helm, since, ns, {"couch-admin", f"{name}-result-backend"}, "couch-admin"
    )


# --- 5. status and printer columns ---------------------------------------------------


def tables(text: str) -> list[tuple[str, list[list[str]]]]:
    """`kubectl get a,b,c` output: (header, rows) per table (tables are blank-line separated)."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        if lines:
            out.append((" ".join(lines[0].split()), [line.split() for line in lines[1:]]))
    return out


def row_of(rows: list[list[str]], name: str) -> list[str]:
    found = [r for r in rows if r[0] == name]
    assert len(found) == 1, f"{name} not listed once in {rows}"
    return found[0]


def test_kubectl_get_shows_the_columns_of_stores_and_result_backends(
    kubectl: Kubectl,
    namespaces: Callable[[], str],
    cluster_stores: ClusterStores,
    couchdb_server: CouchDBServer,
    consul_server: ConsulServer,
    operator: OperatorProcess,
) -> None:
    ns = namespaces()
    crs = cluster_stores.couchdb(couchdb_server, selector=only(ns))
    rs = unique("rs-consul")
    apply(
        kubectl,
        admin_secret(ns, "consul-mgmt", {"token": consul_server.management_token}),
        consul_store(ns, rs, consul_server.url, "consul-mgmt"),
        deployment(ns, "orders-worker", {"app": "orders-worker"}),
    )
    orders, archive, billing = unique("orders"), unique("archive"), unique("billing")
    apply(
        kubectl,
        result_backend(
            ns, orders, crs, "Delete", kind=CRSTORE,
            workers={"selector": {"matchLabels": {"app": "orders-worker"}}},
        ),
        result_backend(ns, archive, crs, "Delete", kind=CRSTORE),
        result_backend(ns, billing, rs, "Delete"),
    )  # fmt: skip
    rbs = {n: wait_rb(kubectl, ns, n) for n in (orders, archive, billing)}
    couch_version = requests.get(f"{couchdb_server.url}/", timeout=10).json()["version"]
    consul_version = consul_get(consul_server, "/v1/agent/version").json()["HumanVersion"]

    def counted(kind: str, name: str, count: int) -> None:
        """Until the store's status.resultBackends is `count` (bounded)."""

        def now() -> Any:
            obj = try_get_json(kubectl, kind.lower(), name, *scope_of(kind, ns))
            return ((obj or {}).get("status") or {}).get("resultBackends")

        try:
            wait_for(f"{kind} {name} to count {count}", lambda: now() == count, timeout=30)
        except AssertionError as exc:
            items = get_json(kubectl, "resultbackend", "-A")["items"]
            refs = sorted(
                i["metadata"]["name"] for i in items if i["spec"]["storeRef"]["name"] == name
            )
            raise AssertionError(
                f"{exc}; status.resultBackends is {now()}, the ResultBackends that reference "
                f"it are {refs}"
            ) from None

    counted(CRSTORE, crs, 2)
    counted(RSTORE, rs, 1)

    got = tables(kubectl("get", "crstore,rstore,rb", "-n", ns).stdout)
    store_header = "NAME TYPE READY VERSION BACKENDS URL AGE"
    rb_header = "NAME STORE TYPE READY WORKERS URL AGE"
    assert [header for header, _ in got] == [store_header, store_header, rb_header], got
    (_, crs_rows), (_, rs_rows), (_, rb_rows) = got
    assert row_of(crs_rows, f"clusterresultstore.{GROUP}/{crs}")[1:6] == [
        "couchdb", "True", couch_version, "2", couchdb_server.url,
    ]  # fmt: skip
    assert row_of(rs_rows, f"resultstore.{GROUP}/{rs}")[1:6] == [
        "consul", "True", consul_version, "1", consul_server.url,
    ]  # fmt: skip
    for name, store, type_, workers in (
        (orders, crs, "couchdb", "1"),
        (archive, crs, "couchdb", "0"),
        (billing, rs, "consul", "0"),
    ):
        url = rbs[name]["status"]["url"]
        assert url.startswith(f"{type_}://"), url
        assert row_of(rb_rows, f"resultbackend.{GROUP}/{name}")[1:6] == [
            store, type_, "True", workers, url,
        ]  # fmt: skip
        assert rbs[name]["status"]["store"] == {
            "kind": CRSTORE if store == crs else RSTORE, "name": store, "type": type_,
        }  # fmt: skip
    crs_status = get_json(kubectl, "crstore", crs)["status"]
    assert crs_status["type"] == "couchdb"
    assert crs_status["url"] == couchdb_server.url
    assert crs_status["serverVersion"] == couch_version

    # The count follows ResultBackends that come and go, several in a row.
    extras = [unique("extra") for _ in range(6)]
    apply(kubectl, *(result_backend(ns, n, crs, "Delete", kind=CRSTORE) for n in extras))
    for n in extras:
        wait_rb(kubectl, ns, n)
    counted(CRSTORE, crs, 8)
    for n in (archive, *extras):
        kubectl("delete", "rb", n, "-n", ns, "--timeout=60s")
    counted(CRSTORE, crs, 1)
    row = kubectl("get", "crstore", crs, "--no-headers").stdout.split()
    assert row[:6] == [crs, "couchdb", "True", couch_version, "1", couchdb_server.url]


def test_the_listener_hears_a_direct_connection(listener: Listener) -> None:
    """The listener of the first test hears what connects to it (else its silence would
    prove nothing)."""
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as conn:
        conn.sendall(b"GET /probe HTTP/1.1\r\nHost: x\r\nAuthorization: secret\r\n\r\n")
        conn.recv(100)
    heard = wait_for("the listener to record the connection", lambda: listener.heard, timeout=10)
    assert "GET /probe" in heard[0]
    assert "Authorization" in heard[0]
    assert "secret" not in heard[0], "the listener records header values"
