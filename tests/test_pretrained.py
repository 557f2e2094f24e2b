"""Where a model's weights come from: torchvision's and timm's pretrained weights through their own caches
(no test touches the network: conftest's ``_offline`` points every cache at an empty folder), random weights
only when asked and then said everywhere, and the warning for modules that see unnormalised pixels."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from urllib.parse import urlparse

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import xcnn
from xcnn.cli import build_parser, main
from xcnn.models import (
    TRAINED_BY_XCNN,
    MissingWeightsError,
    UnnormalisedInputWarning,
    XcnnWarning,
    as_classifier,
    load_model,
    save_model,
)
from xcnn.pipelines import model_summary

TIMM_NAME = "mobilenetv3_small_050"  # the smallest timm ImageNet model: 1.6 M parameters
TIMM_REPO = "timm/mobilenetv3_small_050.lamb_in1k"


@pytest.fixture
def torch_cache(tmp_path, monkeypatch) -> Path:
    """This test's own empty torch.hub cache (via TORCH_HOME): its ``checkpoints`` folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    assert Path(torch.hub.get_dir()) / "checkpoints" == folder
    return folder


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """This test's own empty Hugging Face cache, offline (huggingface_hub reads both variables at import)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def hf_snapshot(cache: Path, repo: str, filename: str, state: dict) -> Path:
    """Write ``state`` where the Hugging Face hub client caches ``filename`` of ``repo`` (its ``main``)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    path = root / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return path


def seeded_state(build, seed: int) -> dict:
    torch.manual_seed(seed)
    return build().state_dict()


def assert_same_state(model: nn.Module, state: dict) -> None:
    got = model.state_dict()
    assert got.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------------------------------
# torchvision: the weights enum, torch.hub's cache


def test_torchvision_weights_are_read_from_torch_hubs_cache(torch_cache):
    entry = torchvision.models.get_model_weights("resnet18").DEFAULT
    assert Path(urlparse(entry.url).path).name == "resnet18-f37072fd.pth"
    state = seeded_state(torchvision.models.resnet18, 7)
    torch.save(state, torch_cache / "resnet18-f37072fd.pth")
    model = load_model("resnet18")
    assert_same_state(model.backbone, state)
    assert model.weights == "torchvision:ResNet18_Weights.IMAGENET1K_V1" and not model.training
    assert model.class_names == entry.meta["categories"] and model.input_size == (224, 224)
    preset = entry.transforms()
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(preset.mean))
    torch.testing.assert_close(model.std.flatten(), torch.tensor(preset.std))
    assert "weights='torchvision:ResNet18_Weights.IMAGENET1K_V1'" in repr(model)


def test_torchvision_downloads_once_then_reads_the_cache(torch_cache, monkeypatch):
    state = seeded_state(torchvision.models.resnet18, 8)
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        torch.save(state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    first, second = load_model("resnet18"), load_model("resnet18")
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    assert calls == [(url, str(torch_cache / "resnet18-f37072fd.pth"), "f37072fd")]  # hash checked on download
    assert_same_state(first.backbone, state)
    assert_same_state(second.backbone, state)


def test_offline_without_the_file_the_error_says_where_it_goes(torch_cache):
    url = torchvision.models.get_model_weights("resnet50").DEFAULT.url
    with pytest.raises(MissingWeightsError) as info:
        load_model("resnet50")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for part in (str(torch_cache / Path(urlparse(url).path).name), url, "TORCH_HOME", "weights=FILE", "--weights"):
        assert part in message
    assert "pretrained=False" in message and "--random-weights" in message


def test_cached_files_are_read_without_unpickling_code(torch_cache):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"conv1.weight": torch.zeros(1), "x": Payload()}, torch_cache / "resnet18-f37072fd.pth")
    with pytest.raises(ValueError, match="refusing to load"):
        load_model("resnet18")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["densenet121", "googlenet", "inception_v3"])
