"""Saved models: one atomic set (the description travels in the weights file's header), every field of the
description checked before anything is built, shapes checked against the weights on the meta device."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import xcnn._io
from xcnn.hooks import replace_module
from xcnn.models import ARCHITECTURE_EDITS, Classifier, XcnnWarning, load_model, save_model
from xcnn.nets import ShapesNet

ARCH = {"num_classes": 6, "widths": [4, 4, 8, 8], "strides": [2, 1, 2, 2, 1]}


def tiny(seed: int = 0, names: str = "abcdef", mean: float = 0.0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(
        ShapesNet(**ARCH), (mean,) * 3, name="shapesnet", input_size=(32, 32), class_names=list(names),
        spec={"arch": "shapesnet", "kwargs": ARCH},
    )  # fmt: skip


def logits(model: Classifier) -> torch.Tensor:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.eval()(x)


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def header(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# ---- one atomic set ----------------------------------------------------------------------------------


def test_the_weights_file_alone_holds_the_whole_model(tmp_path):
    model = tiny(1)
    folder = save_model(model, tmp_path / "m", note="hello")
    described = json.loads(header(folder / "model.safetensors")["xcnn"])
    assert described == json.loads((folder / "model.json").read_text())  # model.json is the same text
    assert described["class_names"] == list("abcdef") and described["note"] == "hello"
    (folder / "model.json").unlink()
    for path in (folder, folder / "model.safetensors"):
        back = load_model(path)
        assert back.class_names == list("abcdef") and back.input_size == (32, 32)
        torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=0)


def test_new_weights_beside_the_old_model_json_load_the_new_model(tmp_path):
    """A kill between the two renames leaves the new weights file beside the previous save's model.json:
    the folder loads the new model, whole (names, normalisation and weights of the same save)."""
    old, new = tiny(1, names="abcdef"), tiny(2, names="uvwxyz", mean=0.25)
    folder = save_model(old, tmp_path / "m")
    old_json = (folder / "model.json").read_text()
    save_model(new, folder)
    (folder / "model.json").write_text(old_json)
    with pytest.warns(XcnnWarning, match="belongs to another save"):
        back = load_model(folder)
    assert back.class_names == list("uvwxyz")
    torch.testing.assert_close(back.mean.flatten(), torch.full((3,), 0.25))
    torch.testing.assert_close(logits(back), logits(new), rtol=0, atol=0)


def test_a_description_json_cannot_hold_replaces_nothing(tmp_path):
    old = tiny(1)
    folder = save_model(old, tmp_path / "m")
    before = files(folder)
    with pytest.raises(TypeError, match=r"save_model: .*plain JSON data.*object is not JSON serializable"):
        save_model(tiny(2, names="uvwxyz"), folder, note=object())
    assert files(folder) == before
    back = load_model(folder)
    assert back.class_names == list("abcdef")
    torch.testing.assert_close(logits(back), logits(old), rtol=0, atol=0)


def test_saved_files_are_flushed_to_the_disk(tmp_path, monkeypatch):
    flushed = []
    real = xcnn._io._fsync
    monkeypatch.setattr(xcnn._io, "_fsync", lambda path: (flushed.append(str(path)), real(path))[-1])
    folder = save_model(tiny(), tmp_path / "m")
    names = [p.rsplit("/", 1)[-1] for p in flushed]
    assert any(n.startswith(".model.safetensors.") for n in names)  # the file, before its rename
    assert any(n.startswith(".model.json.") for n in names)
    assert flushed.count(str(folder)) == 2  # the folder, after each rename


def test_hand_edits_to_model_json_of_the_same_save_count(tmp_path):
    folder = save_model(tiny(), tmp_path / "m")
    meta = json.loads((folder / "model.json").read_text())
    meta["class_names"] = list("ABCDEF")
    (folder / "model.json").write_text(json.dumps(meta))
    assert load_model(folder).class_names == list("ABCDEF")


def test_an_unreadable_model_json_falls_back_to_the_header(tmp_path):
    folder = save_model(tiny(1), tmp_path / "m")
    (folder / "model.json").write_text("{not json")
    with pytest.warns(XcnnWarning, match="is unreadable"):
        assert load_model(folder).class_names == list("abcdef")


def test_folders_saved_before_the_header_held_the_description_still_load(tmp_path):
    model = tiny(3)
    folder = save_model(model, tmp_path / "m")
    meta = json.loads((folder / "model.json").read_text())
    save_file(dict(model.backbone.state_dict()), str(folder / "model.safetensors"))  # weights only, no header
    assert "xcnn" not in (header(folder / "model.safetensors") or {})
    del meta["save_id"]
    (folder / "model.json").write_text(json.dumps(meta))
    torch.testing.assert_close(logits(load_model(folder)), logits(model), rtol=0, atol=0)
    (folder / "model.json").unlink()
    with pytest.raises(FileNotFoundError, match="holds no xcnn description"):
        load_model(folder / "model.safetensors")


def test_a_saved_model_brings_its_own_settings(tmp_path):
    folder = save_model(tiny(), tmp_path / "m")
    with pytest.raises(ValueError, match=r"brings its own \['input_size'\]"):
        load_model(folder, input_size=(64, 64))
    with pytest.raises(ValueError, match=r"brings its own \['class_names', 'weights'\]"):
        load_model(folder, weights=folder / "model.safetensors", class_names=list("abcdef"))


# ---- hostile or damaged descriptions -----------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_absurdly_nested_descriptions_are_refused(tmp_path):
    state = dict(tiny().backbone.state_dict())
    old_style = tmp_path / "json"
    old_style.mkdir()
    save_file(state, str(old_style / "model.safetensors"))
    (old_style / "model.json").write_text(DEEP)
    with pytest.raises(ValueError, match=r"model.json: nested too deeply"):
        load_model(old_style)
    in_header = tmp_path / "header.safetensors"
    save_file(state, str(in_header), metadata={"xcnn": DEEP})
    with pytest.raises(ValueError, match=r"header of .*header.safetensors: nested too deeply"):
        load_model(in_header)


def edited(folder, change) -> None:
    """Apply ``change(meta)`` to the folder's model.json (the same save: load_model reads it)."""
    meta = json.loads((folder / "model.json").read_text())
    change(meta)
    (folder / "model.json").write_text(json.dumps(meta))


