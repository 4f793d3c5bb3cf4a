"""docs/make_all.py: every generated file in docs/ has a job that makes it, and a job must write what it lists."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_all", ROOT / "docs" / "make_all.py")
make_all = importlib.util.module_from_spec(spec)
sys.modules["make_all"] = make_all  # its dataclasses look their module up there
spec.loader.exec_module(make_all)

LISTED = {f for job in make_all.JOBS for f in job.files}


def test_every_figure_and_result_file_in_docs_has_a_job():
    docs = ROOT / "docs"
    generated = [p.name for p in docs.iterdir() if p.is_file() and p.suffix not in (".md", ".py")]
    generated += [p.name for p in docs.glob("*.md") if p.name.startswith(("bench_", "compute_paths_", "scaling_",
                                                                          "demo_results"))]
    assert generated and not sorted(set(generated) - LISTED)
    assert {p.name for p in docs.glob("*.png")} <= LISTED


def test_quick_settings_replace_the_values_of_the_same_flag():
    assert make_all.merge(["--out", "{out}", "--seeds", "0", "1", "--only", "convert"], ["--seeds", "0", "--quick"]) \
        == ["--out", "{out}", "--seeds", "0", "--only", "convert", "--quick"]


def test_a_job_that_does_not_write_a_listed_file_is_an_error(tmp_path):
    script = tmp_path / "writes_one.py"
    script.write_text("import sys, pathlib\npathlib.Path(sys.argv[2], 'a.txt').write_text('a')\n")
    job = make_all.Job("toy", str(script), ["--out", "{out}"], [], ["a.txt", "b.txt"])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match=r"did not write \['b.txt'\]"):
        make_all.run(job, out, tmp_path / "work", quick=False)
    job.files = ["a.txt"]
    make_all.run(job, out, tmp_path / "work", quick=False)
    assert (out / "a.txt").read_text() == "a"
