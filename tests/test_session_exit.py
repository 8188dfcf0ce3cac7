"""The test session's own end (tests/conftest.py pytest_unconfigure): a session that started Ray
ends with pytest's status and summary, without the interpreter teardown Ray's threads outlive."""

import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

# every probe says when the interpreter's teardown runs (atexit)
TEARDOWN = """
import atexit
import os

atexit.register(lambda: print("interpreter teardown ran", flush=True))
"""

RAY_TEST = """
def test_with_ray():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.shutdown()
    assert not os.environ.get("PROBE_FAIL"), "probe asked to fail"
"""

PLAIN_TEST = """
def test_plain():
    pass
"""


def run_probe(tmp_path, source: str, **env: str) -> subprocess.CompletedProcess:
    """pytest on `source` as a test file, with tests/conftest.py as its plugin."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(source)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            str(probe),
        ],
        cwd=REPO,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.slow
@pytest.mark.parametrize(("fail", "status", "summary"), [("", 0, "1 passed"), ("1", 1, "1 failed")])
def test_ray_session_keeps_status_and_summary(tmp_path, fail, status, summary):
    run = run_probe(tmp_path, TEARDOWN + RAY_TEST, PROBE_FAIL=fail)
    assert run.returncode == status, run.stdout + run.stderr
    assert summary in run.stdout
    # the interpreter's teardown was skipped (os._exit), not run
    assert "interpreter teardown ran" not in run.stdout


def test_session_without_ray_exits_normally(tmp_path):
    run = run_probe(tmp_path, TEARDOWN + PLAIN_TEST)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    assert "interpreter teardown ran" in run.stdout
