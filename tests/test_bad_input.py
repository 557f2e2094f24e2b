"""Every bad input gets a clear error that names the problem, and no hook stays attached."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import xcnn
from xcnn.data.images import load_image
from xcnn.models import UnnormalisedInputWarning, load_state_dict_file

from .conftest import prepared_model, required_options
from .test_explain_contract import FAST, hook_count

NAMES = xcnn.list_explainers()


def make(name, model, **extra):
    model = prepared_model(name, model)
    return xcnn.explainer(name, model, **{**required_options(name, model), **FAST.get(name, {}), **extra})


BAD_IMAGES = [
    (torch.rand(3, 32, 32), ValueError, r"\[B,3,H,W\].*images\[None\]"),
    (torch.rand(2, 1, 32, 32), ValueError, "3 \\(RGB\\) channels"),
    (torch.rand(2, 4, 32, 32), ValueError, "3 \\(RGB\\) channels"),
    ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), TypeError, "float.*divide uint8 images by 255"),
    (torch.randint(0, 2, (2, 3, 32, 32)), TypeError, "float"),
    (torch.rand(2, 3, 32, 32) * 255, ValueError, r"\[0,1\]"),
    (torch.rand(2, 3, 32, 32) - 0.5, ValueError, r"\[0,1\]"),
    (torch.full((2, 3, 32, 32), float("nan")), ValueError, "NaN or Inf"),
    (torch.full((2, 3, 32, 32), float("inf")), ValueError, "NaN or Inf"),
    (torch.rand(0, 3, 32, 32), ValueError, "empty batch"),
    (torch.rand(1, 3, 0, 32), ValueError, "no pixels"),
    (np.random.rand(2, 3, 32, 32), TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("images,error,message", BAD_IMAGES, ids=range(len(BAD_IMAGES)))
def test_bad_images(name, images, error, message, tiny):
    with pytest.raises(error, match=message):
        make(name, tiny)(images)
    assert hook_count(tiny) == 0


@pytest.mark.parametrize("name", NAMES)
def test_targets_length_mismatch(name, tiny, images32):
    with pytest.raises(ValueError, match="one class index per image \\(3\\)"):
        make(name, tiny)(images32, torch.tensor([1, 2]))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [10, -1])
def test_target_class_out_of_range(name, bad, tiny, images32):
    with pytest.raises(ValueError, match=r"out of range: (model has|the probes have) 10 classes|must be >= 0"):
        make(name, tiny)(images32, torch.tensor([0, bad, 1]))
    assert hook_count(tiny) == 0
    assert all(p.requires_grad for p in tiny.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_images_and_model_on_different_devices(tiny, images32):
    with pytest.raises(ValueError, match="images are on cuda:0 but the model is on cpu"):
        make("gradcam", tiny)(images32.cuda())


def test_float_or_bool_targets_rejected(tiny, images32):
    with pytest.raises(TypeError, match="integer class indices"):
        make("gradcam", tiny)(images32, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="not booleans"):
        make("gradcam", tiny)(images32, torch.tensor([True, False, True]))


def test_one_target_applies_to_every_image(tiny, images32):
    expected = make("gradcam", tiny)(images32, torch.tensor([4, 4, 4]))
    for one in (4, torch.tensor(4), np.int64(4)):
        torch.testing.assert_close(make("gradcam", tiny)(images32, one), expected)


def test_unknown_method_lists_the_available_ones(tiny):
    with pytest.raises(ValueError, match=r"unknown explainer 'gradcamm'.*gradcam"):
        xcnn.explainer("gradcamm", tiny)


def test_unknown_option_names_the_options(tiny):
    with pytest.raises(TypeError, match=r"no option\(s\) \['mask'\].*masks"):
        xcnn.explainer("rise", tiny, mask=10)


def test_layer_for_a_method_without_layers(tiny):
    with pytest.raises(ValueError, match="does not use a layer"):
        xcnn.explainer("saliency", tiny, layer="features")


def test_unknown_layer_suggests_close_names(tiny):
    with pytest.raises(ValueError, match=r"'feature.4' is not in the model.*features.4"):
        xcnn.explainer("gradcam", tiny, layer="feature.4")
    with pytest.raises(ValueError, match=r"'' is not in the model|empty"):
        xcnn.explainer("gradcam", tiny, layer=[])


def test_layer_whose_output_is_not_a_tensor(images32):
    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x), x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = TupleOut()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.block(x)[0].mean((2, 3)))

    model = xcnn.load_model(Net(), raw_pixels=True, input_size=(32, 32))
    with pytest.raises(TypeError, match="'block' returns tuple, not a tensor"):
        xcnn.explainer("gradcam", model, layer="block")(images32)
    assert hook_count(model) == 0


@pytest.mark.parametrize("option,value,message", [
    ("masks", 0, "masks must be a positive integer"),
    ("grid", -2, "grid must be a positive integer"),
    ("p", 1.5, "p \\(probability"),
    ("batch_size", 0, "batch_size must be a positive integer"),
])  # fmt: skip
def test_invalid_option_values(option, value, message, tiny):
    with pytest.raises(ValueError, match=message):
        xcnn.explainer("rise", tiny, **{option: value})


def test_occlusion_patch_larger_than_image(tiny, images32):
    with pytest.raises(ValueError, match="patch 40 is larger than the image \\(32x32\\)"):
        xcnn.explainer("occlusion", tiny, patch=40)(images32)


def test_occlusion_stride_larger_than_patch(tiny, images32):
    with pytest.raises(ValueError, match="stride 9 is larger than the patch 4"):
        xcnn.explainer("occlusion", tiny, patch=4, stride=9)(images32)


def test_non_finite_option(tiny):
    with pytest.raises(ValueError, match="noise must be a positive number"):
        xcnn.explainer("smoothgrad", tiny, noise=float("inf"))


def test_integrated_gradients_needs_two_steps(tiny):
    with pytest.raises(ValueError, match="steps must be at least 2"):
        xcnn.explainer("integrated_gradients", tiny, steps=1)


def test_scorecam_weighting_name(tiny):
    with pytest.raises(ValueError, match="weighting must be"):
        xcnn.explainer("scorecam", tiny, weighting="softmax")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'resnet5'"):
        xcnn.load_model("resnet5")


def test_detection_models_are_not_classifiers():
    with pytest.raises(ValueError, match="unknown model 'fasterrcnn_resnet50_fpn'"):
        xcnn.load_model("fasterrcnn_resnet50_fpn")


def test_options_for_an_existing_classifier_are_refused(tiny):
    with pytest.raises(ValueError, match="\\['mean'\\] cannot be applied to an existing Classifier"):
        xcnn.load_model(tiny, mean=(0.5, 0.5, 0.5))


def test_a_folder_named_like_a_model_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet18").mkdir()
    assert type(xcnn.load_model("resnet18", pretrained=False).backbone).__name__ == "ResNet"
    with pytest.raises(FileNotFoundError, match="no saved xcnn model"):
        xcnn.load_model(str(tmp_path / "missing.safetensors"))


def test_default_layer_hint_when_the_input_size_is_wrong():
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))  # works at 32x32 only
    with (
        pytest.raises(ValueError, match=r"could not run Sequential on a 224x224 image.*input_size="),
        pytest.warns(UnnormalisedInputWarning),  # a bare module: it would see unnormalised pixels
    ):
        xcnn.explainer("gradcam", small)
    assert xcnn.explainer("gradcam", xcnn.load_model(small, raw_pixels=True, input_size=(32, 32))).layers == ["0"]


def test_model_with_no_spatial_layer(images32):
    mlp = xcnn.load_model(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4)), raw_pixels=True, input_size=(32, 32))
    with pytest.raises(ValueError, match=r"no spatial layer.*saliency"):
        xcnn.explainer("gradcam", mlp)
    assert make("saliency", mlp)(images32).shape == (3, 32, 32)  # input-space methods still work
    assert hook_count(mlp) == 0


def test_not_a_module():
    with pytest.raises(TypeError, match=r"nn.Module"):
        xcnn.explainer("gradcam", lambda x: x)


# ---- files ------------------------------------------------------------------------------------------


def test_missing_image_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*nope.png"):
        load_image(tmp_path / "nope.png")


def test_corrupt_image_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image file .*broken.jpg"):
        load_image(bad)


def test_unknown_sample():
    with pytest.raises(ValueError, match=r"unknown sample photo 'dog'.*sample:chelsea"):
        load_image("sample:dog")


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK"])
def test_grayscale_rgba_and_other_modes_are_converted(mode, tmp_path):
    """Each mode's pixels arrive as the RGB values that mode stands for (within one 8-bit level)."""
    rgb_array = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    rgb = Image.fromarray(rgb_array)
    grey16 = (np.arange(600).reshape(20, 30) * 100).astype(np.uint16)
    img = rgb.convert(mode) if mode != "I;16" else Image.fromarray(grey16)
    path = tmp_path / f"img.{'tiff' if mode in ('I;16', 'CMYK') else 'png'}"
    img.save(path)
    luma = rgb_array.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as PIL's "L"
    expected = {
        "L": np.repeat(luma[..., None], 3, axis=2),
        "LA": np.repeat(luma[..., None], 3, axis=2),  # opaque alpha: the grey itself
        "RGBA": rgb_array,
        "P": np.asarray(img.convert("RGB")),  # the palette's colours
        "I;16": np.repeat((grey16 / 65535 * 255)[..., None], 3, axis=2),  # 65535 is full scale
        "CMYK": rgb_array,  # PIL's CMYK of an RGB image converts back exactly
    }[mode]
    x = load_image(path)
    assert x.shape == (3, 20, 30) and x.dtype == torch.float32
    got = x.permute(1, 2, 0).numpy() * 255
    assert np.abs(got - expected).max() <= 1.0 + 1e-4
    assert load_image(path, size=16).shape == (3, 16, 16)