def test_special_torchvision_builders_match_torchvisions_own_loading(name, torch_cache, monkeypatch):
    """Architectures whose builders do more than load the file (DenseNet's renamed keys, GoogLeNet's and
    Inception's input transform and auxiliary heads) give what torchvision's own pretrained builder gives."""
    entry = torchvision.models.get_model_weights(name).DEFAULT
    extra = {"aux_logits": True, "init_weights": False} if name != "densenet121" else {}
    state = seeded_state(lambda: torchvision.models.get_model(name, weights=None, **extra), 11)
    if name == "densenet121":  # torchvision's published DenseNet file: old names (norm.1, conv.2), no BN counters
        state = {
            re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
            for k, v in state.items()
            if not k.endswith("num_batches_tracked")
        }
        assert any(".norm.1." in k for k in state)
    torch.save(state, torch_cache / Path(urlparse(entry.url).path).name)
    ours = load_model(name)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: dict(state))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet: "auxiliary heads ... are NOT pretrained"
        theirs = torchvision.models.get_model(name, weights=entry).eval()
    assert_same_state(ours.backbone, theirs.state_dict())
    x = torch.rand(1, 3, *ours.input_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs((x - ours.mean) / ours.std))
    assert ours.input_size == (entry.transforms().crop_size[0],) * 2


@pytest.mark.slow
def test_a_saved_pretrained_googlenet_loads_back(torch_cache, tmp_path):
    """GoogLeNet's pretrained loading drops its auxiliary heads; the saved description must say so, or the
    rebuilt network has heads the saved weights lack."""
    entry = torchvision.models.get_model_weights("googlenet").DEFAULT
    state = seeded_state(lambda: torchvision.models.get_model("googlenet", weights=None, aux_logits=True), 12)
    torch.save(state, torch_cache / Path(urlparse(entry.url).path).name)
    model = load_model("googlenet")
    again = load_model(save_model(model, tmp_path / "g"))
    assert again.backbone.aux1 is None and again.spec["kwargs"]["aux_logits"] is False
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# timm: its pretrained configs, the Hugging Face cache


def test_timm_weights_are_read_from_the_hugging_face_cache(hf_cache):
    cfg = timm.models.get_pretrained_cfg(TIMM_NAME)
    assert cfg.hf_hub_id == TIMM_REPO
    state = seeded_state(lambda: timm.create_model(TIMM_NAME), 9)
    hf_snapshot(hf_cache, TIMM_REPO, "model.safetensors", state)
    model = load_model(f"timm:{TIMM_NAME}")
    assert_same_state(model.backbone, state)
    assert model.weights == "timm:mobilenetv3_small_050.lamb_in1k"
    assert model.input_size == tuple(cfg.input_size[1:]) and model.class_names == list(xcnn.models.imagenet_classes())
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(cfg.mean))
    assert load_model(TIMM_NAME).weights == model.weights  # a timm-only name needs no prefix


def test_timm_downloads_through_its_hub_client_once(hf_cache, monkeypatch):
    import timm.models._hub

    state = seeded_state(lambda: timm.create_model(TIMM_NAME), 10)
    calls = []

    def download(repo_id, filename, revision=None, cache_dir=None, **kwargs):
        calls.append((repo_id, filename))
        return str(hf_snapshot(hf_cache, repo_id, filename, state))

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", download)
    first, second = load_model(f"timm:{TIMM_NAME}"), load_model(f"timm:{TIMM_NAME}")
    assert calls == [(TIMM_REPO, "model.safetensors")]
    assert_same_state(first.backbone, state)
    assert_same_state(second.backbone, state)


def test_timm_offline_without_the_file_the_error_says_where_it_goes(hf_cache):
    with pytest.raises(MissingWeightsError) as info:
        load_model(f"timm:{TIMM_NAME}")
    message = str(info.value)
    for part in (TIMM_REPO, "model.safetensors", str(hf_cache), "weights=FILE", "pretrained=False"):
        assert part in message


# ----------------------------------------------------------------------------------------------------
# what has no pretrained weights, or does not fit them


@pytest.mark.parametrize("name", ["resnet18", f"timm:{TIMM_NAME}", "efficientnet_lite0"])
def test_a_head_that_does_not_fit_the_pretrained_one_is_an_error(name):
    with pytest.raises(ValueError, match=r"1000-class head, so num_classes=7 does not fit.*pretrained=False"):
        load_model(name, num_classes=7)
    assert load_model(name, pretrained=False, num_classes=7).num_classes == 7


@pytest.mark.parametrize("name", ["shapesnet", "shapes_vit"])
def test_xcnn_architectures_have_no_pretrained_weights(name):
    with pytest.raises(ValueError, match=r"without pretrained weights.*xcnn train benchmark.*pretrained=False"):
        load_model(name)


