"""Fetch jupyter-server-proxy's release, run its tests/test_proxies.py, read the outcome.

Shared by tests/test_jsp_suite.py (against trioproxy) and run_reference.py (against
jupyter-server-proxy itself). Nothing of theirs is kept in this repository: the sdist is
downloaded with pip, checked against the pinned sha256, cached under ``.venv/jsp-suite/``
(ignored by git), and unpacked into a temporary directory for each run.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
CACHE = ROOT / ".venv" / "jsp-suite"

VERSION = "4.6.0"
SDIST = f"jupyter_server_proxy-{VERSION}.tar.gz"
SHA256 = "b3f8fdb4c6b59fdb41f0d5342f002719eaad5f375e87fa659e21fe69d35ee6c1"
TEST_FILE = "tests/test_proxies.py"


class SuiteError(Exception):
    """The suite could not be fetched or run; the message says why."""


def fetch_sdist(cache: Path = CACHE) -> Path:
    """The release's sdist, downloaded once with pip and checked against SHA256."""
    cached = cache / SDIST
    if cached.exists() and _sha256(cached) == SHA256:
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as download:
        # Only the sdist: --no-binary for this one package, wheels for its build requirements,
        # which pip installs (in isolation) to read its metadata.
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--no-binary", "jupyter-server-proxy", "--dest", download,
            f"jupyter-server-proxy=={VERSION}",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        fetched = Path(download) / SDIST
        if result.returncode != 0 or not fetched.exists():
            raise SuiteError(
                f"pip could not download {SDIST} (exit code {result.returncode}):\n{result.stderr[-3000:]}"
            )
        digest = _sha256(fetched)
        if digest != SHA256:
            raise SuiteError(f"{SDIST} has sha256 {digest}, expected {SHA256}: not the pinned release")
        os.replace(fetched, cached)
    return cached


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unpack(sdist: Path, into: Path) -> Path:
    """The sdist's top directory, unpacked below ``into``."""
    with tarfile.open(sdist) as archive:
        archive.extractall(into, filter="data")
    source = into / SDIST.removesuffix(".tar.gz")
    if not (source / TEST_FILE).exists():
        raise SuiteError(f"{SDIST} has no {TEST_FILE}")
    return source


@dataclass
class Outcome:
    returncode: int
    outcomes: dict[str, str]  # test id (their nodeid) -> passed, failed, error, skipped, xfailed
    output: str

    @property
    def counts(self) -> Counter[str]:
        return Counter(self.outcomes.values())

    def summary(self) -> str:
        counts = self.counts
        order = ["passed", "xfailed", "skipped", "failed", "error"]
        return ", ".join(f"{counts[kind]} {kind}" for kind in order if counts[kind]) or "no tests"


def run_suite(
    source: Path, *, python: str = sys.executable, reference: bool = False, timeout: float = 240
) -> Outcome:
    """Run their test file in a pytest subprocess with the adapter; parse its JUnit XML.

    ``reference``: leave their fixture in place (a real Jupyter server with
    jupyter-server-proxy, which ``python``'s environment must have).
    """
    junit = source / "junit.xml"
    command = [
        python, "-m", "pytest", TEST_FILE,
        "-c", str(HERE / "inner.ini"), "--rootdir", str(source),
        "-p", "jsp_adapter", "-p", "no:cacheprovider", "-p", "no:trio",
        f"--junitxml={junit}", "-o", "junit_family=xunit2", "-q", "-rfEX",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env["TRIOPROXY_JSP_TARGET"] = "jupyter-server-proxy" if reference else "trioproxy"
    env.pop("JUPYTER_TOKEN", None)
    # In a session of its own, so that whatever it leaves running can be found and stopped:
    # jupyter-server-proxy leaves its servers running when Jupyter shuts down.
    process = subprocess.Popen(
        command, cwd=source, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(process.pid)
        output, _ = process.communicate()
        raise SuiteError(f"their suite did not finish within {timeout:g} s:\n{output[-5000:]}") from None
    finally:
        _stop_group(process.pid)
    if not junit.exists():
        raise SuiteError(f"their suite wrote no report (exit code {process.returncode}):\n{output[-5000:]}")
    return Outcome(process.returncode, parse_junit(junit), output)


def _stop_group(pgid: int) -> None:
    for signum, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def parse_junit(path: Path) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        nodeid = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                break
            if child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
        # A test whose teardown failed may be reported twice: keep its failure.
        if outcomes.get(nodeid) not in ("failed", "error"):
            outcomes[nodeid] = outcome
    return outcomes


def fetch_and_run(*, python: str = sys.executable, reference: bool = False) -> Outcome:
    sdist = fetch_sdist()
    with tempfile.TemporaryDirectory(prefix="jsp-suite-") as tmp:
        source = unpack(sdist, Path(tmp))
        return run_suite(source, python=python, reference=reference)

