"""The dense-prediction metrics of the paper's NYUD table, as torchmetrics metrics (they accumulate over a data set
and synchronize across processes under Accelerate / torch.distributed).

- `MeanIoU` (semantic segmentation, higher is better): torchmetrics' `MulticlassJaccardIndex`, accumulated over
  every pixel of the data set, averaged over the classes that occur; `ignore_index` pixels do not count.
- `DepthRMSE` (lower is better): root mean squared error over every valid pixel of the data set (target > 0 and
  finite; NYUD marks missing depth with 0), via torchmetrics' `MeanSquaredError(squared=False)`.
- `MeanAngularError` (surface normals, degrees, lower is better): the angle between the predicted normal
  (normalized) and the true one, averaged over valid pixels (true normal not zero).
- `ODSF` (edges, higher is better): the optimal-dataset-scale F-measure. For each of `thresholds` the binarized
  predictions of the whole data set are matched to the true edges with a tolerance of `tolerance` pixels; precision
  and recall are summed over the data set and the best F over the thresholds is reported. Matching is by distance
  (a predicted edge pixel is correct if a true one lies within the tolerance, and vice versa), not the one-to-one
  assignment of the BSDS benchmark, and predictions are not thinned first; numbers are comparable between
  methods measured here, not with published odsF values.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.regression import MeanSquaredError

__all__ = ["DepthRMSE", "MeanAngularError", "MeanIoU", "ODSF", "dense_metrics"]


class MeanIoU(MulticlassJaccardIndex):
    """mIoU from logits ``(B, C, H, W)`` or labels ``(B, H, W)`` against labels ``(B, H, W)``."""

    def __init__(self, num_classes: int, ignore_index: Optional[int] = 255, **kwargs):
        super().__init__(num_classes=num_classes, average="macro", ignore_index=ignore_index, **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.is_floating_point() and preds.dim() == target.dim() + 1:
            preds = preds.argmax(1)
        super().update(preds, target)


class DepthRMSE(MeanSquaredError):
    """RMSE over valid pixels (target > 0 and finite); predictions ``(B, 1, H, W)`` or ``(B, H, W)``."""

    def __init__(self, **kwargs):
        super().__init__(squared=False, **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds, target = preds.reshape(target.shape[0], -1), target.reshape(target.shape[0], -1)
        valid = torch.isfinite(target) & (target > 0)
        super().update(preds[valid].float(), target[valid].float())


class MeanAngularError(Metric):
    """Mean angle in degrees between predicted and true normals ``(B, 3, H, W)``; true normals of zero length are
    ignored, predictions are normalized first."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.shape != target.shape or preds.dim() != 4 or preds.shape[1] != 3:
            raise ValueError(f"preds and target must both be (B, 3, H, W), got {tuple(preds.shape)} and "
                             f"{tuple(target.shape)}")
        preds, target = preds.double(), target.double()
        valid = target.norm(dim=1) > 1e-6
        cos = (F.normalize(preds, dim=1) * F.normalize(target, dim=1)).sum(1).clamp(-1.0, 1.0)
        self.total += torch.rad2deg(torch.acos(cos[valid])).sum()
        self.count += int(valid.sum())

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp_min(1)).float()


class ODSF(Metric):
    """Optimal-dataset-scale F-measure of edge probabilities ``(B, 1, H, W)`` (or ``(B, H, W)``) against binary edge
    maps, with a matching tolerance of `tolerance` pixels (Euclidean)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, tolerance: float = 1.0, thresholds: int | Sequence[float] = 99, **kwargs):
        super().__init__(**kwargs)
        if isinstance(thresholds, int):
            if thresholds < 1:
                raise ValueError(f"thresholds must be >= 1 (or a list of thresholds), got {thresholds}")
            thresholds = torch.linspace(0, 1, thresholds + 2)[1:-1]
        self.thresholds = torch.as_tensor(thresholds, dtype=torch.float32).sort().values
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
        radius = int(tolerance)
        yy, xx = torch.meshgrid(torch.arange(-radius, radius + 1), torch.arange(-radius, radius + 1), indexing="ij")
        self.disk = ((yy**2 + xx**2) <= tolerance**2).float()[None, None]
        k = len(self.thresholds)
        for name in ("matched_pred", "num_pred", "matched_true"):
            self.add_state(name, default=torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_true", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _near_max(self, preds: torch.Tensor) -> torch.Tensor:
        """The largest prediction within the tolerance of each pixel: a pixel lies within the tolerance of a
        prediction binarized at t exactly when this is >= t, so one pass serves every threshold."""
        radius = self.disk.shape[-1] // 2
        padded = F.pad(preds, (radius,) * 4, value=-math.inf)  # outside the image nothing is predicted
        h, w = preds.shape[-2:]
        out = torch.full_like(preds, -math.inf)
        for dy, dx in self.disk[0, 0].nonzero().tolist():
            out = torch.maximum(out, padded[..., dy:dy + h, dx:dx + w])
        return out

    def _count_at_least(self, values: torch.Tensor) -> torch.Tensor:
        """For each threshold t, how many of `values` are >= t."""
        thresholds = self.thresholds.to(values.device)
        # searchsorted(right=True) is the number of thresholds <= v: v counts for exactly that many thresholds.
        passed = torch.searchsorted(thresholds, values.reshape(-1).contiguous(), right=True)
        per_count = torch.bincount(passed, minlength=len(thresholds) + 1)
        return per_count.flip(0).cumsum(0).flip(0)[1:]

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds = preds.reshape(preds.shape[0], 1, *preds.shape[-2:]).float().nan_to_num(nan=-math.inf)
        target = target.reshape(target.shape[0], 1, *target.shape[-2:]) > 0.5
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} hold different maps")
        near_true = self._near_max(target.float()) > 0
        self.num_true += int(target.sum())
        self.num_pred += self._count_at_least(preds)
        self.matched_pred += self._count_at_least(preds[near_true])
        self.matched_true += self._count_at_least(self._near_max(preds)[target])

    def compute(self) -> torch.Tensor:
        precision = self.matched_pred.double() / self.num_pred.clamp_min(1)
        recall = self.matched_true.double() / self.num_true.clamp_min(1)
        f = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
        return f.max().float()


def dense_metrics(num_classes: int, edge_tolerance: float = 1.0) -> dict[str, Metric]:
    """One fresh metric per task of the NYUD table, keyed by task name."""
    return {
        "semseg": MeanIoU(num_classes),
        "depth": DepthRMSE(),
        "normals": MeanAngularError(),
        "edges": ODSF(tolerance=edge_tolerance),
    }
