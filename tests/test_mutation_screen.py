"""docs/mutation_screen.py, the in-process kill check of docs/mutation.md: a verdict per mutant, and no verdicts at
all when the control (a name no mutant has) fails."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "mutation_screen.py"

# Stands in for mutmut's trampoline: behaves differently only under the mutant it names.
TEST = """
import os

def test_sees_the_mutant():
    assert os.environ["MUTANT_UNDER_TEST"] != "pkg.f__mutmut_1"

def test_always_fails():
    assert False
"""


def _screen(tmp_path, *pairs):
    (tmp_path / "test_fake.py").write_text(TEST)
    env = {k: v for k, v in os.environ.items() if k != "MUTANT_UNDER_TEST"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *pairs], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def test_each_mutant_gets_its_verdict_after_a_passing_control(tmp_path):
    node = "test_fake.py::test_sees_the_mutant"
    run = _screen(tmp_path, f"pkg.f__mutmut_1={node}", f"pkg.f__mutmut_2={node}")
    assert run.returncode == 0, run.stdout + run.stderr
    table = run.stdout.split("==== screen results")[1].strip().splitlines()
    assert [row.split(" | ")[::2] for row in table] == [
        ["control_no_such_mutant", "survived"],
        ["pkg.f__mutmut_1", "killed (rc 1)"],
        ["pkg.f__mutmut_2", "survived"],
    ]


def test_a_failing_control_fails_the_screen(tmp_path):
    run = _screen(tmp_path, "pkg.f__mutmut_1=test_fake.py::test_always_fails")
    assert run.returncode == 1
    assert "control_no_such_mutant | test_fake.py::test_always_fails | killed" in run.stdout


def test_a_pair_without_a_test_is_refused_with_the_usage(tmp_path):
    run = _screen(tmp_path, "pkg.f__mutmut_1")
    assert run.returncode == 1 and "usage: python docs/mutation_screen.py MUTANT_NAME=TEST_NODE" in run.stderr
