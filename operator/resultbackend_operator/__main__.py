"""`python -m resultbackend_operator`: kopf run with our handlers and settings."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys

from . import __version__


def port_number(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return port


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="resultbackend-operator",
        description="Provision Celery result backends for ResultBackend resources on the "
        "stores that ResultStores and ClusterResultStores name, and inject them into the "
        "selected worker Deployments and StatefulSets.",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch all namespaces (default)"
    )
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch only this namespace (repeatable; glob patterns allowed); "
        "ClusterResultStores are then not served",
    )
    p.add_argument(
        "--liveness",
        default=None,
        metavar="URL",
        help="serve kopf's health endpoint, e.g. http://0.0.0.0:8080/healthz",
    )
    p.add_argument(
        "--peering",
        default=None,
        metavar="NAME",
        help="kopf peering object for several replicas with one active (default: standalone)",
    )
    p.add_argument(
        "--priority",
        type=int,
        default=None,
        help="kopf peering priority (default: random, so one of several replicas is active)",
    )
    p.add_argument(
        "--metrics-port",
        type=port_number,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://0.0.0.0:PORT/metrics; 0 = off "
        "(default: env RBO_METRICS_PORT, else off)",
    )
    p.add_argument(
        "--cluster-resource-namespace",
        default=None,
        metavar="NS",
        help="the namespace of ClusterResultStores' admin Secrets, the only one they are "
        "read from (default: env RBO_CLUSTER_RESOURCE_NAMESPACE, else the operator's own "
        "namespace)",
    )
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Read by settings.py when first imported, just below.
    if args.cluster_resource_namespace:
        os.environ["RBO_CLUSTER_RESOURCE_NAMESPACE"] = args.cluster_resource_namespace
    if args.namespace:
        os.environ["RBO_CLUSTER_STORES"] = "false"  # see Settings.cluster_stores
    import kopf

    from . import handlers, metrics  # handlers registers the handlers
    from .settings import SETTINGS

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handlers.configure_logging()
    log = logging.getLogger("resultbackend_operator")
    port = args.metrics_port if args.metrics_port is not None else SETTINGS.metrics_port
    if port:
        try:
            metrics.serve(port)
        except OSError as exc:
            log.error("cannot serve metrics on port %d: %s", port, exc.strerror)
            return 1
        log.info("serving metrics at http://0.0.0.0:%d/metrics", port)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=list(args.namespace),
        liveness_endpoint=args.liveness,
        standalone=args.peering is None,
        peering_name=args.peering,
        # Replicas of one Deployment cannot be given distinct priorities by the
        # chart, and kopf pauses every peer when the highest priority is shared:
        # a random priority per process makes exactly one of them active.
        priority=args.priority if args.priority is not None else secrets.randbelow(32767) + 1,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
