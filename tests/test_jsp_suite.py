"""jupyter-server-proxy's own tests, from its 4.6.0 release, run against trioproxy.

Their sdist is downloaded with pip (pinned, sha256-checked, cached under ``.venv/jsp-suite/``)
and its ``tests/test_proxies.py`` run unmodified in a pytest subprocess with
``tests/jsp_suite/jsp_adapter.py``, which starts ``python -m trioproxy`` on their
``tests/resources/jupyter_server_config.py`` where they start ``jupyter notebook``/``lab``.
Each test passes, or is listed in ``tests/jsp_suite/differences.toml`` with its reason; any
other outcome fails this test. ``python tests/jsp_suite/run_reference.py`` runs the same
suite against jupyter-server-proxy itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .jsp_suite.jsp_adapter import KINDS, listed_as, load_differences
from .jsp_suite.suite import fetch_and_run

pytestmark = pytest.mark.jsp_suite

README = Path(__file__).parent.parent / "README.md"
# Test ids in their tests/test_proxies.py: 61 tests, each under "notebook" and "lab".
THEIR_TEST_IDS = 122


@pytest.mark.timeout(420)
def test_their_suite_passes_but_for_the_listed_differences() -> None:
    outcome = fetch_and_run()
    unexpected = {test: result for test, result in outcome.outcomes.items() if result in ("failed", "error")}
    assert outcome.returncode == 0 and not unexpected, (
        f"jupyter-server-proxy's suite: {outcome.summary()}; unexpected: {sorted(unexpected)}\n{outcome.output[-10000:]}"
    )
    assert len(outcome.outcomes) == THEIR_TEST_IDS, outcome.output[-5000:]

    differences = load_differences()
    for test, result in outcome.outcomes.items():
        key = listed_as(test.partition("::")[2], differences)
        if key is None:
            expected = "passed"
        else:
            expected = "skipped" if differences[key]["kind"] == "not applicable" else "xfailed"
        assert result == expected, f"{test}: {result}, expected {expected}"
    print(f"jupyter-server-proxy's suite against trioproxy: {outcome.summary()}")


def test_every_listed_difference_is_in_the_readme() -> None:
    readme = README.read_text()
    section = readme.partition("## Differences from jupyter-server-proxy")[2].partition("\n## ")[0]
    assert section, "README has no 'Differences from jupyter-server-proxy' section"
    differences = load_differences()
    assert differences and {entry["kind"] for entry in differences.values()} <= KINDS
    for key in differences:
        function = key.partition("[")[0]
        assert re.search(rf"`{function}`", section), f"{key} is not in README's differences"
