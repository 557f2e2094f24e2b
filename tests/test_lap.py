"""LAP (Local Attention Pooling): the layer's arithmetic against a direct computation, identity at
insertion on several backbones, the caller's model untouched, saved LAP models rebuilt without code, the
attention readable through Tap, and clear errors for places LAP cannot go."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import xcnn
from xcnn.hooks import Tap, replace_module, replaced
from xcnn.interpretable import LocalAttentionPooling, insert_lap, lap_layers
from xcnn.interpretable.lap import global_pool_place
from xcnn.models import Classifier, save_model
from xcnn.nets import ShapesNet


def shapesnet() -> Classifier:
    torch.manual_seed(0)
    arch = {"num_classes": 6, "widths": [8, 16, 16, 32], "strides": [1, 1, 2, 2, 1]}
    return Classifier(
        ShapesNet(**arch), name="shapesnet", input_size=(32, 32), spec={"arch": "shapesnet", "kwargs": arch}
    ).eval()


def random_attention(layer: LocalAttentionPooling, seed: int = 1) -> None:
    """Non-constant attention: random weights in the attention net's last convolution."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        last = layer.attention[2]
        last.weight.copy_(torch.randn(last.weight.shape, generator=gen))
        last.bias.copy_(torch.randn(last.bias.shape, generator=gen))


def direct(x: torch.Tensor, a: torch.Tensor, k: int, s: int, heads: int) -> torch.Tensor:
    """sum a*x / sum a over each k x k window (stride s, no padding), by loops."""
    b, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    out = torch.zeros(b, c, oh, ow, dtype=torch.float64)
    x, a = x.double(), a.double()
    for ch in range(c):
        head = ch // (c // heads)
        for i in range(oh):
            for j in range(ow):
                xs = x[:, ch, i * s : i * s + k, j * s : j * s + k]
                ws = a[:, head, i * s : i * s + k, j * s : j * s + k]
                out[:, ch, i, j] = (xs * ws).sum((1, 2)) / ws.sum((1, 2))
    return out


@pytest.mark.parametrize(("k", "s", "heads"), [(2, 2, 1), (3, 2, 2), (3, 1, 4)])
def test_local_pooling_is_the_attention_weighted_window_mean(k, s, heads):
    torch.manual_seed(0)
    layer = LocalAttentionPooling(8, k, s, heads=heads)
    random_attention(layer)
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        a = layer.attention(x)
    assert a.shape == (2, heads, 7, 7) and float(a.std()) > 0.05  # the attention really varies
    torch.testing.assert_close(layer(x).double(), direct(x, a, k, s, heads), rtol=1e-5, atol=1e-6)


