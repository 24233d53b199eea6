"""The CI rule itself: with CI=true a skipped bpf test fails the run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
TESTS = """
import pytest

@pytest.mark.bpf
def test_kernel():
    pytest.skip("no kernel here")

def test_plain():
    pytest.skip("plain skips are fine")
"""


@pytest.mark.parametrize(("ci", "failed", "skipped"), [("true", 1, 1), ("", 0, 2)])
def test_skipped_bpf_test_fails_only_in_ci(pytester, monkeypatch, ci, failed, skipped):
    monkeypatch.setenv("CI", ci)
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    bpf: kernel test\n")
    pytester.makepyfile(TESTS)
    # The rule is read at import of conftest: run in a fresh interpreter.
    result = pytester.runpytest_subprocess()
    # As root the kernel test skips in its body (a failure); unprivileged,
    # conftest skips it before (an error at setup): either way the run is red.
    got = result.parseoutcomes()
    assert got.get("failed", 0) + got.get("errors", got.get("error", 0)) == failed, got
    assert got.get("skipped", 0) == skipped, got


@pytest.mark.bpf
def test_embed_example_runs(cgroups):
    cgroups.make("ex")
    example = Path(__file__).parent.parent / "examples" / "embed.py"
    res = subprocess.run([sys.executable, str(example), str(cgroups.root), "1.5"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert "idle=" in res.stdout
