"""HTTPS and HTTP/2 to clients, with a self-signed certificate made at test time: httpx, the
command-line client, and a real Chromium (launcher, many parallel requests over one HTTP/2
connection, a large download, a WebSocket)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import BACKENDS, PY, ProxyProcess, echo_command, launch_trioproxy

pytestmark = pytest.mark.timeout(120)
TOKEN = "tls-token"
CHROMIUM = "/usr/bin/chromium"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trioproxy test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certfile, keyfile


def start(tmp_path: Path, proxy_processes: list[ProxyProcess], *extra: str) -> tuple[ProxyProcess, Path]:
    certfile, keyfile = make_certificate(tmp_path)
    config = tmp_path / "config.py"
    servers = {
        "echo": {"command": echo_command()},
        "ws": {"command": [PY, str(BACKENDS / "ws_echo.py"), "{port}"]},
    }
    config.write_text(f"c.ServerProxy.servers = {servers!r}\n")
    proxy = launch_trioproxy(
        ["--port", "0", "--token", TOKEN, "--config", str(config), "--certfile", str(certfile), "--keyfile", str(keyfile), *extra],
        env={"JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")},
    )
    proxy_processes.append(proxy)
    return proxy, certfile


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--certfile", "cert.pem"], "--certfile needs --keyfile as well"),
        (["--keyfile", "key.pem"], "--keyfile needs --certfile as well"),
        (["--certfile", "missing.pem", "--keyfile", "key.pem"], "certfile not found: missing.pem"),
        (["--certfile", "junk.pem", "--keyfile", "key.pem"], "cannot use junk.pem with key.pem: "),
    ],
)
def test_tls_mistakes_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    make_certificate(tmp_path)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    result = subprocess.run(
        [PY, "-m", "trioproxy", "--port", "0", *args], capture_output=True, text=True, cwd=tmp_path, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"trioproxy: config error: {message}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_https_with_http2_secure_cookie_and_the_command_line_client(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    proxy, certfile = start(tmp_path, proxy_processes)
    assert proxy.base.startswith("https://127.0.0.1:")
    with httpx.Client(base_url=proxy.base, verify=ssl.create_default_context(cafile=str(certfile)), http2=True) as client:
        response = client.get(f"echo/hello?token={TOKEN}")
        assert response.status_code == 200 and response.http_version == "HTTP/2"
        assert response.json()["target"] == f"/hello?token={TOKEN}"
        cookie = response.headers["set-cookie"]
        assert "; Secure" in cookie and "HttpOnly" in cookie
        # The cookie alone lets the browser in afterwards.
        assert client.get("server-proxy/api/servers").status_code == 200
    with httpx.Client(base_url=proxy.base, verify=ssl.create_default_context(cafile=str(certfile))) as http1:
        response = http1.get("echo/", headers={"Authorization": f"token {TOKEN}"})
        assert response.status_code == 200 and response.http_version == "HTTP/1.1"
    # Plain HTTP to the HTTPS port gets nowhere.
    with pytest.raises(httpx.HTTPError):
        httpx.get(proxy.base.replace("https:", "http:"), timeout=5)
    # trioproxy servers finds it, and trusts exactly the certificate it serves.
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    table = subprocess.run([PY, "-m", "trioproxy", "servers"], capture_output=True, text=True, env=env, timeout=30)
    assert table.returncode == 0, table.stderr
    assert "echo" in table.stdout and "ready" in table.stdout


BROWSER_CHECKS = """
async ([count, size]) => {
  const parallel = await Promise.all(
    Array.from({ length: count }, (_, i) => fetch(`echo/bytes?size=2048&n=${i}`).then((r) => r.arrayBuffer()))
  );
  const big = await (await fetch(`echo/bytes?size=${size}`)).arrayBuffer();
  const echoed = await new Promise((resolve, reject) => {
    const socket = new WebSocket(new URL("ws/echo", location.href).href.replace(/^https/, "wss"));
    socket.onopen = () => socket.send("hello over TLS");
    socket.onmessage = (event) => { resolve(event.data); socket.close(); };
    socket.onerror = () => reject(new Error("WebSocket failed"));
  });
  const protocols = performance.getEntriesByType("resource").map((entry) => entry.nextHopProtocol);
  return {
    sizes: parallel.map((body) => body.byteLength),
    big: big.byteLength,
    echoed,
    protocols,
    page: performance.getEntriesByType("navigation")[0].nextHopProtocol,
  };
}
"""


def established_connections(port: int) -> int:
    """Established TCP connections to ``port`` on this machine (server side), from /proc."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as file:
            for line in file.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    count += 1
    return count


# Skipped on a machine without Chromium, never in CI (CI=true), where .ci/run installs it.
@pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"), reason=f"no Chromium at {CHROMIUM}")
def test_chromium_over_https_and_http2(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    from playwright.sync_api import expect, sync_playwright

    from tests.test_launcher_browser import CHROMIUM_ARGS

    proxy, _ = start(tmp_path, proxy_processes)
    port = int(proxy.base.rsplit(":", 1)[1].split("/")[0])
    size = 20 * 1024 * 1024
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, "--ignore-certificate-errors"]
        )
        try:
            context = browser.new_context(ignore_https_errors=True)
            page = context.new_page()
            page.goto(f"{proxy.base}?token={TOKEN}")
            expect(page).to_have_title("trioproxy")
            expect(page.locator("li.server .title")).to_have_text(["echo", "ws"])
            expect(page.locator("#status")).to_contain_text("Updated")  # the launcher's polling works
            result = page.evaluate(BROWSER_CHECKS, [60, size])
            assert result["page"] == "h2"
            assert result["sizes"] == [2048] * 60
            assert result["big"] == size
            assert result["echoed"] == "hello over TLS"
            assert result["protocols"] and set(result["protocols"]) == {"h2"}
            # All of it over one connection: HTTP/2's multiplexing, not six HTTP/1.1 ones.
            assert established_connections(port) == 1
            cookies = context.cookies(proxy.base)
            assert cookies and all(cookie["secure"] and cookie["httpOnly"] for cookie in cookies)
        finally:
            browser.close()