def test_global_pooling_is_the_attention_weighted_mean_and_flattens_on_request():
    torch.manual_seed(0)
    layer = LocalAttentionPooling(6, heads=3, global_pool=True)
    random_attention(layer)
    x = torch.randn(2, 6, 5, 4)
    a = layer.attention(x).double()
    expected = torch.stack(
        [(x[:, ch].double() * a[:, ch // 2]).sum((1, 2)) / a[:, ch // 2].sum((1, 2)) for ch in range(6)], 1
    )
    out = layer(x)
    assert out.shape == (2, 6, 1, 1)
    torch.testing.assert_close(out.flatten(1).double(), expected, rtol=1e-5, atol=1e-6)
    flat = LocalAttentionPooling(6, heads=3, global_pool=True, flatten=True)
    flat.load_state_dict(layer.state_dict())
    torch.testing.assert_close(flat(x), out.flatten(1))


def test_a_new_layer_is_exactly_average_pooling():
    x = torch.randn(2, 8, 9, 9)
    assert torch.equal(LocalAttentionPooling(8, 2)(x), nn.AvgPool2d(2)(x))
    assert torch.equal(LocalAttentionPooling(8, 3, 2, padding=1)(x), nn.AvgPool2d(3, 2, 1, count_include_pad=False)(x))
    assert torch.equal(LocalAttentionPooling(8, 2, ceil_mode=True)(x), nn.AvgPool2d(2, ceil_mode=True)(x))
    assert torch.equal(LocalAttentionPooling(8, global_pool=True)(x), nn.AdaptiveAvgPool2d(1)(x))


def _identity_on(clf: Classifier, where=None, atol: float = 1e-5) -> Classifier:
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    types = [type(m) for m in clf.modules()]
    lap = insert_lap(clf, where=where)
    torch.manual_seed(1)
    x = torch.rand(2, 3, *clf.input_size)
    with torch.no_grad():
        torch.testing.assert_close(lap.eval()(x), clf.eval()(x), rtol=0, atol=atol)
    # the caller's model is untouched: same modules, same tensors
    assert [type(m) for m in clf.modules()] == types and not lap_layers(clf.backbone)
    assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())
    return lap


def test_modes_and_weights_label_of_the_copy():
    clf = shapesnet().train()
    clf.backbone.layer1.eval()  # a user's frozen block stays frozen in the copy
    lap = insert_lap(clf)
    assert lap.training and lap.backbone.pool.training and not lap.backbone.layer1.training
    assert insert_lap(clf.eval()).backbone.pool.training is False
    assert lap.weights == "as given + new LAP layers ['pool']"
    clf.weights = None  # random weights stay random weights
    assert insert_lap(clf).weights is None and insert_lap(clf).weights_label == "random weights"


def test_identity_at_insertion_on_shapesnet():
    lap = _identity_on(shapesnet())
    assert lap_layers(lap.backbone) == ["pool"]
    assert lap.spec["edits"] == [{"op": "lap", "where": "pool", "args": lap.backbone.pool.config()}]


def test_identity_at_insertion_on_resnet18(resnet18):
    assert lap_layers(_identity_on(resnet18).backbone) == ["avgpool"]


@pytest.mark.slow
def test_identity_at_insertion_on_lite0(lite0):
    lap = _identity_on(lite0)
    assert lap_layers(lap.backbone) == ["global_pool.pool"]
    # timm's pooling wrapper still looks like a global average pool around the new layer: not a second place
    with pytest.raises(ValueError, match="already has a global LAP layer"):
        insert_lap(lap)
    with pytest.raises(ValueError, match="already holds LAP layers"):
        insert_lap(lap, where="global_pool")
    outer = _identity_on(lite0, where="global_pool")  # the wrapper itself (it flattens): also exact
    assert lap_layers(outer.backbone) == ["global_pool"] and outer.backbone.global_pool.flatten


def test_identity_at_insertion_of_local_layers_in_a_plain_sequential():
    torch.manual_seed(0)
    seq = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AvgPool2d(3, 2, 1, count_include_pad=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    clf = Classifier(seq, input_size=(16, 16), weights=None)
    lap = _identity_on(clf, where=["2", "5", "6"])
    assert lap_layers(lap.backbone) == ["2", "5", "6"]
    assert lap.backbone[2].kernel_size == 2 and (lap.backbone[5].kernel_size, lap.backbone[5].stride) == (3, 2)


def test_saved_lap_model_rebuilds_to_identical_logits_without_code(tmp_path):
    lap = insert_lap(shapesnet())
    random_attention(lap.backbone.pool)  # a LAP model that has moved away from its initial state
    folder = save_model(lap, tmp_path / "lap")
    meta = json.loads((folder / "model.json").read_text())
    assert meta["edits"][0]["op"] == "lap" and meta["edits"][0]["where"] == "pool"
    back = xcnn.load_model(folder)
    assert lap_layers(back.backbone) == ["pool"] and back.spec["edits"] == meta["edits"]
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), lap.eval()(x))
        assert not torch.equal(lap(x), shapesnet()(x))  # the attention changed the logits


def test_unknown_edit_in_a_saved_model_is_a_clear_error(tmp_path):
    folder = save_model(insert_lap(shapesnet()), tmp_path / "lap")
    meta = json.loads((folder / "model.json").read_text())
    meta["edits"][0]["op"] = "prune"
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown architecture edit"):
        xcnn.load_model(folder)
    meta["edits"][0] = {"op": "lap", "where": "pool", "args": {"channels": 32}}
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="cannot be replayed"):
        xcnn.load_model(folder)


