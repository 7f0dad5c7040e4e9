"""Celery result backends that work with the stores resultbackend-operator provisions."""
