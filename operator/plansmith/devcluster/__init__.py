"""Real local services for tests and the quick start: a Kubernetes v1.20.2 control plane built from
Debian's source package, and an S3 endpoint from moto. Everything listens on loopback."""