def test_attention_of_the_last_forward_is_readable_with_tap():
    lap = insert_lap(shapesnet())
    random_attention(lap.backbone.pool)
    x = torch.rand(2, 3, 32, 32)
    with Tap(lap.backbone, ["pool.attention", "layer4"]) as tap, torch.no_grad():
        lap(x)
    a, feats = tap.get("pool.attention"), tap.get("layer4")
    assert a.shape == (2, 1, *feats.shape[-2:])
    assert torch.equal(a, lap.backbone.pool.attention(feats))


def test_attention_is_trainable_from_the_classification_loss():
    lap = insert_lap(shapesnet()).train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 6, (8,))
    nn.functional.cross_entropy(lap(x), y).backward()
    assert float(lap.backbone.pool.attention[2].weight.grad.abs().sum()) > 0


def test_where_errors_name_the_problem():
    clf = shapesnet()
    with pytest.raises(ValueError, match="not a pooling module"):
        insert_lap(clf, where="layer4")
    with pytest.raises(ValueError, match="is not in the model"):
        insert_lap(clf, where="poool")
    with pytest.raises(ValueError, match="already a LAP layer"):
        insert_lap(insert_lap(clf), where="pool")
    with pytest.raises(ValueError, match="already has a global LAP layer"):
        insert_lap(insert_lap(clf))
    with pytest.raises(ValueError, match="pools to a grid"):
        insert_lap(Classifier(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2)), input_size=(8, 8)), "1")
    with pytest.raises(ValueError, match="distinct"):
        insert_lap(clf, where=["pool", "pool"])
    maxpool = Classifier(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(2)), input_size=(8, 8)
    )
    with pytest.raises(ValueError, match="MaxPool2d; LAP starts as average pooling"):
        insert_lap(maxpool, where="1")
    with pytest.raises(ValueError, match="no global average-pooling module"):
        insert_lap(maxpool)
    counted = Classifier(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(3, 2, 1)), input_size=(8, 8))
    with pytest.raises(ValueError, match="padding counted in the mean"):
        insert_lap(counted, where="1")
    with pytest.raises(ValueError, match="split evenly among 3 heads"):
        LocalAttentionPooling(8, heads=3)
    with pytest.raises(ValueError, match=r"expects \[B, 8, H, W\]"):
        LocalAttentionPooling(8)(torch.rand(1, 4, 4, 4))


def test_replace_module_and_replaced_restore_the_original_even_on_error():
    net = shapesnet().backbone
    original = net.pool
    with (
        pytest.raises(RuntimeError, match="boom"),
        replaced(net, {"pool": nn.Identity(), "layer1.conv1": nn.Identity()}),
    ):
        assert isinstance(net.pool, nn.Identity)
        raise RuntimeError("boom")
    assert net.pool is original and isinstance(net.layer1.conv1, nn.Conv2d)
    seq = nn.Sequential(nn.ReLU(), nn.ReLU())
    old = replace_module(seq, "1", nn.Tanh())
    assert isinstance(old, nn.ReLU) and isinstance(seq[1], nn.Tanh)
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        replace_module(seq, "0", "relu")


# the explainer ---------------------------------------------------------------------------------------


def _normalised(maps: torch.Tensor, size) -> torch.Tensor:
    from xcnn.explain import normalize_maps

    return normalize_maps(maps, size)


