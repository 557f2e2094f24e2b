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


# ---- ground-truth files beside images ---------------------------------------------------------------


def image_folder(root, boxes_text: str | None = None, size=(50, 40)):
    """``root/a/0.png`` (W x H = ``size``) and ``root/a/1.png``; ``0.box.json`` holds ``boxes_text``."""
    (root / "a").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8)).save(root / "a" / f"{i}.png")
    if boxes_text is not None:
        (root / "a" / "0.box.json").write_text(boxes_text)
    return root


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"boxes": [[0, 0, 1e400, 5]]}', r"box 0 x1 must be finite, got inf"),
        ('{"boxes": [[0, 0, 1' + "0" * 400 + ", 5]]}", r"box 0 x1 must be finite, got 1000"),  # an int, not an overflow
        ('{"boxes": [[0, NaN, 3, 5]]}', r"box 0 y0 must be finite, got nan"),
        ('{"boxes": [[0, 0, 3]]}', r"box 0 must be \[x0, y0, x1, y1\], got \[0, 0, 3\]"),
        ('{"boxes": [[0, 0, 3, 5], "x"]}', r"box 1 must be \[x0, y0, x1, y1\], got 'x'"),
        ('{"boxes": [[0, "0", 3, 5]]}', r"box 0 y0 must be a number, got str '0'"),
        ('{"boxes": [[0, true, 3, 5]]}', r"box 0 y0 must be a number, got bool"),
        ('{"boxes": [[5, 0, 3, 5]]}', r"box 0 \[5, 0, 3, 5\] is reversed \(x0 <= x1, y0 <= y1\)"),
        ('{"boxes": [[0, 9, 3, 5]]}', r"box 0 \[0, 9, 3, 5\] is reversed"),
        (
            '{"boxes": [[50, 0, 60, 5]]}',
            r"box 0 \[50, 0, 60, 5\] lies wholly outside the 50x40 image \(it must overlap",
        ),
        ('{"boxes": [[-9, 0, -1, 5]]}', r"lies wholly outside the 50x40 image"),
        ('{"boxes": [[0, 40, 3, 41]]}', r"lies wholly outside .* rows 0\.\.39"),
        ('{"boxes": [[0, -5, 3, -0.5]]}', r"lies wholly outside"),
        ('{"box": [[0, 0, 3, 5]]}', r'expected \{"boxes": \[\[x0, y0, x1, y1\], \.\.\.\]\}, got \{\'box\''),
        ('{"boxes": 5}', r"expected \{\"boxes\""),
        ("[" * 100_000 + "]" * 100_000, r"nested too deeply"),
        ("{not json", r"cannot read box file"),
    ],
)
def test_box_files_are_checked_when_the_folder_is_opened(text, message, tmp_path):
    from xcnn.data.images import ImageFolder

    root = image_folder(tmp_path, text)
    with pytest.raises(ValueError, match=message) as info:
        ImageFolder(root, 20)
    assert "0.box.json" in str(info.value)


def test_boxes_may_reach_the_far_edges(tmp_path):
    """Inclusive coordinates end at W - 1; files that give the exclusive edge (W) are accepted: both cover
    the whole image."""
    from xcnn.data.images import ImageFolder

    for text in ('{"boxes": [[0, 0, 49, 39]]}', '{"boxes": [[0, 0, 50, 40]]}', '{"boxes": []}'):
        root = image_folder(tmp_path / str(len(list(tmp_path.iterdir()))), text)
        mask = ImageFolder(root, 20)[0]["mask"]
        assert mask.all() if "49" in text or "50" in text else not mask.any()


