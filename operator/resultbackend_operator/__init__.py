"""resultbackend-operator: Celery result stores (CouchDB, Consul) for Kubernetes workers."""

__version__ = "0.1.0"