def test_one_head_map_is_the_attention_for_every_class_from_one_forward():
    lap = insert_lap(shapesnet())
    random_attention(lap.backbone.pool)
    x = torch.rand(3, 3, 32, 32)
    calls = []
    handle = lap.backbone.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        maps = xcnn.explainer("lap", lap)(x, torch.tensor([0, 1, 2]))
    finally:
        handle.remove()
    assert len(calls) == 1 and all(p.grad is None for p in lap.parameters())
    with torch.no_grad():
        a = lap.backbone.pool.attention(lap.backbone.layer4(lap.backbone.layer3(lap.backbone.layer2(
            lap.backbone.layer1(lap.backbone.stem(x))))))[:, 0]  # fmt: skip
    torch.testing.assert_close(maps, _normalised(a, (32, 32)))
    torch.testing.assert_close(xcnn.explainer("lap", lap)(x, torch.tensor([5, 4, 3])), maps)


def test_several_heads_are_weighted_by_their_contribution_to_the_target_logit():
    lap = insert_lap(shapesnet(), heads=2)
    random_attention(lap.backbone.pool)
    x = torch.rand(2, 3, 32, 32)
    targets = torch.tensor([1, 4])
    with Tap(lap.backbone, ["pool", "pool.attention"]) as tap, torch.no_grad():
        lap.eval()(x)
    pooled, a = tap.get("pool").flatten(1), tap.get("pool.attention")  # [2, 32], [2, 2, h, w]
    w = lap.backbone.fc.weight[targets] * pooled  # each channel's term of the target logit
    contrib = torch.stack([w[:, :16].sum(1), w[:, 16:].sum(1)], 1)
    # the contributions are the logit (minus the bias): the weighting is exact for a linear head
    torch.testing.assert_close(contrib.sum(1), lap(x)[torch.arange(2), targets] - lap.backbone.fc.bias[targets])
    expected = (contrib[:, :, None, None] * a).sum(1)
    maps = xcnn.explainer("lap", lap)(x, targets)
    torch.testing.assert_close(maps, _normalised(expected, (32, 32)))
    assert not torch.allclose(maps, xcnn.explainer("lap", lap)(x, torch.tensor([2, 0])))


def test_all_layers_multiply_their_upsampled_attentions():
    torch.manual_seed(0)
    seq = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip
    lap = insert_lap(Classifier(seq, input_size=(16, 16), weights=None), where=["2", "4"])
    for name in ("2", "4"):
        random_attention(lap.backbone.get_submodule(name), seed=int(name))
    x = torch.rand(2, 3, 16, 16)
    with Tap(lap.backbone, ["2.attention", "4.attention"]) as tap, torch.no_grad():
        lap.eval()(x)
    up = [
        nn.functional.interpolate(tap.get(n), size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
        for n in ("2.attention", "4.attention")
    ]
    both = xcnn.explainer("lap", lap, layers="all")(x)
    torch.testing.assert_close(both, _normalised(up[0] * up[1], (16, 16)))
    last = xcnn.explainer("lap", lap)(x)
    torch.testing.assert_close(last, _normalised(tap.get("4.attention")[:, 0], (16, 16)))


def test_a_fresh_lap_layer_explains_nothing_and_a_model_without_one_is_an_error():
    clf = shapesnet()
    assert float(xcnn.explainer("lap", insert_lap(clf))(torch.rand(2, 3, 32, 32)).abs().max()) == 0.0
    with pytest.raises(ValueError, match=r"has no LAP layer.*insert_lap"):
        xcnn.explainer("lap", clf)
    with pytest.raises(ValueError, match="'last' or 'all'"):
        xcnn.explainer("lap", insert_lap(clf), layers="first")
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    local = insert_lap(Classifier(seq, input_size=(8, 8)), where="1", heads=2)
    with pytest.raises(ValueError, match="local LAP layer with 2 heads"):
        xcnn.explainer("lap", local)


class SqueezeNet(nn.Module):
    """A squeeze-and-excitation block (its own global average pool) and a final pool reused twice."""

    def __init__(self, reuse: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.se_pool, self.se_fc = nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1)
        self.down = nn.AvgPool2d(2)
        self.reuse = reuse
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 3)

    def forward(self, x):
        x = self.conv(x)
        x = x * torch.sigmoid(self.se_fc(self.se_pool(x)))
        x = self.down(self.down(x)) if self.reuse else self.down(x)
        return self.fc(self.pool(x).flatten(1))


