"""Certificates and keys for a throwaway local cluster (CA, API server serving cert, service accounts).

Written with `cryptography` rather than by shelling out to openssl: one process, no temp CSR files,
and the SANs are data instead of an openssl config file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ClusterPki:
    ca_cert: Path
    ca_key: Path
    apiserver_cert: Path
    apiserver_key: Path
    kubelet_client_cert: Path
    kubelet_client_key: Path
    service_account_key: Path
    service_account_pub: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        parts.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(parts)


def _sign(subject: x509.Name, key: rsa.RSAPrivateKey, issuer: x509.Name, issuer_key: rsa.RSAPrivateKey, *, ca: bool,
          usage: list | None = None, dns: list[str] = (), ips: list[str] = ()) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if dns or ips:
        names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def generate(folder: Path, *, extra_ips: list[str] = ()) -> ClusterPki:
    """Create (or reuse, when already present) the cluster's keys and certificates in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    pki = ClusterPki(*(folder / n for n in (
        "ca.crt", "ca.key", "apiserver.crt", "apiserver.key", "kubelet-client.crt", "kubelet-client.key", "sa.key", "sa.pub")))
    if all(p.exists() for p in vars(pki).values()):
        return pki
    pem = serialization.Encoding.PEM
    ca_key = _key()
    ca_name = _name("plansmith-dev-ca")
    ca = _sign(ca_name, ca_key, ca_name, ca_key, ca=True)
    pki.ca_cert.write_bytes(ca.public_bytes(pem))
    _write_key(pki.ca_key, ca_key)

    server_key = _key()
    dns = ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "localhost"]
    ips = ["127.0.0.1", "10.0.0.1", *extra_ips]
    server = _sign(_name("kube-apiserver"), server_key, ca_name, ca_key, ca=False,
                   usage=[ExtendedKeyUsageOID.SERVER_AUTH], dns=dns, ips=ips)
    pki.apiserver_cert.write_bytes(server.public_bytes(pem))
    _write_key(pki.apiserver_key, server_key)

    client_key = _key()
    client = _sign(_name("kube-apiserver-kubelet-client", "system:masters"), client_key, ca_name, ca_key, ca=False,
                   usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    pki.kubelet_client_cert.write_bytes(client.public_bytes(pem))
    _write_key(pki.kubelet_client_key, client_key)

    sa_key = _key()
    _write_key(pki.service_account_key, sa_key)
    pki.service_account_pub.write_bytes(
        sa_key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo))
    return pki
