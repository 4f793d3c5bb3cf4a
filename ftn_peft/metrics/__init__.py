"""Local `evaluate` metric modules (no network needed): pass their path to `evaluate.load`."""

from pathlib import Path

ACCURACY = str(Path(__file__).with_name("accuracy.py"))


def load_accuracy():
    """`evaluate.load` of the local accuracy module."""
    import evaluate

    return evaluate.load(ACCURACY)