class PoolFirst(SqueezeNet):
    """SqueezeNet with its classifier's pool registered before the squeeze-and-excitation pool."""

    def __init__(self):
        nn.Module.__init__(self)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.se_pool, self.se_fc = nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1)
        self.down, self.reuse, self.fc = nn.AvgPool2d(2), False, nn.Linear(8, 3)


def test_the_pool_before_the_classifier_is_the_last_global_pool_to_run_and_shared_places_are_refused():
    clf = Classifier(SqueezeNet(), input_size=(16, 16), weights=None)
    with pytest.warns(UserWarning, match=r"2 global average pools \['se_pool', 'pool'\].*took 'pool'"):
        lap = _identity_on(clf)
    assert lap_layers(lap.backbone) == ["pool"]
    assert lap_layers(_identity_on(clf, where="se_pool").backbone) == ["se_pool"]  # named: any of them
    # the classifier's pool registered first: the order of the forward decides, not the order of the modules
    with pytest.warns(UserWarning, match=r"\['pool', 'se_pool'\].*took 'pool'"):
        assert global_pool_place(PoolFirst(), "test", example=torch.zeros(1, 3, 16, 16)) == "pool"
    with pytest.raises(ValueError, match=r"several global average pools .* forward pass on a \[1, 3, 16\] input"):
        global_pool_place(SqueezeNet(), "test", example=torch.zeros(1, 3, 16))
    twice = Classifier(SqueezeNet(reuse=True), input_size=(16, 16), weights=None)
    with pytest.raises(ValueError, match="called 2 times in one forward pass"):
        insert_lap(twice, where="down")


class Watched(nn.Module):
    """A network with two global pools (a squeeze-and-excitation one first) whose last layer notes whether the
    outputs of the layers before it are still alive when it runs (a forward that keeps them all holds every
    activation of the network at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.se_pool = nn.AdaptiveAvgPool2d(1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)
        self.alive: list[bool] = []

    def forward(self, x):
        import weakref

        stem = self.stem(x)
        early = weakref.ref(stem)  # the stem module's output
        stem = stem * self.se_pool(stem)  # the last reference to it dropped here
        y = self.pool(self.body(stem))
        self.alive.append(early() is not None)
        return self.fc(y.flatten(1))


def test_finding_the_pool_before_the_classifier_keeps_no_layers_output():
    """The forward that orders the global pools records their names only: the stem's output is freed before
    the forward ends (it used to be kept, with every other module's output of a 224x224 forward)."""
    net = Watched()
    with pytest.warns(UserWarning, match="took 'pool'"):
        assert global_pool_place(net, "test", example=torch.zeros(1, 3, 16, 16)) == "pool"
    assert net.alive == [False]


def test_a_bfloat16_model_gets_lap_and_keeps_its_predictions(resnet18):
    """insert_lap on a bfloat16 resnet18: the copy's normalisation stays bfloat16 (a float32 one turned the images
    into float32 before the bfloat16 layers: torch's dtype error), and it predicts what the model predicts."""
    import copy

    base = copy.deepcopy(resnet18).to(torch.bfloat16).eval()
    lap = insert_lap(base).eval()
    assert lap.mean.dtype == lap.std.dtype == torch.bfloat16
    assert named_dtype(lap, "avgpool") == torch.bfloat16
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(lap(x), base(x))


def named_dtype(clf: Classifier, name: str) -> torch.dtype:
    from xcnn.hooks import named_layer

    return next(named_layer(clf.backbone, name).parameters()).dtype


def test_heads_are_not_weighted_through_a_hidden_layer():
    torch.manual_seed(0)
    seq = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.ReLU(),
        nn.Linear(8, 3),
    )  # fmt: skip
    lap = insert_lap(Classifier(seq, input_size=(8, 8), weights=None), heads=2)
    random_attention(lap.backbone[1])
    with pytest.raises(ValueError, match="not Linear\\(8, 8\\) applied to the output of the LAP layer '1'"):
        xcnn.explainer("lap", lap)(torch.rand(2, 3, 8, 8))


