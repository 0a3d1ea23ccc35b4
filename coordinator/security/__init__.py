"""Security building blocks of the coordinator (issue #7): TLS certificates in ``certs.py``."""