def test_boxes_reaching_past_the_edges_are_clipped(tmp_path):
    """VOC-style boxes often reach a little past the image (x0 = -1, x1 = W + 0.5): they are clipped to
    [0, W] x [0, H], and cover what they cover inside it."""
    from xcnn.data.images import ImageFolder, read_boxes

    text = '{"boxes": [[-1, -2, 100.5, 3], [2, 5, 4, 12]]}'
    root = image_folder(tmp_path, text, size=(100, 10))
    assert read_boxes(root / "a" / "0.box.json", (100, 10)) == [(0.0, 0.0, 100.0, 3.0), (2.0, 5.0, 4.0, 10.0)]
    mask = ImageFolder(root, (10, 100))[0]["mask"]
    expected = torch.zeros(10, 100, dtype=torch.bool)
    expected[0:4, :] = True  # rows 0..3, every column
    expected[5:10, 2:5] = True  # rows 5..9 (12 is past the bottom), columns 2..4
    assert torch.equal(mask, expected)


def test_box_coordinates_are_inclusive(tmp_path):
    """[2, 3, 4, 7] covers columns 2..4 and rows 3..7 of a 10x10 image: 3 x 5 pixels at the image's own size."""
    from xcnn.data.images import ImageFolder

    mask = ImageFolder(image_folder(tmp_path, '{"boxes": [[2, 3, 4, 7]]}', size=(10, 10)), 10)[0]["mask"]
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[3:8, 2:5] = True
    assert torch.equal(mask, expected)


def test_box_ranges_follow_the_exif_orientation(tmp_path):
    """A 30x10 photo stored with EXIF orientation 6 is shown 10 wide and 30 tall: its boxes are in those pixels."""
    from xcnn.data.images import ImageFolder

    (tmp_path / "a").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((10, 30, 3), dtype=np.uint8)).save(tmp_path / "a" / "0.jpg", exif=exif)
    (tmp_path / "a" / "0.box.json").write_text('{"boxes": [[0, 20, 9, 29]]}')  # the bottom third, as shown
    mask = ImageFolder(tmp_path, (30, 10))[0]["mask"]
    assert mask[20:].all() and not mask[:20].any()
    (tmp_path / "a" / "0.box.json").write_text('{"boxes": [[20, 0, 29, 9]]}')  # in the stored pixels: refused
    with pytest.raises(ValueError, match="lies wholly outside the 10x30 image"):
        ImageFolder(tmp_path, (30, 10))


def test_an_unreadable_mask_file_is_named_when_the_folder_is_opened(tmp_path):
    from xcnn.data.images import ImageFolder

    root = image_folder(tmp_path)
    (root / "a" / "1.mask.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read mask file .*1.mask.png"):
        ImageFolder(root, 20)


@pytest.mark.parametrize(
    "size,error,message",
    [
        (0, ValueError, r"size\[0\] must be in \[1, inf\), got 0"),
        ((16, -2), ValueError, r"size\[1\] must be in \[1, inf\), got -2"),
        ((16,), ValueError, r"size must be an integer or \(height, width\), got \(16,\)"),
        ("16", TypeError, r"size must be an integer or \(height, width\), got str '16'"),
        (2.5, TypeError, r"size\[0\] must be an integer, got float 2\.5"),
        ((16, 15.5), TypeError, r"size\[1\] must be an integer, got float 15\.5"),
        (True, TypeError, r"size must be an integer or \(height, width\), got bool True"),
        (10**6, ValueError, r"an image resized to 1000000x1000000 would need"),
    ],
)
def test_image_sizes_are_checked_before_reading(size, error, message, tmp_path):
    from xcnn.data.images import ImageFolder

    with pytest.raises(error, match=message):
        load_image("sample:chelsea", size)
    with pytest.raises(error, match=message):
        ImageFolder(image_folder(tmp_path), size)


@pytest.mark.parametrize("size", [(64.0, 48.0), np.array([64, 48]), (np.int64(64), torch.tensor(48)), [64, 48.0]])
def test_image_sizes_may_be_any_pair_of_whole_numbers(size, tmp_path):
    from xcnn.data.images import ImageFolder

    assert load_image("sample:chelsea", size).shape == (3, 64, 48)
    assert load_image("sample:chelsea", 64.0).shape == (3, 64, 64)
    folder = ImageFolder(image_folder(tmp_path), size)
    assert folder.size == (64, 48) and all(type(v) is int for v in folder.size)
    assert folder[0]["image"].shape == (3, 64, 48)


