"""Run jupyter-server-proxy 4.6.0's tests/test_proxies.py and print the outcome.

    python tests/jsp_suite/run.py              # against trioproxy (this environment's)
    python tests/jsp_suite/run.py --reference  # against jupyter-server-proxy itself

The reference run installs jupyter-server-proxy 4.6.0 with Jupyter Server, Notebook and
JupyterLab (their fixture starts ``jupyter notebook`` and ``jupyter lab``) into a venv of its
own, ``.venv/jsp-reference/``, created on first use; the adapter then leaves their fixture
alone and marks nothing. Exit status: 0 when no test failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from suite import CACHE, VERSION, SuiteError, fetch_and_run

REFERENCE_VENV = CACHE.parent / "jsp-reference"
REFERENCE_PACKAGES = [
    f"jupyter-server-proxy=={VERSION}",
    "jupyter_server>=2",
    "notebook>=7",
    "jupyterlab>=4",
    "pytest>=8",
    "pytest-asyncio>=0.24",
]


def reference_python() -> str:
    python = REFERENCE_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {REFERENCE_VENV} with {', '.join(REFERENCE_PACKAGES)} …", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(REFERENCE_VENV)], check=True)
    # Every time: a venv that lost a package, or a half-finished one, is mended.
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *REFERENCE_PACKAGES], check=True)
    return str(python)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", action="store_true", help="run against jupyter-server-proxy itself")
    parser.add_argument("--verbose", action="store_true", help="print their pytest's whole output")
    args = parser.parse_args()
    target = f"jupyter-server-proxy {VERSION}" if args.reference else "trioproxy"
    try:
        python = reference_python() if args.reference else sys.executable
        outcome = fetch_and_run(python=python, reference=args.reference)
    except (SuiteError, subprocess.CalledProcessError) as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 2
    print(outcome.output if args.verbose else outcome.output[-4000:])
    print(f"jupyter-server-proxy {VERSION}'s tests/test_proxies.py against {target}: {outcome.summary()}")
    return 0 if outcome.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
