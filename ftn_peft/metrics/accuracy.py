"""Top-1 accuracy as an `evaluate` metric module that loads without network access.

`evaluate.load("accuracy")` fetches its script from the Hub; this file is the same metric, loaded by path:

    import evaluate, ftn_peft.metrics
    accuracy = evaluate.load(ftn_peft.metrics.ACCURACY)
    accuracy.compute(predictions=[0, 1], references=[0, 0])  # {"accuracy": 0.5}
"""

import datasets
import evaluate

_DESCRIPTION = "Top-1 accuracy: the fraction of predictions equal to their reference label."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
Returns:
    accuracy (float): in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        if len(predictions) != len(references):
            raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) differ in length")
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / max(len(references), 1)}
