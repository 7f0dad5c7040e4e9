#!/usr/bin/env bash
# `make demo`: the operator doing its job on the local devstack, end to end, in pods.
#   devstack/demo.sh up     install the chart (the operator pod), apply examples/, run
#                           real Celery worker pods, send tasks, rotate
#   devstack/demo.sh down   uninstall it (make demo-down also stops the stack)
#
# Nothing plays the kubelet: the operator runs from the Dockerfile's image (built
# locally by `devstack/stack images`, loaded into the devstack node), installed with
# `helm install`; the examples' worker Deployments run real Celery from the worker
# image (tests/e2e/worker/Dockerfile), with the env the kubelet resolved.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(devstack/stack env)"
NS=demo
RELEASE=rbo-demo  # not "rbo": the tests leave that release's ServiceAccount and roles
OPERATOR_NS=resultbackend-system
# The operator pod uses the node's network (the devstack's servers answer on its
# loopback), so its health port is a port of the host.
HEALTH_PORT=${RBO_DEMO_HEALTH_PORT:-18080}
APISERVER=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
APISERVER=${APISERVER#https://}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# The examples name the default devstack's addresses; a devstack on other ports
# gets its own.
examples() {
  local f
  for f in examples/*.yaml; do
    sed -e "s#http://127.0.0.1:5984#$COUCHDB_URL#" -e "s#http://127.0.0.1:8500#$CONSUL_HTTP_ADDR#" "$f"
    echo "---"
  done
}

# The examples' Deployments stand for your worker; here they run the worker image:
# Celery on the node's network, the devstack's Redis as the broker, a queue each.
worker_patch() {
  local queue=$1
  cat <<JSON
{"spec": {"template": {"spec": {"hostNetwork": true, "terminationGracePeriodSeconds": 10,
  "containers": [{"name": "worker", "image": "$WORKER_IMAGE", "imagePullPolicy": "Never",
    "command": ["celery", "-A", "e2e_tasks", "worker", "--pool=solo", "--loglevel=INFO",
                "--without-mingle", "--without-gossip", "--without-heartbeat"],
    "env": [{"name": "CELERY_BROKER_URL", "value": "$REDIS_URL"},
            {"name": "E2E_QUEUE", "value": "$queue"}]}]}}}}
JSON
}

env_names() {
  kubectl -n "$NS" exec "deployment/$1" -c worker -- python -c \
    "import os; print(' '.join(sorted(k for k in os.environ if k.startswith(('CELERY', 'CONSUL')))))"
}

config_hash() {
  kubectl -n "$NS" get deployment "$1" \
    -o jsonpath='{.spec.template.metadata.annotations.resultstores\.io/config-hash}'
}

pods_of() { kubectl -n "$NS" get pods -l "app=$1" -o jsonpath='{range .items[*]}{.metadata.name} {end}'; }

up() {
  say "Building the images (cached by content) and loading them into the node"
  local refs
  refs=$(devstack/stack images)
  echo "$refs"
  OPERATOR_IMAGE=$(awk '$1 == "operator" {print $2}' <<<"$refs")
  WORKER_IMAGE=$(awk '$1 == "worker" {print $2}' <<<"$refs")

  say "Installing the CRDs (ClusterResultStore, ResultStore, ResultBackend)"
  kubectl apply --server-side --force-conflicts -f crds/
  kubectl wait --for=condition=Established --timeout=60s crd/resultbackends.resultstores.io \
    crd/resultstores.resultstores.io crd/clusterresultstores.resultstores.io

  say "helm install $RELEASE helm/resultbackend-operator (the operator pod, image $OPERATOR_IMAGE)"
  helm upgrade --install "$RELEASE" helm/resultbackend-operator -n "$OPERATOR_NS" --create-namespace \
    --skip-crds --wait --timeout 180s \
    --set image.repository="${OPERATOR_IMAGE%:*}" --set image.tag="${OPERATOR_IMAGE##*:}" \
    --set image.pullPolicy=Never --set hostNetwork=true --set healthPort="$HEALTH_PORT" \
    --set checkInterval=15 \
    --set "extraEnv[0].name=KUBERNETES_SERVICE_HOST" --set "extraEnv[0].value=${APISERVER%:*}" \
    --set "extraEnv[1].name=KUBERNETES_SERVICE_PORT" --set-string "extraEnv[1].value=${APISERVER##*:}"

  say "Applying examples/ (a ClusterResultStore per store type, their admin Secrets in $OPERATOR_NS;"
  echo "   in $NS: a CouchDB and a Consul ResultBackend, each with a worker Deployment, and a"
  echo "   namespaced ResultStore with a ResultBackend of its own)"
  examples | kubectl apply -f -
  kubectl -n "$NS" patch deployment orders-worker --type=strategic -p "$(worker_patch demo-orders)"
  kubectl -n "$NS" patch deployment billing-worker --type=strategic -p "$(worker_patch demo-billing)"
  kubectl wait --for=condition=Ready --timeout=120s crstore/couchdb crstore/consul
  kubectl -n "$NS" wait --for=condition=Ready --timeout=120s rstore/team-consul \
    rb/orders rb/billing rb/reports
  kubectl -n "$NS" rollout status deployment/orders-worker deployment/billing-worker --timeout=180s
  # The pods from before the patch and the injection go (they are the first rollouts).
  for d in orders-worker billing-worker; do
    for _ in $(seq 60); do [ "$(pods_of "$d" | wc -w)" = 1 ] && break; sleep 1; done
  done

  say "kubectl get pods -A -o wide (the operator and the workers, on the node)"
  kubectl get pods -A -o wide
  say "kubectl get crstore,rstore,rb -A (the stores the platform team declared, what uses them)"
  kubectl get crstore,rstore,rb -A
  say "The env the kubelet resolved in the worker pods (names only; values are credentials)"
  for d in orders-worker billing-worker; do printf '%s: %s\n' "$d" "$(env_names "$d")"; done
  say "Status of rb/orders"
  kubectl -n "$NS" get rb orders -o jsonpath='{.status}' | python3 -m json.tool

  for pair in orders:orders-worker billing:billing-worker; do
    local name=${pair%%:*} deployment=${pair#*:}
    say "Tasks through rb/$name, from the worker pod ($(kubectl -n "$NS" get rb "$name" -o jsonpath='{.status.url}'))"
    # Wait for Celery itself in the pod, then run the client there, with the pod's env.
    for _ in $(seq 60); do
      kubectl -n "$NS" logs "deployment/$deployment" 2>/dev/null | grep -q ' ready\.' && break
      sleep 1
    done
    kubectl -n "$NS" exec "deployment/$deployment" -c worker -- python /app/client.py demo
  done

  say "Rotating rb/billing: the operator rolls its worker pods once"
  local before after hash
  before=$(pods_of billing-worker)
  hash=$(config_hash billing-worker)
  kubectl -n "$NS" patch rb billing --type=merge \
    -p "{\"spec\":{\"rotation\":{\"trigger\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\"}}}"
  for _ in $(seq 60); do
    [ "$(config_hash billing-worker)" != "$hash" ] && break
    sleep 1
  done
  kubectl -n "$NS" rollout status deployment/billing-worker --timeout=180s
  # shellcheck disable=SC2086 # one argument per pod
  for pod in $before; do kubectl -n "$NS" wait --for=delete "pod/$pod" --timeout=60s >/dev/null; done
  after=$(pods_of billing-worker)
  printf 'billing-worker pods before: %s\nbilling-worker pods after:  %s\n' "$before" "$after"
  kubectl -n "$NS" get rb billing -o jsonpath='credentialsRotatedAt: {.status.credentialsRotatedAt}{"\n"}'

  say "What to try next"
  cat <<TXT
  eval "\$(devstack/stack env)"            # kubectl, KUBECONFIG and the servers' addresses
  kubectl get pods -A                     # the operator pod and the worker pods
  kubectl -n $OPERATOR_NS logs deployment/$RELEASE-resultbackend-operator   # the operator
  kubectl -n demo describe rb orders      # conditions and Events
  kubectl -n demo exec deployment/orders-worker -- python /app/client.py demo   # tasks again
  devstack/stack stop couchdb; sleep 20; kubectl get crstore,rb -A   # an outage: the store
                                          # Unreachable, its ResultBackends StoreNotReady
  devstack/stack start couchdb                                    # and it recovers by itself
  make demo-down                          # uninstall and stop the stack
TXT
}

down() {
  # The ResultBackends stay (with deletionPolicy Retain their stores stay too): the next
  # `up` installs the operator again and it resumes them.
  helm uninstall "$RELEASE" -n "$OPERATOR_NS" --wait 2>/dev/null && echo "operator uninstalled" || true
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