def setter(key, value):
    return lambda meta: meta.__setitem__(key, value)


def deleter(key):
    return lambda meta: meta.pop(key)


@pytest.mark.parametrize(
    "change,error,message",
    [
        (setter("format", "other/1"), ValueError, r"is not an xcnn model description"),
        (deleter("arch"), ValueError, r"the model description lacks \['arch'\]"),
        (deleter("mean"), ValueError, r"lacks \['mean'\]"),
        (deleter("input_size"), ValueError, r"lacks \['input_size'\]"),
        (setter("arch", 5), TypeError, r"arch must be an architecture name \(a string\), got int 5"),
        (setter("kwargs", "abc"), TypeError, r"kwargs must be a dict"),
        (setter("edits", "x"), TypeError, r"edits must be a list"),
        (setter("input_size", [32]), ValueError, r"input_size must be \(height, width\).*got \[32\]"),
        (setter("input_size", "32"), TypeError, r"input_size must be \(height, width\).*got str '32'"),
        (setter("input_size", [math.inf, 1]), TypeError, r"input_size\[0\] must be an integer, got float inf"),
        (setter("input_size", [0, 32]), ValueError, r"input_size\[0\] must be in \[1, 16384\], got 0"),
        (setter("input_size", [32, 10**6]), ValueError, r"input_size\[1\] must be in \[1, 16384\]"),
        (setter("mean", [math.nan, 0, 0]), ValueError, r"mean\[0\] must be finite, got nan"),
        (setter("mean", [0, 0]), ValueError, r"mean must be 3 numbers \(one per RGB channel\)"),
        (setter("mean", [10**400, 0, 0]), ValueError, r"mean\[0\] must be finite, got 1000"),  # not an OverflowError
        (setter("std", [1, 1, -(10**400)]), ValueError, r"std\[2\] must be finite"),
        (setter("std", [1e-40, 1, 1]), ValueError, r"std\[0\] = 1e-40 is too small.*within \+-65504"),
        (setter("std", [0, 1, 1]), ValueError, r"std must be positive"),
        (setter("class_names", "abcdef"), TypeError, r"class_names must be a list of strings"),
        (setter("class_names", ["a", 5, "c", "d", "e", "f"]), TypeError, r"must be strings, got int 5 at position 1"),
        (setter("class_names", ["a"]), ValueError, r"class_names has 1 names but the model has 6 outputs"),
        (setter("name", 5), TypeError, r"name must be a string"),
        (setter("weights", 5), TypeError, r"weights .* must be a string or null"),
        (setter("kwargs", {**ARCH, "num_classes": -1}), ValueError, r"ShapesNet: num_classes must be in \[1, inf\)"),
        (setter("kwargs", {**ARCH, "widths": [-1, 4, 8, 8]}), ValueError, r"ShapesNet: widths\[0\] must be in \[1"),
        (setter("kwargs", {**ARCH, "widths": [16]}), ValueError, r"ShapesNet: widths must be 4 positive integers"),
        (setter("kwargs", {**ARCH, "depth": 3}), ValueError, r"cannot build .*unexpected keyword argument 'depth'"),
    ],
)
def test_every_field_of_the_description_is_checked(change, error, message, tmp_path):
    folder = save_model(tiny(), tmp_path / "m")
    edited(folder, change)
    with pytest.raises(error, match=message) as info:
        load_model(folder)
    assert "model.json" in str(info.value)  # the message names the file


