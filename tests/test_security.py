"""DICOM TLS with DCMTK's storescu, HTTPS for the API, and secrets only from the environment or private files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import requests

from dicomnode.config import ConfigError, parse_config
from dicomnode.security import check_written_secrets, load_tokens, resolve_secret
from tests.node_helpers import ROOT, NodeProcess, dcmtk, phantom_series, wait_for
from tests.test_node import indexed, jobs


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, and a server certificate (for 127.0.0.1) and a client certificate it signed."""
    d = tmp_path_factory.mktemp("certs")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
            "-days", "2", "-subj", "/CN=dicomnode test CA")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
                "-subj", f"/CN={'127.0.0.1' if name == 'server' else 'STORESCU'}")
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "2", "-extfile", str(d / f"{name}.ext"))
        (d / f"{name}.key").chmod(0o600)
    return d


def storescu_tls(port: int, series: Path, *tls: str) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "DICOMNODE", *tls, "+sd", "127.0.0.1", str(port), str(series)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("receivers", [1, 2])
def test_dicom_tls_with_dcmtk_storescu(tmp_path: Path, certs: Path, receivers: int) -> None:
    """With two receivers the node passes each connection over before the handshake, which the
    receiver process does."""
    tls = {"certfile": str(certs / "server.pem"), "keyfile": str(certs / "server.key"), "ca_file": str(certs / "ca.pem")}
    node = NodeProcess(tmp_path, {"node": {"tls": tls, "receivers": receivers}}).start()
    try:
        if receivers > 1:
            node.wait_receivers_ready()
        series = phantom_series(tmp_path, seed=50)
        plain = storescu_tls(node.port, series)
        assert plain.returncode != 0 and indexed(node) == set()
        [failed] = wait_for(lambda: [x for x in node.log_text().splitlines() if "DICOM TLS handshake with 127.0.0.1" in x], 10,
                            what="the failed handshake logged")
        assert ("dicomnode.scp[" in failed) == (receivers > 1)  # logged by the receiver process, which did the handshake
        no_client_cert = storescu_tls(node.port, series, "+tla", "+cf", str(certs / "ca.pem"))
        assert no_client_cert.returncode != 0 and indexed(node) == set()
        ok = storescu_tls(node.port, series, "+tls", str(certs / "client.key"), str(certs / "client.pem"),
                          "+cf", str(certs / "ca.pem"))
        assert ok.returncode == 0, ok.stderr
        assert len(indexed(node)) == len(list(series.glob("*.dcm")))
        assert "(DICOM TLS)" in node.log_text()
    finally:
        node.stop()


def test_results_go_to_a_tls_destination_with_a_client_certificate(tmp_path: Path, certs: Path) -> None:
    tls = {"certfile": str(certs / "server.pem"), "keyfile": str(certs / "server.key"), "ca_file": str(certs / "ca.pem")}
    receiver = NodeProcess(tmp_path / "receiver", {"node": {"tls": tls}}).start()
    dest = {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": receiver.port}
    client = {"ca_file": str(certs / "ca.pem"), "certfile": str(certs / "client.pem"), "keyfile": str(certs / "client.key")}
    cfg = {"assembly": {"series_quiet_seconds": 0.5}, "jobs": {"send_max_attempts": 1},
           "destinations": {"secure": {**dest, "tls": client}, "plain": dest},
           "rules": [{"name": "all", "match": {}, "pipelines": ["derive"], "send_to": ["secure", "plain"]}]}
    token = "tls-test-token-0123456789"
    node = NodeProcess(tmp_path / "sender", cfg, env={"DICOMNODE_API_TOKEN": token}).start()
    try:
        assert storescu_tls(node.port, phantom_series(tmp_path, seed=51)).returncode == 0
        settled = lambda: [j for j in jobs(node) if j["kind"] == "send" and j["state"] in ("done", "dead")]  # noqa: E731
        wait_for(lambda: len(settled()) == 2, 60, what="both sends settled")
        by_dest = {j["destination"]: j["state"] for j in settled()}
        assert by_dest == {"secure": "done", "plain": "dead"}
        assert len(indexed(receiver)) == 1  # the derived instance, over TLS only
        auth = {"Authorization": f"Bearer {token}"}
        assert requests.post(node.api_url + "/modalities/secure/echo", headers=auth, timeout=30).json()["Success"] is True
        assert requests.post(node.api_url + "/modalities/plain/echo", headers=auth, timeout=30).status_code == 502
    finally:
        node.stop()
        receiver.stop()


def test_https_api_and_a_readable_key_is_refused(tmp_path: Path, certs: Path) -> None:
    api = {"certfile": str(certs / "server.pem"), "keyfile": str(certs / "server.key")}
    node = NodeProcess(tmp_path / "ok", {"api": api}).start()
    try:
        r = requests.get(node.api_url + "/system", verify=str(certs / "ca.pem"), timeout=10)
        assert node.api_url.startswith("https://") and r.json()["Name"] == "dicomnode"
        with pytest.raises(requests.RequestException):  # plain HTTP gets no answer
            requests.get(node.api_url.replace("https", "http") + "/system", timeout=3)
    finally:
        node.stop()
    loose_key = tmp_path / "loose.key"
    loose_key.write_bytes((certs / "server.key").read_bytes())
    loose_key.chmod(0o644)
    loose = NodeProcess(tmp_path / "loose", {"api": {**api, "keyfile": str(loose_key)}})
    r = subprocess.run(loose.command(), capture_output=True, text=True, timeout=60, env=loose.env, cwd=ROOT)
    assert r.returncode != 0 and "api.keyfile" in r.stderr and "chmod 600" in r.stderr


def test_secrets_come_from_the_environment_or_private_files(tmp_path: Path) -> None:
    cfg = parse_config({"destinations": {"pacs-rest": {"url": "http://127.0.0.1:8042", "username": "node",
                                                         "password": "${PACS_PASSWORD}"}}})
    assert resolve_secret(cfg.destinations["pacs-rest"].password, "x", {"PACS_PASSWORD": "s3cret"}) == "s3cret"
    with pytest.raises(ConfigError, match="PACS_PASSWORD, which is not set"):
        resolve_secret("${PACS_PASSWORD}", "destinations: pacs-rest", {})
    config_file = tmp_path / "node.yaml"
    config_file.write_text("{}")
    config_file.chmod(0o644)
    check_written_secrets(cfg, config_file)  # a reference to the environment is not a secret
    written = parse_config({"destinations": {"pacs-rest": {"url": "http://x", "password": "s3cret"}}})
    with pytest.raises(ConfigError, match="chmod 600"):
        check_written_secrets(written, config_file)
    config_file.chmod(0o600)
    check_written_secrets(written, config_file)
    tokens = tmp_path / "tokens"
    tokens.write_text("# who token\nalice aaaaaaaaaaaaaaaaaaaa\nbbbbbbbbbbbbbbbbbbbb\n")
    tokens.chmod(0o600)
    api = parse_config({"api": {"token_file": str(tokens)}}).api
    assert load_tokens(api, {"DICOMNODE_API_TOKEN": "cccccccccccccccccccc"}) == {
        "aaaaaaaaaaaaaaaaaaaa": "alice", "bbbbbbbbbbbbbbbbbbbb": "admin", "cccccccccccccccccccc": "env"}
    tokens.write_text("alice short\n")
    with pytest.raises(ConfigError, match="shorter than 16"):
        load_tokens(api, {})
