"""Issue the mutual-TLS files of a kvroute fleet: a CA, the controller's server
certificate and one client certificate per node, with the identities of
:mod:`dataplane.api.identity` (agent: URI SAN ``spiffe://kvroute/node/<node>``).

Layout under the output folder (file names as in a Kubernetes TLS Secret, so each folder
can become a Secret or a node's ``/etc/kvroute/pki`` as it is)::

    ca.crt  ca.key                       the CA (ca.key stays with the operator)
    controller/ca.crt tls.crt tls.key    --tls-ca/--tls-cert/--tls-key of the controller
    nodes/<node>/ca.crt tls.crt tls.key  the same flags of the agent on <node>

An existing CA in the folder is reused, so nodes can be added later. Keys are ECDSA
P-256, written 0600.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import oid

from dataplane.api import identity

CA_NAME = "kvroute-ca"
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "kvroute-controller",
                        "kvroute-controller.kvroute.svc",
                        "kvroute-controller.kvroute.svc.cluster.local")
DEFAULT_DAYS = 365


@dataclasses.dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid.NameOID.COMMON_NAME, cn)])


def _builder(subject: str, issuer: x509.Name, public: ec.EllipticCurvePublicKey,
             days: int, now: datetime.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def new_authority(days: int = 10 * DEFAULT_DAYS,
                  now: datetime.datetime | None = None) -> Authority:
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(CA_NAME, _name(CA_NAME), key.public_key(), days, now)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    return Authority(cert, key)


def _leaf(ca: Authority, cn: str, sans: Sequence[x509.GeneralName], server: bool, days: int,
          now: datetime.datetime | None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    usage = oid.ExtendedKeyUsageOID.SERVER_AUTH if server else oid.ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (_builder(cn, ca.cert.subject, key.public_key(), days, now)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return cert, key


def server_cert(ca: Authority, names: Sequence[str], days: int = DEFAULT_DAYS,
                now: datetime.datetime | None = None
                ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The controller's certificate: each name as an IP or DNS SAN, plus its URI."""
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.CONTROLLER_URI)]
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    return _leaf(ca, "kvroute-controller", sans, True, days, now)


def node_cert(ca: Authority, node: str, days: int = DEFAULT_DAYS,
              now: datetime.datetime | None = None
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The agent certificate of ``node``: its one identity is the node URI SAN."""
    uri = identity.node_uri(node)
    return _leaf(ca, node, [x509.UniformResourceIdentifier(uri)], False, days, now)


# -- files --------------------------------------------------------------------------------


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, secret: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if secret:
        os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    return path


def _write_leaf(folder: Path, ca: Authority,
                pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> list[Path]:
    cert, key = pair
    return [_write(folder / "ca.crt", _pem(ca.cert)), _write(folder / "tls.crt", _pem(cert)),
            _write(folder / "tls.key", key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()), secret=True)]


def load_or_create_authority(out: Path) -> tuple[Authority, bool]:
    """The CA in ``out`` (ca.crt, ca.key), or a new one written there; (CA, created)."""
    crt, key_path = out / "ca.crt", out / "ca.key"
    if crt.exists() != key_path.exists():
        raise ValueError(f"{out}: has one of ca.crt and ca.key but not the other")
    if crt.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: not an EC private key")
        return Authority(x509.load_pem_x509_certificate(crt.read_bytes()), key), False
    ca = new_authority()
    _write(crt, _pem(ca.cert))
    _write(key_path, ca.key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), secret=True)
    return ca, True


def issue(out: Path, server_names: Sequence[str], nodes: Sequence[str],
          days: int = DEFAULT_DAYS) -> list[Path]:
    """Write (or reuse) the CA in ``out``, the controller's files when ``server_names`` is
    not empty, and each node's; returns the paths written."""
    for node in nodes:
        identity.check_node(node)  # all or nothing: refuse before writing anything
    ca, created = load_or_create_authority(out)
    written = [out / "ca.crt", out / "ca.key"] if created else []
    if server_names:
        written += _write_leaf(out / "controller", ca, server_cert(ca, server_names, days))
    for node in nodes:
        written += _write_leaf(out / "nodes" / node, ca, node_cert(ca, node, days))
    return written
