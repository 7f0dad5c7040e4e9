#!/usr/bin/env bash
# Real Celery workers on the demo's ResultBackends; called by devstack/demo.sh once
# rb/orders (CouchDB) and rb/billing (Consul) are Ready.
#
# The devstack has no kubelet, so the worker Deployments never get pods. This
# plays the kubelet: for each worker Deployment it resolves the container's env
# from the live pod template (the CELERY_RESULT_BACKEND / CONSUL_HTTP_TOKEN the
# operator injected, read from the Secret the way the kubelet does) and starts
# `celery worker` with exactly that env plus the broker URL, from .venv-e2e (the
# "worker image": Celery 5 with its couchdb, consul and redis extras). Then it
# sends a few tasks through each and prints what came back.
#
# The workers keep running (pids in .devstack/pids/demo-worker-*.pid, logs in
# .devstack/logs/demo-worker-*.log); `devstack/demo.sh down` stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(devstack/stack env)"
STATE=${RBO_DEVSTACK_DIR:-.devstack}
NS=demo
APP_DIR=$PWD/tests/e2e/worker
KUBEENV=(.venv/bin/python -m tests.e2e.kubeenv)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# Runs a command with the worker container's env (resolved from the Deployment) plus
# the broker and the app's path, and nothing else: as the container would see it.
in_pod() {
  local name=$1 deployment=$2
  shift 2
  exec "${KUBEENV[@]}" exec -n "$NS" "deployment/$deployment" -c worker \
    --set "CELERY_BROKER_URL=$REDIS_URL" --set "E2E_QUEUE=demo-$name" \
    --set "PYTHONPATH=$APP_DIR" -- "$@"
}

start_worker() {
  local name=$1 deployment=$2
  local pidfile="$STATE/pids/demo-worker-$name.pid" log="$STATE/logs/demo-worker-$name.log"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    # Restart it: the env may have changed since (a rotation).
    kill "$(cat "$pidfile")" && sleep 2
  fi
  printf 'deployment/%s env: %s\n' "$deployment" \
    "$("${KUBEENV[@]}" names -n "$NS" "deployment/$deployment" -c worker)"
  mkdir -p "$(dirname "$pidfile")" "$(dirname "$log")"
  : >"$log"
  # in_pod execs kubeenv, which execs celery: the pid written below is the worker's.
  (in_pod "$name" "$deployment" "$PWD/.venv-e2e/bin/celery" \
    -A e2e_tasks worker --pool=solo --loglevel=INFO --hostname="demo-$name@%h" \
    --without-mingle --without-gossip --without-heartbeat) >>"$log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 60); do
    grep -q ' ready\.' "$log" && { echo "worker demo-$name ready (pid $(cat "$pidfile"), log $log)"; return; }
    kill -0 "$(cat "$pidfile")" 2>/dev/null || { cat "$log"; echo "worker demo-$name exited" >&2; exit 1; }
    sleep 1
  done
  echo "worker demo-$name not ready after 60s; see $log" >&2
  exit 1
}

say "The worker image: .venv-e2e (Celery with its couchdb, consul and redis extras)"
make --no-print-directory e2e-venv

for pair in orders:orders-worker billing:billing-worker; do
  name=${pair%%:*} deployment=${pair#*:}
  say "Starting a Celery worker for deployment/$deployment with the env the operator injected"
  start_worker "$name" "$deployment"
done

for pair in orders:orders-worker billing:billing-worker; do
  name=${pair%%:*} deployment=${pair#*:}
  say "Tasks through rb/$name ($(kubectl -n "$NS" get rb "$name" -o jsonpath='{.status.url}'))"
  (in_pod "$name" "$deployment" "$PWD/.venv-e2e/bin/python" "$APP_DIR/client.py" demo)
done

say "The workers keep running"
cat <<TXT
  tail -f $STATE/logs/demo-worker-orders.log $STATE/logs/demo-worker-billing.log
  devstack/demo-celery.sh      # again after a rotation: restarts the workers with the new env
  devstack/demo.sh down        # stops the workers and the operator
TXT