def test_shapes_are_checked_on_the_meta_device_before_anything_is_allocated(tmp_path, monkeypatch):
    """model.json widths [1500]*4 ask for ~650 MB that the 4-8-channel weights cannot fill: the mismatch is
    found on the meta device (the description's network is never built for real) and names the tensors."""
    folder = save_model(tiny(), tmp_path / "m")
    built = []
    init = ShapesNet.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(next(self.parameters()).device.type)

    monkeypatch.setattr(ShapesNet, "__init__", spy)
    edited(folder, setter("kwargs", {**ARCH, "widths": [1500] * 4}))
    with pytest.raises(ValueError, match=r"stem.0.weight is \[4, 3, 3, 3\] in the file but \[1500, 3, 3, 3\]"):
        load_model(folder)
    assert built == ["meta"]
    edited(folder, setter("kwargs", {**ARCH, "widths": [10**6] * 4}))  # terabytes: refused before building at all
    with pytest.raises(ValueError, match=r"ShapesNet\(widths=.*would need .* GiB, more than this machine"):
        load_model(folder)
    assert built == ["meta"]
    edited(folder, setter("kwargs", {**ARCH, "num_classes": 7}))
    with pytest.raises(ValueError, match=r"fc.weight is \[6, 8\] in the file but \[7, 8\]"):
        load_model(folder)


def test_extra_and_missing_tensors_are_named(tmp_path):
    model = tiny()
    folder = tmp_path / "m"
    save_model(model, folder)
    meta = header(folder / "model.safetensors")
    state = dict(model.backbone.state_dict())
    state["extra.weight"] = torch.zeros(2)
    del state["fc.bias"]
    save_file(state, str(folder / "model.safetensors"), metadata=meta)
    with pytest.raises(
        ValueError, match=r"missing from the file: fc.bias; in the file but not in the architecture: extra"
    ):
        load_model(folder)


