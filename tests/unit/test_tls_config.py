"""DICOM TLS settings: refused early, with a message that names the setting and the file."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from app.config import PacsNode, Settings, load_settings
from app.dimse.tls import ClientContext, client_context, describe_tls_error
from app.runtime import storage_tls
from tests.tlscerts import Credentials, TestCA


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def creds(ca: TestCA) -> Credentials:
    return ca.issue("dimse-gateway")


def node(**tls: Any) -> PacsNode:
    return PacsNode(name="pacs", ae_title="PACS", host="127.0.0.1", port=104, **tls)


def refused(fn: Any, **kwargs: Any) -> str:
    with pytest.raises(ValidationError) as info:
        fn(**kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- nodes


def test_a_complete_tls_node(ca: TestCA, creds: Credentials) -> None:
    n = node(tls=True, tls_ca_file=ca.cert, tls_cert_file=creds.cert, tls_key_file=creds.key)
    assert n.tls and n.tls_verify_hostname
    # Server authentication only, against the system's CAs: allowed.
    assert node(tls=True).tls_ca_file is None


def test_certificates_without_tls_true_are_refused(ca: TestCA) -> None:
    message = refused(node, tls_ca_file=ca.cert)
    assert "node 'pacs': tls_ca_file given but tls is not true" in message


@pytest.mark.parametrize("given", ["tls_cert_file", "tls_key_file"])
def test_certificate_and_key_go_together(given: str, creds: Credentials) -> None:
    path = creds.cert if given == "tls_cert_file" else creds.key
    message = refused(node, tls=True, **{given: path})
    assert "tls_cert_file and tls_key_file go together" in message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    message = refused(node, tls=True, tls_ca_file=missing)
    assert f"tls_ca_file {missing} does not exist" in message


def test_a_ca_file_without_certificates_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    assert "holds no usable PEM certificate" in refused(node, tls=True, tls_ca_file=junk)


def test_a_key_that_does_not_match_its_certificate(
    ca: TestCA, creds: Credentials, tmp_path: Path
) -> None:
    other = TestCA(tmp_path / "other").issue("other")
    message = refused(
        node, tls=True, tls_ca_file=ca.cert, tls_cert_file=creds.cert, tls_key_file=other.key
    )
    assert "cannot be used together" in message and str(creds.cert) in message


def test_tls_node_from_a_toml_file(tmp_path: Path, ca: TestCA, creds: Credentials) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[gateway]
storage_tls_port = 2762
storage_tls_cert_file = "{creds.cert}"
storage_tls_key_file = "{creds.key}"
storage_tls_ca_file = "{ca.cert}"

[[nodes]]
name = "pacs"
ae_title = "PACS"
host = "pacs.example.org"
port = 2762
tls = true
tls_ca_file = "{ca.cert}"
tls_cert_file = "{creds.cert}"
tls_key_file = "{creds.key}"
""",
        encoding="utf-8",
    )
    settings = load_settings(config)
    assert settings.nodes[0].tls and settings.nodes[0].tls_key_file == creds.key
    assert settings.storage_tls_port == 2762


# --------------------------------------------------------------------------- storage SCP


def storage(**fields: Any) -> Settings:
    return Settings(storage_port=11112, **fields)


def test_storage_tls_needs_its_port_certificate_and_key(ca: TestCA, creds: Credentials) -> None:
    assert "given but no storage_tls_port" in refused(storage, storage_tls_cert_file=creds.cert)
    assert "needs storage_tls_cert_file and storage_tls_key_file" in refused(
        storage, storage_tls_port=2762, storage_tls_cert_file=creds.cert
    )
    assert "must differ from storage_port" in refused(
        storage,
        storage_tls_port=11112,
        storage_tls_cert_file=creds.cert,
        storage_tls_key_file=creds.key,
        storage_tls_ca_file=ca.cert,
    )


def test_required_client_certificates_need_a_ca(ca: TestCA, creds: Credentials) -> None:
    tls = {
        "storage_tls_port": 2762,
        "storage_tls_cert_file": creds.cert,
        "storage_tls_key_file": creds.key,
    }
    assert "storage_tls_require_client_cert needs storage_tls_ca_file" in refused(storage, **tls)
    assert storage(**tls, storage_tls_require_client_cert=False).storage_tls_port == 2762
    assert storage(**tls, storage_tls_ca_file=ca.cert).storage_tls_require_client_cert


def test_tls_nodes_must_store_over_tls(ca: TestCA, creds: Credentials) -> None:
    """Their AE titles are refused on the plain port, unless a plain node shares them."""
    secure = node(tls=True, tls_ca_file=ca.cert)
    nodes = [
        secure,
        secure.model_copy(update={"name": "shared", "ae_title": "SHARED"}),
        node().model_copy(update={"name": "shared-plain", "ae_title": "SHARED"}),
        node().model_copy(update={"name": "plain", "ae_title": "PLAIN"}),
    ]
    assert storage_tls(storage(nodes=nodes)) is None
    tls = storage_tls(
        storage(
            nodes=nodes,
            storage_tls_port=2762,
            storage_tls_cert_file=creds.cert,
            storage_tls_key_file=creds.key,
            storage_tls_ca_file=ca.cert,
        )
    )
    assert tls is not None
    assert tls.tls_only_senders == {"PACS"}
    assert (tls.port, tls.ca_file, tls.require_client_cert) == (2762, str(ca.cert), True)


# --------------------------------------------------------------------------- contexts


def test_client_context_is_tls12_or_later_and_verifies(ca: TestCA, creds: Credentials) -> None:
    context = client_context(
        ca_file=ca.cert, cert_file=creds.cert, key_file=creds.key, verify_hostname=False
    )
    assert isinstance(context, ClientContext)
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert not context.check_hostname


def test_failures_are_remembered_for_the_pool(ca: TestCA) -> None:
    context = client_context(ca_file=ca.cert, cert_file=None, key_file=None, verify_hostname=True)
    context.record_failure(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"))
    failure = context.failure_since(0.0)
    assert failure is not None and "does the PACS speak TLS on this port?" in failure
    assert context.failure_since(float("inf")) is None


def test_verification_errors_name_the_setting_to_check() -> None:
    unknown = ssl.SSLCertVerificationError(1, "certificate verify failed")
    unknown.verify_code, unknown.verify_message = 20, "unable to get local issuer certificate"
    assert "tls_ca_file" in describe_tls_error(unknown)
    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed")
    mismatch.verify_code, mismatch.verify_message = 62, "Hostname mismatch"
    assert "tls_verify_hostname" in describe_tls_error(mismatch)