def test_inexact_insertion_replaces_max_pooling_and_strided_convolutions(tmp_path):
    import torchvision

    torch.manual_seed(0)
    vgg = xcnn.load_model(torchvision.models.vgg11(num_classes=5), input_size=(64, 64), raw_pixels=True).eval()
    with pytest.raises(ValueError, match="pass exact=False"):
        insert_lap(vgg, where="features.20")
    lap = insert_lap(vgg, where=["features.2", "features.20"], exact=False).eval()
    assert lap_layers(lap.backbone) == ["features.2", "features.20"]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        # max pooling became (attention-weighted) average pooling: the predictions change, the shapes do not
        assert lap(x).shape == vgg(x).shape and not torch.allclose(lap(x), vgg(x))
    clf = shapesnet()
    strided = insert_lap(clf, ["layer2.conv1", "layer2.shortcut.0"], exact=False).eval()
    assert lap_layers(strided.backbone) == ["layer2.conv1.lap", "layer2.shortcut.0.lap"]
    conv = strided.backbone.layer2.conv1.conv
    assert conv.stride == (1, 1) and torch.equal(conv.weight, clf.backbone.layer2.conv1.weight)
    # at stride 1 then 2x2 average pooling: the convolution's outputs averaged, where the original sampled one
    y = torch.rand(1, 8, 32, 32)
    with torch.no_grad():
        averaged = torch.nn.functional.avg_pool2d(torch.nn.functional.conv2d(y, conv.weight, padding=1), 2)
        assert torch.allclose(strided.backbone.layer2.conv1(y), averaged, atol=1e-6)
    random_attention(strided.backbone.layer2.conv1.lap)
    random_attention(strided.backbone.layer2.shortcut[0].lap, seed=2)
    save_model(strided, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "model.json").read_text())["edits"]
    assert [e["op"] for e in spec] == ["lap_conv", "lap_conv"]
    loaded = xcnn.load_model(tmp_path / "m")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), strided(x))
    maps = xcnn.explainer("lap", loaded)(x)
    assert maps.shape == (2, 32, 32) and float(maps.std()) > 0
    with pytest.raises(ValueError, match="cannot be replaced even with exact=False"):
        insert_lap(clf, "layer1.conv1", exact=False)