def test_a_builder_without_meta_support_is_checked_after_the_real_build(tmp_path, monkeypatch):
    """An edit that refuses the meta device: the folder still loads, and a description that does not fit its
    weights (or its class names) is still named, after the real build (one forward counts the outputs)."""
    devices = []

    def head(backbone: nn.Module, where: str, width: int) -> None:
        device = next(backbone.parameters()).device
        devices.append(device.type)
        if device.type == "meta":
            raise NotImplementedError("no meta kernels here")
        replace_module(backbone, where, nn.Linear(8, width))

    monkeypatch.setitem(ARCHITECTURE_EDITS, "test_head", head)
    model = tiny()
    edit = {"op": "test_head", "where": "fc", "args": {"width": 6}}
    head(model.backbone, "fc", 6)
    model.spec = {**model.spec, "edits": [edit]}
    folder = save_model(model, tmp_path / "m")
    torch.testing.assert_close(logits(load_model(folder)), logits(model), rtol=0, atol=0)
    assert devices == ["cpu", "meta", "cpu"]
    edited(folder, setter("edits", [{**edit, "args": {"width": 7}}]))
    with pytest.raises(ValueError, match=r"fc.weight is \[6, 8\] in the file but \[7, 8\]"):
        load_model(folder)
    edited(folder, lambda meta: meta.update(edits=[edit], class_names=["a", "b"]))
    with pytest.raises(ValueError, match=r"class_names has 2 names but the model has 6 outputs"):
        load_model(folder)


def test_edits_are_replayed_in_their_order(tmp_path, monkeypatch):
    """The second edit changes what the first one put in: replayed in another order, the weights do not fit."""

    def put(backbone: nn.Module, where: str, width: int) -> None:
        replace_module(backbone, where, nn.Linear(8, width))

    def grow(backbone: nn.Module, where: str) -> None:
        old = backbone.get_submodule(where)
        replace_module(backbone, where, nn.Linear(old.in_features, old.out_features * 2))

    monkeypatch.setitem(ARCHITECTURE_EDITS, "test_put", put)
    monkeypatch.setitem(ARCHITECTURE_EDITS, "test_grow", grow)
    model = tiny()
    edits = [{"op": "test_put", "where": "fc", "args": {"width": 3}}, {"op": "test_grow", "where": "fc", "args": {}}]
    put(model.backbone, "fc", 3)
    grow(model.backbone, "fc")
    model.spec = {**model.spec, "edits": edits}
    model.class_names = list("abcdef")  # 3 * 2 outputs
    back = load_model(save_model(model, tmp_path / "m"))
    assert back.backbone.fc.out_features == 6
    torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=0)


# ---- a save that lands during a load, folders that are not xcnn models, what the builders may be told ------


def test_a_save_landing_during_a_load_leaves_it_one_whole_model(tmp_path, monkeypatch):
    """Another process saves into the folder after the load has read the description and before it reads the
    tensors: the load keeps the file it opened, so it returns the old model whole, never the old description
    with the new weights."""
    import xcnn.models

    old, new = tiny(1, names="abcdef"), tiny(2, names="uvwxyz", mean=0.25)
    folder = save_model(old, tmp_path / "m")
    real = xcnn.models._saved_backbone

    def save_meanwhile(*args, **kwargs):
        save_model(new, folder)  # between the description and the tensors
        return real(*args, **kwargs)

    monkeypatch.setattr(xcnn.models, "_saved_backbone", save_meanwhile)
    back = load_model(folder)
    assert back.class_names == list("abcdef")
    torch.testing.assert_close(back.mean.flatten(), torch.zeros(3))
    torch.testing.assert_close(logits(back), logits(old), rtol=0, atol=0)
    monkeypatch.undo()
    back = load_model(folder)  # the next load: the new model, whole
    assert back.class_names == list("uvwxyz")
    torch.testing.assert_close(logits(back), logits(new), rtol=0, atol=0)


