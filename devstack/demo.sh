#!/usr/bin/env bash
# `make demo`: the operator doing its job on the local devstack, end to end.
#   devstack/demo.sh up     start the operator, apply examples/, show the result
#   devstack/demo.sh down   stop the demo operator (make demo-down also stops the stack)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(devstack/stack env)"
STATE=${RBO_DEVSTACK_DIR:-.devstack}
PIDFILE="$STATE/pids/operator.pid"
LOG="$STATE/logs/operator.log"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

operator_running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

up() {
  say "Installing the ResultBackend CRD"
  kubectl apply --server-side --force-conflicts -f crds/
  kubectl wait --for=condition=Established --timeout=60s crd/resultbackends.resultstores.io

  if operator_running; then
    say "The operator is already running (pid $(cat "$PIDFILE"))"
  else
    say "Starting the operator (logs: $LOG)"
    mkdir -p "$(dirname "$PIDFILE")" "$(dirname "$LOG")"
    RBO_CHECK_INTERVAL=${RBO_CHECK_INTERVAL:-15} \
      nohup .venv/bin/python -m resultbackend_operator --all-namespaces >>"$LOG" 2>&1 &
    echo $! >"$PIDFILE"
  fi

  say "Applying examples/ (a CouchDB and a Consul ResultBackend, each with a worker Deployment)"
  kubectl apply -f examples/
  kubectl -n demo wait --for=condition=Ready --timeout=120s rb/orders rb/billing

  say "kubectl get rb -n demo -o wide"
  kubectl get rb -n demo -o wide
  say "The worker Secrets (keys only; values stay in the Secret)"
  for s in orders-result-backend billing-result-backend; do
    printf '%s: ' "$s"
    kubectl -n demo get secret "$s" -o go-template='{{range $k, $v := .data}}{{$k}} {{end}}'
    echo
  done
  say "Status of rb/orders"
  kubectl -n demo get rb orders -o jsonpath='{.status}' | python3 -m json.tool
  if [ -x devstack/demo-celery.sh ]; then devstack/demo-celery.sh; fi
  say "What to try next"
  cat <<'TXT'
  eval "$(devstack/stack env)"            # kubectl, KUBECONFIG and the servers' addresses
  kubectl get rb -A                       # every ResultBackend
  kubectl -n demo describe rb orders      # conditions and Events
  kubectl -n demo patch rb billing --type=merge \
    -p "{\"spec\":{\"rotation\":{\"trigger\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\"}}}"   # rotate
  devstack/stack stop couchdb; sleep 20; kubectl -n demo get rb   # an outage: Degraded
  devstack/stack start couchdb                                    # and it recovers by itself
  make demo-down                          # stop the operator and the stack
TXT
}

down() {
  # The Celery workers devstack/demo-celery.sh left running.
  for pidfile in "$STATE"/pids/demo-worker-*.pid; do
    [ -f "$pidfile" ] || continue
    if kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      kill "$(cat "$pidfile")" && echo "$(basename "$pidfile" .pid) stopped"
    fi
    rm -f "$pidfile"
  done
  if operator_running; then
    kill "$(cat "$PIDFILE")" && echo "operator stopped"
  fi
  rm -f "$PIDFILE"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
