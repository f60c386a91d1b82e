"""The public API: every name in ``trioproxy.__all__`` resolves, and importing stays light."""

from __future__ import annotations

import subprocess
import sys

import trioproxy


def test_every_public_name_resolves() -> None:
    for name in trioproxy.__all__:
        assert getattr(trioproxy, name) is not None, name


def test_importing_the_package_loads_no_server_stack() -> None:
    code = "import sys, trioproxy; print(sorted(m for m in ('quart', 'hypercorn', 'httpx', 'traitlets') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_hub_authenticator_does_not_load_the_web_framework() -> None:
    code = "import sys, trioproxy.hub; print(sorted(m for m in ('quart', 'hypercorn') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