def test_contradictory_weight_arguments(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    with pytest.raises(ValueError, match="pass one of them"):
        load_model("resnet18", weights=tmp_path / "w.pth", pretrained=False)
    with pytest.raises(ValueError, match="keeps the weights it has"):
        load_model(net, pretrained=False)
    with pytest.raises(ValueError, match="cannot be combined"):
        load_model(net, raw_pixels=True, mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"applies to an nn\.Module"):
        load_model("resnet18", raw_pixels=True)
    model = load_model("shapesnet", pretrained=False, num_classes=6, input_size=(32, 32))
    save_model(model, tmp_path / "m")
    with pytest.raises(ValueError, match="saved model with its own weights"):
        load_model(tmp_path / "m", pretrained=False)


# ----------------------------------------------------------------------------------------------------
# the origin is recorded, saved, and shown


def test_random_weights_are_said_and_saved(tmp_path):
    model = load_model("shapesnet", pretrained=False, num_classes=6, input_size=(32, 32))
    assert model.weights is None and model.weights_label == "random weights" and "random weights" in repr(model)
    assert model_summary(model)["weights"] == "random weights"
    again = load_model(save_model(model, tmp_path / "random"))
    assert again.weights is None
    model.weights = TRAINED_BY_XCNN
    again = load_model(save_model(model, tmp_path / "trained"))
    assert again.weights == TRAINED_BY_XCNN and model_summary(again)["weights"] == TRAINED_BY_XCNN
    # folders written before the origin was recorded load, with the file as the origin
    meta_path = tmp_path / "trained" / "model.json"
    meta = json.loads(meta_path.read_text())
    del meta["weights"]
    meta_path.write_text(json.dumps(meta))
    assert load_model(tmp_path / "trained").weights == f"file:{tmp_path / 'trained' / 'model.safetensors'}"


def test_the_benchmark_trainer_marks_its_models(bench32):
    model, _, folder = bench32
    assert model.weights == TRAINED_BY_XCNN and load_model(folder).weights == TRAINED_BY_XCNN


def test_explain_says_random_weights(tmp_path, capsys):
    out = tmp_path / "o"
    args = ["explain", "sample:chelsea", "--model", "resnet18", "--random-weights", "--out", str(out)]
    assert main([*args, "--method", "gradcam"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.match(r"chelsea: .+ \(\d+\.\d%\) \[random weights\] -> ", line), line
    assert json.loads((out / "predictions.json").read_text())["weights"] == "random weights"


def test_cli_weight_options(tmp_path, torch_cache, capsys):
    assert main(["explain", "sample:chelsea", "--model", "resnet50", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "resnet50-11ad3fa6.pth" in err and "--random-weights" in err and "Traceback" not in err
    both = ["--weights", str(tmp_path / "w.pth"), "--random-weights"]
    assert main(["explain", "sample:chelsea", "--model", "resnet18", *both, "--out", str(tmp_path / "b")]) == 2
    assert "--weights and --random-weights" in capsys.readouterr().err
    for command in (["evaluate"], ["train", "tame", "--model", "resnet18", "--out", "x"]):
        assert build_parser().parse_args([*command, "--random-weights"]).random_weights


# ----------------------------------------------------------------------------------------------------
# modules that would see unnormalised pixels


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_a_bare_module_warns_once_with_the_fix():
    net = small_net()
    with pytest.warns(UnnormalisedInputWarning) as caught:
        load_model(net, input_size=(16, 16))
        load_model(net, input_size=(16, 16))
        as_classifier(net)
        xcnn.explainer("gradcam", net)
    ours = [w for w in caught if issubclass(w.category, UnnormalisedInputWarning)]
    assert len(ours) == 1 and issubclass(UnnormalisedInputWarning, XcnnWarning)
    assert ours[0].filename == __file__  # it points at the user's line
    assert "mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)" in str(ours[0].message)
    assert "raw_pixels=True" in str(ours[0].message)
    with pytest.warns(UnnormalisedInputWarning) as caught:  # another module object warns again
        xcnn.explainer("gradcam", small_net())  # (deep inside xcnn: still the user's line)
    assert [w.filename for w in caught if issubclass(w.category, UnnormalisedInputWarning)] == [__file__]


def test_saying_how_the_module_takes_pixels_silences_the_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = load_model(small_net(), raw_pixels=True, input_size=(16, 16))
        load_model(small_net(), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        load_model(small_net(), mean=(0.5, 0.5, 0.5))
        xcnn.explainer("gradcam", raw)  # a Classifier says it all
    assert raw.weights == "as given"
