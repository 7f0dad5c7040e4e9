"""`python -m resultbackend_operator`: kopf run with our handlers and settings."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys

from . import __version__


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="resultbackend-operator",
        description="Provision Celery result backends (CouchDB, Consul) for ResultBackend "
        "resources and inject them into the selected worker Deployments and StatefulSets.",
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
        help="watch only this namespace (repeatable; glob patterns allowed)",
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
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import kopf

    from . import handlers  # registers the handlers

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handlers.configure_logging()
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