def test_mobilenet_v3_small_gets_lap_at_its_classifier_pool_and_keeps_its_predictions():
    """Its squeeze-and-excitation blocks hold nine global average pools of their own; the classifier reads
    ``avgpool``, the last one the forward runs."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(num_classes=7)
    clf = xcnn.load_model(net, input_size=(64, 64), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)).eval()
    with pytest.warns(UserWarning, match=r"10 global average pools .*took 'avgpool'"):
        lap = _identity_on(clf)
    assert lap_layers(lap.backbone) == ["avgpool"]
    with pytest.warns(UserWarning, match="took 'avgpool'"):  # without an example: one 224x224 image
        assert global_pool_place(net, "protopnet") == "avgpool"


def test_every_constructor_argument_is_checked(monkeypatch):
    """A saved model's edit replays through the constructor: each argument gets a clear error naming it."""
    import xcnn._validate

    # the attention net's size is refused before any of it is built, whatever the allocator would do with the
    # request (with overcommit it may grant terabytes): on a machine said to have 1 MiB, 64 channels x 1000
    # hidden (4 x (1000 x (9 x 64 + 1) + 1001) = 2 312 004 bytes: 2.2 MiB) is refused and no convolution made
    made = []
    real_conv = nn.Conv2d.__init__

    def conv(self, *args, **kwargs):
        made.append(args)
        real_conv(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(xcnn._validate, "physical_memory", lambda: 2**20)
        patch.setattr(nn.Conv2d, "__init__", conv)
        with pytest.raises(
            ValueError, match=r"attention net would need 0\.00215 GiB, more than this machine's 0\.000977 GiB"
        ):
            LocalAttentionPooling(64, hidden=1000)
        assert not made
        LocalAttentionPooling(64, hidden=100)  # 0.22 MiB: built
        assert made
    cases = [
        ({"stride": 10**18}, ValueError, "stride must be in"),
        ({"stride": 0}, ValueError, "stride must be in"),
        ({"stride": 1.5}, TypeError, "stride must be an integer"),
        ({"padding": -1}, ValueError, "padding must be in"),
        ({"kernel_size": 3, "padding": 2}, ValueError, r"padding must be in \[0, 1\]"),
        ({"kernel_size": 2**40}, ValueError, "kernel_size must be in"),
        ({"hidden": -1}, ValueError, "hidden must be in"),
        ({"hidden": 0}, ValueError, "hidden must be in"),
        ({"eps": 1e300}, ValueError, "eps must be in"),
        ({"eps": 0.0}, ValueError, "eps must be in"),
        ({"eps": float("nan")}, ValueError, "eps must be finite"),
        ({"global_pool": 0}, TypeError, "global_pool must be True or False"),
        ({"global_pool": True, "flatten": "yes"}, TypeError, "flatten must be True or False"),
        ({"ceil_mode": 1}, TypeError, "ceil_mode must be True or False"),
        ({"heads": True}, TypeError, "heads must be an integer"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=f"LocalAttentionPooling: {message}"):
            LocalAttentionPooling(8, **options)
    # the attention net of 512 channels x 10**9 hidden would take terabytes: refused before it is allocated
    with pytest.raises(ValueError, match=r"attention net would need .* GiB, more than this machine"):
        LocalAttentionPooling(512, hidden=10**9)
    with pytest.raises(ValueError, match="a 3x3 map is smaller than one 5x5 window"):
        LocalAttentionPooling(8, 5)(torch.rand(1, 8, 3, 3))


def test_insert_lap_checks_its_options_before_the_traced_forward():
    clf = shapesnet()
    calls = []
    handle = clf.backbone.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match="insert_lap: hidden must be in"):
            insert_lap(clf, hidden=-1)
        with pytest.raises(ValueError, match="insert_lap: heads must be in"):
            insert_lap(clf, heads=0)
        with pytest.raises(TypeError, match="insert_lap: exact must be True or False"):
            insert_lap(clf, exact="no")
        with pytest.raises(TypeError, match="insert_lap: where must be a module name"):
            insert_lap(clf, where=3)
    finally:
        handle.remove()
    assert not calls


def test_a_saved_edit_with_a_wrongly_typed_setting_is_refused_at_load(tmp_path):
    """``"global_pool": 0`` used to load as a local 2x2 pool and fail later in the classifier's forward."""
    folder = save_model(insert_lap(shapesnet()), tmp_path / "lap")
    meta = json.loads((folder / "model.json").read_text())
    for key, value, message in (("global_pool", 0, "global_pool must be True or False"),
                                ("hidden", 1e9, "hidden must be an integer"), ("eps", 1e300, "eps must be in")):  # fmt: skip
        edited = {**meta, "edits": [{**meta["edits"][0], "args": {**meta["edits"][0]["args"], key: value}}]}
        (folder / "model.json").write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=message):
            xcnn.load_model(folder)
