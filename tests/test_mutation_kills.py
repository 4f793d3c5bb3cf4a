"""Behaviours that mutation testing (docs/mutation.md) found no other test pinned down."""

import pytest
import torch

from ftn_peft import functional as FF


@pytest.mark.parametrize("kind", ["qkv", "out"])
@pytest.mark.parametrize("heads", [None, 0, -2])
def test_head_layouts_refuse_a_missing_or_non_positive_head_count(kind, heads):
    with pytest.raises(ValueError, match=rf"kind='{kind}' needs a positive num_heads, got {heads}"):
        FF.factor_dims(kind, (12, 12), heads)


def test_head_count_must_divide_the_projection_width():
    with pytest.raises(ValueError, match="num_heads=5 does not divide the projection width 12"):
        FF.factor_dims("qkv", (12, 10), 5)
    with pytest.raises(ValueError, match="num_heads=5 does not divide the projection width 12"):
        FF.factor_dims("out", (10, 12), 5)


def test_unknown_factor_kinds_are_refused_by_name():
    factors = [torch.randn(2, 3) for _ in range(3)]
    with pytest.raises(ValueError, match=r"unknown factor kind 'tucker'; expected one of \('conv', 'qkv'"):
        FF.delta_weight("tucker", factors, (3, 3, 3))
    with pytest.raises(ValueError, match="linear_delta does not take kind='conv'"):
        FF.linear_delta("conv", torch.randn(4, 3), factors, 1.0)