def test_sixteen_bit_images_keep_their_scale(tmp_path):
    Image.fromarray(np.full((4, 4), 65535 // 2, dtype=np.uint16)).save(tmp_path / "mid.png")
    assert torch.allclose(load_image(tmp_path / "mid.png"), torch.full((3, 4, 4), 0.5), atol=1 / 255)


@pytest.mark.parametrize("orientation, corner", [(6, (0, -1)), (8, (-1, 0)), (3, (-1, -1))])
def test_exif_orientation_is_applied(orientation, corner, tmp_path):
    """A 30x10 photo with a green top-left block, stored with an EXIF orientation: 6 (shown rotated 90
    degrees clockwise) puts the block top-right, 8 (counter-clockwise) bottom-left, 3 (180) bottom-right."""
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[...] = (255, 0, 0)
    pixels[:4, :4] = (0, 255, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    x = load_image(tmp_path / "rot.jpg")
    assert x.shape == ((3, 30, 10) if orientation in (6, 8) else (3, 10, 30))
    green = x[1] > 0.7
    assert int(green.sum()) == pytest.approx(16, abs=4)
    rows, cols = green.nonzero(as_tuple=True)
    h, w = x.shape[1:]
    assert (rows.float().mean() < h / 2) == (corner[0] == 0) and (cols.float().mean() < w / 2) == (corner[1] == 0)


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, but fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert torch.allclose(load_image(tmp_path / "t.png"), torch.ones(3, 8, 8))


class CodeCarrier:
    """Unpickling this would run code (create a marker file); a safe loader must refuse it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_carrying_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": CodeCarrier(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"refusing to load .*could run code.*posix.mkdir"):
        load_state_dict_file(tmp_path / "evil.pth")
    with open(tmp_path / "raw.pkl", "wb") as fh:  # a bare pickle, not even a torch file
        pickle.dump({"weight": CodeCarrier(marker)}, fh)
    with pytest.raises(ValueError, match=r"refusing to load|not a PyTorch checkpoint"):
        load_state_dict_file(tmp_path / "raw.pkl")
    with pytest.raises(ValueError, match="refusing to load"):
        xcnn.load_model("resnet18", weights=tmp_path / "evil.pth")
    assert not marker.exists()


def test_unreadable_checkpoints(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"cannot read weights file .*junk.pth"):
        load_state_dict_file(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"cannot read weights file .*junk.safetensors"):
        load_state_dict_file(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_state_dict_file(tmp_path / "absent.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_state_dict_file(tmp_path / "list.pth")


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="do not fit ResNet"):
        xcnn.load_model("resnet18", weights=tmp_path / "w.pth")