def test_a_folder_holding_other_weights_does_not_shadow_a_model_name(tmp_path, monkeypatch):
    """A Hugging Face download called resnet18 in the working directory (model.safetensors, no xcnn
    description) is not a saved xcnn model: the name still means torchvision's resnet18."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet18").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "resnet18" / "model.safetensors"), metadata={"format": "pt"})
    net = load_model("resnet18", pretrained=False)
    assert net.name == "resnet18" and net.weights is None and type(net.backbone).__name__ == "ResNet"
    (tmp_path / "resnet18" / "model.safetensors").write_bytes(b"not safetensors")  # nor is an unreadable file
    assert load_model("resnet18", pretrained=False).name == "resnet18"


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"checkpoint_path": "/elsewhere.pt"}, "'checkpoint_path'"),
        ({"pretrained": True}, "'pretrained'"),
        ({"pretrained_cfg": {"hf_hub_id": "timm/resnet18.a1_in1k"}}, "'pretrained_cfg'"),
        ({"pretrained_cfg_overlay": {"file": "/elsewhere.pt"}}, "'pretrained_cfg_overlay'"),
        ({"cache_dir": "cache"}, "'cache_dir'"),
        ({"weights": "DEFAULT"}, "'weights'"),
        ({"weights_backbone": "DEFAULT"}, "'weights_backbone'"),
        ({"block_args": [{"norm_file": "x"}]}, r"kwargs\['block_args'\]\[0\]\['norm_file'\]"),
        ({"global_pool": "../../x"}, r"kwargs\['global_pool'\] = '\.\./\.\./x' looks like a file path"),
        ({"act_layer": "gelu.pth"}, r"kwargs\['act_layer'\] = 'gelu.pth' looks like a file path"),
    ],
)
def test_architecture_arguments_that_would_load_files_are_refused(kwargs, key, tmp_path, monkeypatch):
    """timm.create_model(checkpoint_path=...) would torch.load a file outside the folder, pretrained_cfg*
    and cache_dir fetch weights: refused, naming the argument, before anything is built or read."""
    import timm

    built = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(k))
    folder = save_model(tiny(), tmp_path / "m")
    edited(folder, lambda meta: meta.update(arch="timm:resnet18", kwargs=kwargs))
    with pytest.raises(ValueError, match=key) as info:
        load_model(folder)
    assert "model.json" in str(info.value) and "model.safetensors only" in str(info.value)
    assert built == []


def test_ordinary_architecture_arguments_are_not_taken_for_files():
    from xcnn.models import _check_builder_arguments

    _check_builder_arguments({"drop_path_rate": 0.1, "init_weights": False, "global_pool": "avg", "act_layer": "gelu",
                              "transform_input": True, "input_size": [224, 224], "img_size": 224})  # fmt: skip


def test_a_float64_model_comes_back_in_float64(tmp_path):
    """Weights that need float64 (1e-10 apart from float32 values) come back exactly, in float64."""
    model = tiny(4).double()
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1e-10)
    back = load_model(save_model(model, tmp_path / "m"))
    assert {p.dtype for p in back.parameters()} == {torch.float64} and back.mean.dtype == torch.float64
    for (name, p), q in zip(model.backbone.named_parameters(), back.backbone.parameters(), strict=True):
        assert torch.equal(p, q), name
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), model.eval()(x), rtol=0, atol=0)


@contextlib.contextmanager
def forward_devices():
    """The device types of every module call's first input while the block runs (a global hook)."""
    seen: set[str] = set()

    def record(module, args):
        if args and isinstance(args[0], torch.Tensor):
            seen.add(args[0].device.type)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def test_loading_runs_no_real_forward_pass(tmp_path):
    """The class count is checked without computing anything: a prototype network (whose meta forward pass
    fails in its autocast) by its last layer; a model saved without class names is not run at all. A
    mismatch is still refused (confirmed by one real forward)."""
    from xcnn.interpretable import protopnet

    folder = save_model(protopnet(tiny(), 1, dim=4), tmp_path / "proto")
    with forward_devices() as seen:
        back = load_model(folder)
    assert back.class_names == list("abcdef") and "cpu" not in seen
    edited(folder, setter("class_names", None))
    with forward_devices() as seen:
        assert load_model(folder).class_names is None
    assert seen == set()
    edited(folder, setter("class_names", ["a", "b"]))
    with pytest.raises(ValueError, match=r"class_names has 2 names but the model has 6 outputs"):
        load_model(folder)
    plain = save_model(tiny(), tmp_path / "plain")
    with forward_devices() as seen:
        load_model(plain)
    assert seen <= {"meta"}