def test_an_image_is_opened_once_per_sample_and_ground_truth_files_are_looked_up_once(tmp_path, monkeypatch):
    """The folder reads each image's header once when it is opened (its EXIF orientation with it, for the
    boxes), and each sample decodes its image once: the size that places the boxes is the decoded image's.
    Ground-truth files are looked up once, when the folder is opened."""
    from pathlib import Path

    import xcnn.data.images as images

    root = image_folder(tmp_path, '{"boxes": [[0, 0, 24, 19]]}')
    mask = np.zeros((40, 50), dtype=np.uint8)
    mask[:20] = 255
    Image.fromarray(mask).save(root / "a" / "1.mask.png")
    opened, looked_up = [], []
    real_open, real_is_file = Image.open, Path.is_file
    monkeypatch.setattr(
        images.Image, "open", lambda fp, *a, **k: (opened.append(Path(fp).name), real_open(fp, *a, **k))[1]
    )
    monkeypatch.setattr(Path, "is_file", lambda self: (looked_up.append(self.name), real_is_file(self))[1])
    folder = images.ImageFolder(root, 20)
    assert sorted(opened) == ["0.png", "1.mask.png", "1.png"]
    ground_truth = [n for n in looked_up if n.endswith((".mask.png", ".box.json"))]
    assert sorted(ground_truth) == sorted(set(ground_truth))  # none twice
    opened.clear(), looked_up.clear()
    first, second = folder[0], folder[1]
    assert opened == ["0.png", "1.png", "1.mask.png"]
    assert not [n for n in looked_up if n.endswith((".mask.png", ".box.json"))]
    assert first["mask"][:10, :10].all() and first["mask"].sum() == 100  # the box: the top-left quarter
    assert second["mask"][:10].all() and second["mask"].sum() == 200  # the mask: the top half


def test_a_mask_damaged_past_its_header_is_named_when_its_sample_is_drawn(tmp_path):
    """The folder reads a mask's header (not its pixels) when it is opened; damaged pixel data is a ValueError
    naming the file once the sample is drawn, and the other samples are unaffected."""
    from xcnn.data.images import ImageFolder

    root = image_folder(tmp_path)
    noise = (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(root / "a" / "1.mask.png")
    data = (root / "a" / "1.mask.png").read_bytes()
    (root / "a" / "1.mask.png").write_bytes(data[: len(data) // 2])
    folder = ImageFolder(root, 20)
    assert not folder[0]["mask"].any()
    with pytest.raises(ValueError, match=r"cannot read mask file .*1\.mask\.png"):
        folder[1]


def test_cli_reports_a_bad_box_file_in_one_line(tmp_path, capsys):
    from xcnn.cli import main
    from xcnn.models import Classifier, save_model
    from xcnn.nets import ShapesNet

    arch = {"num_classes": 6, "widths": [4, 4, 8, 8]}
    model = Classifier(ShapesNet(**arch), input_size=(32, 32), spec={"arch": "shapesnet", "kwargs": arch})
    save_model(model, tmp_path / "m")
    root = image_folder(tmp_path / "data", '{"boxes": [[0, 0, 1e400, 5]]}')
    for argv in (["inspect", "--n", "2"], ["evaluate", "--n", "2", "--metrics", "pointing", "--methods", "gradcam"]):
        code = main([*argv, "--model", str(tmp_path / "m"), "--data", str(root), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()  # refused before any output
        assert (
            f"xcnn {argv[0]}: error: cannot read boxes from {root / 'a' / '0.box.json'}: box 0 x1 must be finite" in err
        )
