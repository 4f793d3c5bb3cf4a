"""Test ftn_peft against the PEFT / transformers pairs in docs/versions.md, each in its own fresh virtualenv.

    nox -s tests-oldest            # the oldest supported pair (what .ci/run checks after the README's command)
    nox -s tests-newest            # the newest pair tested
    nox -l                         # every session
    nox -s tests-oldest -- -m "not slow" tests/test_model.py   # pytest arguments after --

Every session installs torch 2.14.1 / torchvision 0.29.1 first (the README's versions), then the package with its
train and test extras and the session's pins. Update docs/versions.md when a pin changes.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False

TORCH = ("torch==2.14.1", "torchvision==0.29.1")

# name -> pins. "oldest" and "newest" are the bounds setup.cfg states; the others are the middle points run once.
PAIRS = {
    "oldest": ("peft==0.18.0", "transformers==4.57.6"),
    "peft020-tf5": ("peft==0.20.0", "transformers==5.24.0"),
    "peft021-tf4": ("peft==0.21.2", "transformers==4.57.6"),
    "newest": ("peft==0.21.2", "transformers==5.24.0"),
}


# tests/test_peft_generic.py is PEFT 0.21.2's own tuner battery, vendored: it imports configs and helpers that
# older PEFT releases do not have, so it runs only where PEFT is 0.21.
VENDORED_FOR_PEFT_021 = "--ignore=tests/test_peft_generic.py"


def _tests(session: nox.Session, pins: tuple[str, ...]) -> None:
    session.install(*TORCH)
    session.install("-e", ".[train,test]", *pins)
    session.run("python", "-c", "import peft, transformers; print('peft', peft.__version__, 'transformers', transformers.__version__)")
    skip = [] if "peft==0.21.2" in pins else [VENDORED_FOR_PEFT_021]
    if "peft==0.18.0" in pins:
        # PeftModel.add_adapter(autocast_adapter_dtype=...) arrived in PEFT 0.19; this test calls it.
        skip.append("--deselect=tests/test_dtype.py::test_parameter_dtypes")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *skip, *(session.posargs or ["-n", "2"]))


for _name, _pins in PAIRS.items():
    nox.session(name=f"tests-{_name}")(lambda session, pins=_pins: _tests(session, pins))

nox.options.sessions = ["tests-oldest", "tests-newest"]
