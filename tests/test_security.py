"""Security: TLS, mutual TLS and bearer-token auth against real servers, with certificates made here.

The certificates are generated per session with ``cryptography``: a CA, a server certificate for
127.0.0.1/localhost, a client certificate from the same CA, and a client certificate from another CA
(which mutual TLS must refuse).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import pathlib
import sys

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from zimage.v1 import zimage_pb2_grpc as pb_grpc
from zimage_client import AsyncZImageClient, build_request
from zimage_server.cli import config_from_args

BIN = pathlib.Path(sys.executable).parent
TOKEN = "s3cret-token-for-tests"
SMALL = {"width": 64, "height": 64, "steps": 1, "seed": 3}


# ---------------------------------------------------------------------------- certificates
@dataclasses.dataclass(frozen=True)
class Pki:
    """PEM files written by the ``pki`` fixture."""

    ca: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path
    rogue_cert: pathlib.Path  # a client certificate from another CA
    rogue_key: pathlib.Path

    def read(self, name: str) -> bytes:
        return getattr(self, name).read_bytes()


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, san=None, usage=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject)).issuer_name(_name(issuer)).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: pathlib.Path, cert: x509.Certificate, key) -> tuple[pathlib.Path, pathlib.Path]:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("zimage test CA", ca_key, "zimage test CA", ca_key, ca=True)
    rogue_ca = _cert("rogue CA", rogue_ca_key, "rogue CA", rogue_ca_key, ca=True)
    ca_path, _ = _write(d / "ca", ca, ca_key)
    server_key = _key()
    server = _cert("zimage-server", server_key, "zimage test CA", ca_key,
                   san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
                   usage=[ExtendedKeyUsageOID.SERVER_AUTH])
    client_key, rogue_key = _key(), _key()
    client = _cert("zimage-client", client_key, "zimage test CA", ca_key, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    rogue = _cert("zimage-client", rogue_key, "rogue CA", rogue_ca_key, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    server_cert, server_key_path = _write(d / "server", server, server_key)
    client_cert, client_key_path = _write(d / "client", client, client_key)
    rogue_cert, rogue_key_path = _write(d / "rogue", rogue, rogue_key)
    del rogue_ca
    return Pki(ca_path, server_cert, server_key_path, client_cert, client_key_path, rogue_cert, rogue_key_path)


@pytest.fixture
def token_file(tmp_path) -> pathlib.Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")  # surrounding whitespace is ignored
    path.chmod(0o600)
    return path


async def generate_code(target: str, **connection) -> grpc.StatusCode:
    """Status code of one small Generate (no retries, short timeout)."""
    async with AsyncZImageClient(target, retries=0, **connection) as client:
        try:
            result = await client.generate("a fox", timeout_s=20, **SMALL)
        except grpc.aio.AioRpcError as err:
            return err.code()
    assert result.images and result.images[0].width == 64
    return grpc.StatusCode.OK


# ---------------------------------------------------------------------------- TLS
async def test_tls_client_with_the_ca_succeeds_and_plaintext_fails(make_server, pki):
    server = await make_server(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    for host in ("127.0.0.1", "localhost"):
        assert await generate_code(f"{host}:{server.port}", root_certificates=pki.read("ca")) == grpc.StatusCode.OK
    assert await generate_code(f"127.0.0.1:{server.port}") == grpc.StatusCode.UNAVAILABLE
    # A client that trusts another CA refuses the server's certificate.
    assert await generate_code(f"127.0.0.1:{server.port}", root_certificates=pki.read("rogue_cert")) \
        == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(make_server, pki):
    server = await make_server(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                               tls_client_ca=str(pki.ca))
    target = f"127.0.0.1:{server.port}"
    ca = pki.read("ca")
    assert await generate_code(target, root_certificates=ca) == grpc.StatusCode.UNAVAILABLE
    assert await generate_code(target, root_certificates=ca, client_cert_chain=pki.read("rogue_cert"),
                               client_key=pki.read("rogue_key")) == grpc.StatusCode.UNAVAILABLE
    assert await generate_code(target, root_certificates=ca, client_cert_chain=pki.read("client_cert"),
                               client_key=pki.read("client_key")) == grpc.StatusCode.OK


# ---------------------------------------------------------------------------- bearer tokens
def unauthenticated(server, rpc: str) -> float:
    return server.metrics.requests.labels(rpc=rpc, code="UNAUTHENTICATED")._value.get()


async def test_token_auth_rejects_missing_and_wrong_tokens_and_counts_them(make_server, token_file):
    server = await make_server(auth_token_file=str(token_file))
    target = f"127.0.0.1:{server.port}"
    assert await generate_code(target) == grpc.StatusCode.UNAUTHENTICATED
    assert await generate_code(target, token="wrong") == grpc.StatusCode.UNAUTHENTICATED
    assert await generate_code(target, token=TOKEN + "x") == grpc.StatusCode.UNAUTHENTICATED
    assert await generate_code(target, token=TOKEN[:-1]) == grpc.StatusCode.UNAUTHENTICATED
    assert unauthenticated(server, "Generate") == 4
    assert await generate_code(target, token=TOKEN) == grpc.StatusCode.OK
    assert unauthenticated(server, "Generate") == 4
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # streaming is guarded too
            async for _ in stub.StreamProgress(build_request("a fox", **SMALL)):
                pass
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:  # a scheme other than Bearer
            await stub.Generate(build_request("a fox", **SMALL), metadata=(("authorization", f"Basic {TOKEN}"),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open for load balancers and kubelets.
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert unauthenticated(server, "StreamProgress") == 1
    assert server.metrics.requests.labels(rpc="Generate", code="OK")._value.get() == 1


async def test_unknown_methods_share_one_metric_label(make_server, token_file):
    """The method path is the client's choice: random names must not become label values."""
    server = await make_server(auth_token_file=str(token_file))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for name in ("/zimage.v1.ImageGenerationService/Nope1", "/zimage.v1.ImageGenerationService/Nope2",
                     "/evil.Service/Random"):
            call = channel.unary_unary(name, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(b"")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    labels = {s.labels["rpc"] for metric in server.metrics.registry.collect() if metric.name == "zimage_requests"
              for s in metric.samples}
    assert labels == {"unknown"}
    assert unauthenticated(server, "unknown") == 3


def test_metrics_bind_loopback_by_default_when_auth_is_on():
    assert config_from_args([], {}).metrics_host == "0.0.0.0"
    assert config_from_args(["--auth-token-file", "/t"], {}).metrics_host == "127.0.0.1"
    assert config_from_args([], {"ZIMAGE_AUTH_TOKEN_FILE": "/t"}).metrics_host == "127.0.0.1"
    # An explicit choice (flag or environment) wins.
    assert config_from_args(["--auth-token-file", "/t", "--metrics-host", "0.0.0.0"], {}).metrics_host == "0.0.0.0"
    assert config_from_args(["--auth-token-file", "/t"], {"ZIMAGE_METRICS_HOST": "10.0.0.5"}).metrics_host \
        == "10.0.0.5"


# ---------------------------------------------------------------------------- the CLI client
async def zimage(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(str(BIN / "zimage"), *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode, out.decode(), err.decode()


async def test_cli_with_ca_client_certificate_and_token_file(make_server, pki, token_file, tmp_path):
    server = await make_server(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                               tls_client_ca=str(pki.ca), auth_token_file=str(token_file))
    base = ["--target", f"localhost:{server.port}", "--ca", str(pki.ca), "--cert", str(pki.client_cert),
            "--key", str(pki.client_key), "--retries", "0"]
    code, out, err = await zimage(*base, "health")
    assert (code, out.strip()) == (0, "SERVING"), err
    out_png = tmp_path / "fox.png"
    code, out, err = await zimage(*base, "--token-file", str(token_file), "generate", "a fox", "-o", str(out_png),
                                  "--width", "64", "--height", "64", "--steps", "1", "--seed", "3")
    assert code == 0, err
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = await zimage(*base, "generate", "a fox", "-o", str(tmp_path / "no.png"),
                                  "--width", "64", "--height", "64", "--steps", "1")
    assert code == 1 and "UNAUTHENTICATED" in err
    assert not (tmp_path / "no.png").exists()
