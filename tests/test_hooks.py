"""hooks.py: taps record the right tensors, gradients stop at the layer, everything is removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xcnn.hooks import Tap, frozen, named_layer, trace_outputs

from .test_explain_contract import hook_count


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 28 * 28, 3)
    )


def test_tap_records_the_layer_output_before_an_inplace_relu():
    model = net()
    x = torch.randn(2, 3, 32, 32)
    with Tap(model, ["0"]) as tap:
        model(x)
    torch.testing.assert_close(tap.get("0"), model[0](x))  # pre-ReLU values, untouched by the in-place op
    assert (tap.get("0") < 0).any()
    assert hook_count(model) == 0


def test_differentiable_tap_only_builds_the_graph_above_the_layer():
    model = net()
    x = torch.randn(2, 3, 32, 32)
    with frozen(model), Tap(model, ["2"], differentiable=True) as tap:
        out = model(x)
    a = tap.get("2")
    assert a.is_leaf and a.requires_grad  # nothing below the layer is in the graph
    (g,) = torch.autograd.grad(out[:, 1].sum(), a)
    expected = model[4].weight[1].view(1, 4, 28, 28).expand(2, -1, -1, -1)
    torch.testing.assert_close(g, expected)


def test_hooks_removed_when_the_forward_raises():
    model = net()
    with pytest.raises(RuntimeError):
        with Tap(model, ["0", "2"]):
            model(torch.randn(1, 3, 8, 8))  # too small for the linear layer
    assert hook_count(model) == 0


def test_tap_reports_layers_that_did_not_run():
    model = net()
    with Tap(model, ["4"]) as tap:
        pass
    with pytest.raises(RuntimeError, match="'4' was not executed"):
        tap.get("4")


def test_named_layer_errors():
    model = net()
    assert named_layer(model, "2") is model[2]
    with pytest.raises(ValueError, match="'9' is not in the model"):
        named_layer(model, "9")
    with pytest.raises(ValueError):
        named_layer(model, "")  # the root is not a layer
    with pytest.raises(TypeError, match="strings"):
        named_layer(model, 2)


def test_frozen_restores_modes_and_flags_even_on_error():
    model = net()
    model.train()
    model[0].weight.requires_grad_(False)
    with pytest.raises(KeyError):
        with frozen(model):
            assert not any(m.training for m in model.modules())
            assert not any(p.requires_grad for p in model.parameters())
            raise KeyError("x")
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [False, True, True, True, True, True]


def test_trace_outputs_in_execution_order_and_cleans_up():
    model = net()
    names = [name for name, _, _ in trace_outputs(model, torch.randn(1, 3, 32, 32))]
    assert names == ["0", "1", "2", "3", "4"]
    assert hook_count(model) == 0


def test_swapped_copy_shares_everything_but_the_swapped_module():
    from xcnn.hooks import swapped_copy

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)))
    net(torch.rand(1, 3, 5, 5))
    view = swapped_copy(net, "1.2", nn.Identity())
    assert isinstance(net[1][2], nn.Linear) and isinstance(view[1][2], nn.Identity)  # the original unchanged
    assert view[0] is net[0] and view[1][0] is net[1][0]  # shared, not copied
    assert view(torch.rand(1, 3, 5, 5)).shape == (1, 36)
    with pytest.raises(ValueError, match="not in the model"):
        swapped_copy(net, "1.7", nn.Identity())
