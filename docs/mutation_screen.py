"""In-process mutation screen: run chosen tests against named mutmut mutants, in one process.

mutmut forks a worker per mutant and runs every test that covers the mutated function; for a function covered by
hundreds of tests that costs minutes per survivor. mutmut's trampolines read ``MUTANT_UNDER_TEST`` on every call, so
setting it and calling ``pytest.main`` on one chosen test checks a kill in about a second. A control name that
matches no mutant must pass, or the verdicts mean nothing. See docs/mutation.md.

Run from ``./mutants/`` after ``mutmut run`` created it (copy changed test files into ``mutants/tests/`` first):

    cd mutants && python ../docs/mutation_screen.py \
        'ftn_peft.layer.xǁFTNLayerǁforward__mutmut_21=tests/test_layers.py::test_name' ...
"""

import os
import sys
import time

CONTROL = "control_no_such_mutant"


def main(pairs: list[str]) -> int:
    sys.path.insert(0, os.getcwd())  # the mutated copy, not an installed or checked-out ftn_peft
    import pytest

    runs = [(CONTROL, pairs[0].split("=", 1)[1])] + [tuple(p.split("=", 1)) for p in pairs]
    rows = []
    for name, node in runs:
        os.environ["MUTANT_UNDER_TEST"] = name
        start = time.time()
        rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "--no-header", node])
        rows.append((name, node, "survived" if rc == 0 else f"killed (rc {rc})", time.time() - start))
    print("\n==== screen results")
    for name, node, verdict, seconds in rows:
        print(f"{name} | {node} | {verdict} | {seconds:.1f} s")
    return 1 if rows[0][2] != "survived" else 0  # a failing control invalidates every verdict


if __name__ == "__main__":
    if not sys.argv[1:] or any("=" not in a for a in sys.argv[1:]):
        sys.exit("usage: python docs/mutation_screen.py MUTANT_NAME=TEST_NODE [...]  (run from ./mutants/)")
    sys.exit(main(sys.argv[1:]))
