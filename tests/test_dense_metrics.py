"""Each dense metric against a case computed by hand."""

import math

import pytest
import torch

from ftn_peft.metrics.dense import ODSF, DepthRMSE, MeanAngularError, MeanIoU


def test_miou_by_hand():
    # pixels (pred, true): (0,0) (0,1) (1,1) (1,ignored) | second image (2,2) (0,0)
    # class 0: TP 2, FP 1, FN 0 -> 2/3; class 1: TP 1, FN 1 -> 1/2; class 2: TP 1 -> 1; class 3 absent: not averaged
    miou = MeanIoU(num_classes=4)
    miou.update(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 1, 255]]))
    logits = torch.zeros(1, 4, 1, 2)
    logits[0, 2, 0, 0] = logits[0, 0, 0, 1] = 5.0  # argmax -> [2, 0]
    miou.update(logits, torch.tensor([[[2, 0]]]))
    assert miou.compute().item() == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_depth_rmse_by_hand_over_valid_pixels():
    rmse = DepthRMSE()
    rmse.update(torch.tensor([[[[1.0, 2.0, 3.0]]]]), torch.tensor([[[1.0, 4.0, 0.0]]]))  # 0 = missing depth
    rmse.update(torch.tensor([[[[5.0]]]]), torch.tensor([[[2.0]]]))
    assert rmse.compute().item() == pytest.approx(math.sqrt((0 + 4 + 9) / 3))


def test_mean_angular_error_by_hand():
    pred = torch.tensor([[1.0, 0, 0], [2.0, 2.0, 0], [0, 0, 1.0]]).T.reshape(1, 3, 1, 3)  # unnormalized is fine
    true = torch.tensor([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 0]]).T.reshape(1, 3, 1, 3)  # last pixel: no normal
    mae = MeanAngularError()
    mae.update(pred, true)
    assert mae.compute().item() == pytest.approx((90 + 45) / 2, abs=1e-4)


def _edge_case():
    true = torch.zeros(1, 1, 8, 8)
    true[..., 3] = 1  # a vertical edge in column 3
    prob = torch.zeros(1, 1, 8, 8)
    prob[..., 4] = 0.9  # the edge, one pixel off
    prob[..., 7] = 0.6  # a false edge
    return prob, true


def test_odsf_by_hand_with_tolerance():
    prob, true = _edge_case()
    odsf = ODSF(tolerance=1.0, thresholds=[0.5, 0.7])
    odsf.update(prob, true)
    # t=0.5: 16 predicted, 8 within 1 px of the edge -> P 1/2, R 1 -> F 2/3; t=0.7: P 1, R 1 -> F 1
    assert odsf.compute().item() == pytest.approx(1.0)
    only_low = ODSF(tolerance=1.0, thresholds=[0.5])
    only_low.update(prob, true)
    assert only_low.compute().item() == pytest.approx(2 / 3)
    exact = ODSF(tolerance=0.0, thresholds=[0.5, 0.7])
    exact.update(prob, true)
    assert exact.compute().item() == 0.0  # one pixel off never matches without tolerance


def test_odsf_sums_counts_over_the_data_set_before_f():
    # Image 1 as above; image 2: the true edge found at 0.6 only. The one best threshold for both is 0.5:
    # P = (8 + 8) / (16 + 8), R = 1 -> F = 0.8 (the per-image optima would average to 1.0).
    prob, true = _edge_case()
    prob2 = torch.zeros(1, 1, 8, 8)
    prob2[..., 3] = 0.6
    odsf = ODSF(tolerance=1.0, thresholds=[0.5, 0.7])
    odsf.update(prob, true)
    odsf.update(prob2, true)
    p = 16 / 24
    assert odsf.compute().item() == pytest.approx(max(2 * p / (p + 1), 2 * (8 / 8) * (8 / 16) / (1 + 8 / 16)))
    assert odsf.compute().item() == pytest.approx(0.8)


def _odsf_counts_one_threshold_at_a_time(prob, true, tolerance, thresholds):
    """The definition, threshold by threshold: dilate each binary map by the tolerance disk and count."""
    r = int(tolerance)
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    disk = ((yy**2 + xx**2) <= tolerance**2).float()[None, None]

    def near(edges):
        return torch.nn.functional.conv2d(edges.float(), disk, padding=r) > 0

    true = true > 0.5
    counts = []
    for t in thresholds:
        binary = prob >= t
        counts.append((int((binary & near(true)).sum()), int(binary.sum()), int((true & near(binary)).sum())))
    return counts, int(true.sum())


@pytest.mark.parametrize("tolerance", [0.0, 1.0, 2.5])
def test_odsf_counts_equal_the_threshold_by_threshold_definition(tolerance):
    g = torch.Generator().manual_seed(0)
    prob = (torch.rand(3, 1, 9, 11, generator=g) * 10).round() / 10  # ties with the thresholds
    true = (torch.rand(3, 1, 9, 11, generator=g) < 0.2).float()
    thresholds = [0.7, 0.1, 0.5, 0.3, 0.95]
    odsf = ODSF(tolerance=tolerance, thresholds=thresholds)
    odsf.update(prob[:2], true[:2])
    odsf.update(prob[2:], true[2:])
    counts, num_true = _odsf_counts_one_threshold_at_a_time(prob, true, tolerance, sorted(thresholds))
    assert odsf.num_true.item() == num_true
    got = list(zip(odsf.matched_pred.tolist(), odsf.num_pred.tolist(), odsf.matched_true.tolist()))
    assert got == counts
