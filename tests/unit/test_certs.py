"""`kvroute certs`: the files it writes carry the identities the controller checks
(dataplane.api.identity) and chain to one CA; the server side is exercised over real gRPC
in test_grpc_stream.py."""

from __future__ import annotations

import stat
from pathlib import Path

from click.testing import CliRunner
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from dataplane import cli
from dataplane.api import identity


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """cryptography 38 has no verify_directly_issued_by: the same check by hand."""
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    algorithm = cert.signature_hash_algorithm
    assert algorithm is not None
    try:
        public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
    except InvalidSignature:
        return False
    return cert.issuer == ca.subject


def test_certs_writes_a_ca_a_controller_and_one_identity_per_node(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    result = CliRunner().invoke(cli.main, ["certs", str(out), "--node", "gpu-1",
                                           "--node", "gpu-2", "--server-name", "ctl.example",
                                           "--server-name", "10.0.0.9"])
    assert result.exit_code == 0, result.output
    ca = _cert(out / "ca.crt")
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    for node in ("gpu-1", "gpu-2"):
        folder = out / "nodes" / node
        crt = _cert(folder / "tls.crt")
        assert identity.node_of(_uris(crt)) == node
        assert _signed_by(crt, ca)
        assert (folder / "ca.crt").read_bytes() == (out / "ca.crt").read_bytes()
        assert stat.S_IMODE((folder / "tls.key").stat().st_mode) == 0o600
    server = _cert(out / "controller" / "tls.crt")
    assert _signed_by(server, ca)
    assert identity.node_of(_uris(server)) is None  # the controller is no node
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ctl.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.9"]

    # A second run reuses the CA: a node added later chains to the same one.
    again = CliRunner().invoke(cli.main, ["certs", str(out), "--no-server", "--node", "gpu-3"])
    assert again.exit_code == 0, again.output
    assert _cert(out / "ca.crt") == ca
    assert _signed_by(_cert(out / "nodes" / "gpu-3" / "tls.crt"), ca)
    assert str(out / "nodes" / "gpu-3" / "tls.crt") in again.output
    assert "controller" not in again.output
    # ...while another folder gets another CA, which the check above tells apart.
    assert CliRunner().invoke(cli.main, ["certs", str(tmp_path / "other"), "--node",
                                         "gpu-1"]).exit_code == 0
    assert not _signed_by(_cert(tmp_path / "other" / "nodes" / "gpu-1" / "tls.crt"), ca)


def test_certs_refuses_a_bad_node_name_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    result = CliRunner().invoke(cli.main, ["certs", str(out), "--node", "ok",
                                           "--node", "Bad/Name"])
    assert result.exit_code == 1
    assert "not a node name" in result.output
    assert not out.exists()
