"""The only place in xcnn that attaches hooks to a model or temporarily changes its state.

* :class:`Tap` records the outputs of named layers during forward passes (optionally as
  differentiable tensors so that gradients can be taken *at the layer only*).
* :func:`trace_outputs` records every module's output once, in execution order (layer discovery);
  :func:`input_shapes` / :func:`output_shapes` the input / output shape of every call of named modules.
* :func:`frozen` puts a model in eval mode with ``requires_grad=False`` and restores both on exit.
* :func:`replace_module` swaps a named submodule for another (architecture edits such as LAP);
  :func:`replaced` does it for the length of a ``with`` block.
* :func:`intervene` changes a named layer's output while a ``with`` block runs (channel ablation:
  :func:`scale_channels`).

All hooks are removed when the ``with`` block ends, also when it ends with an exception.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Tap",
    "frozen",
    "input_shapes",
    "intervene",
    "named_layer",
    "output_shapes",
    "replace_module",
    "replaced",
    "scale_channels",
    "trace_outputs",
]


def named_layer(model: nn.Module, name: str) -> nn.Module:
    """Return ``model``'s submodule called ``name`` (as in ``named_modules()``); clear error if absent."""
    if not isinstance(name, str):
        raise TypeError(f"layer names are strings, got {type(name).__name__}: {name!r}")
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    import difflib

    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f"; did you mean one of {close}?" if close else ""
    raise ValueError(
        f"layer {name!r} is not in the model {type(model).__name__} "
        f"(names come from the backbone's named_modules(){hint})"
    )


class Tap(contextlib.AbstractContextManager):
    """Record the outputs of named layers of ``model`` while the ``with`` block runs.

    ``activations[name]`` holds the layer's output of the most recent forward pass. With
    ``differentiable=True`` that output is part of the autograd graph even when nothing below the layer
    requires gradients (it becomes a leaf there), so ``torch.autograd.grad(score, tap.activations[name])``
    back-propagates only through the layers *above* the tap. The model receives a copy of the output, so
    an in-place operation after the layer (``ReLU(inplace=True)``) can neither corrupt the recorded
    values nor trip autograd's leaf checks.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *, differentiable: bool = False) -> None:
        self.model = model
        self.layers = list(layers)
        self.differentiable = differentiable
        self.activations: dict[str, Tensor] = {}
        self._modules = {name: named_layer(model, name) for name in self.layers}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"layer {name!r} returns {type(output).__name__}, not a tensor; tap a layer "
                    "whose output is a feature map"
                )
            if not self.differentiable:
                output = output.detach()
            elif not output.requires_grad:
                output = output.detach().requires_grad_(True)
            self.activations[name] = output
            return output.clone()

        return hook

    def __enter__(self) -> Tap:
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def get(self, name: str) -> Tensor:
        """The recorded output of ``name``; a clear error if the forward pass never reached it."""
        if name not in self.activations:
            raise RuntimeError(f"layer {name!r} was not executed in the forward pass")
        return self.activations[name]


def trace_outputs(model: nn.Module, *inputs: Tensor) -> list[tuple[str, nn.Module, object]]:
    """Run ``model(*inputs)`` once and return ``(name, module, output)`` for every submodule, in the
    order the modules *finished* (a container finishes after its children)."""
    records: list[tuple[str, nn.Module, object]] = []
    handles = []

    def make_hook(name: str):
        def hook(module, args, output):
            records.append((name, module, output))

        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make_hook(name)))
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return records


def input_shapes(model: nn.Module, names: Sequence[str], *inputs: Tensor) -> dict[str, list[torch.Size]]:
    """Run ``model(*inputs)`` once (no grad) and return, for each named module, the shape of the first
    positional input of every call it receives, in call order; a module the forward never calls is an
    error."""
    return _call_shapes(model, names, inputs, outputs=False)


def output_shapes(model: nn.Module, names: Sequence[str], *inputs: Tensor) -> dict[str, list[torch.Size]]:
    """Like :func:`input_shapes`, for the tensor each call of a named module returns."""
    return _call_shapes(model, names, inputs, outputs=True)


def _call_shapes(model: nn.Module, names: Sequence[str], inputs: tuple, outputs: bool) -> dict[str, list[torch.Size]]:
    shapes: dict[str, list[torch.Size]] = {name: [] for name in names}
    handles = []

    def make_hook(name: str):
        def pre_hook(module, args):
            if args and isinstance(args[0], Tensor):
                shapes[name].append(args[0].shape)

        def hook(module, args, output):
            if isinstance(output, Tensor):
                shapes[name].append(output.shape)

        return hook if outputs else pre_hook

    try:
        for name in names:
            module = named_layer(model, name)
            register = module.register_forward_hook if outputs else module.register_forward_pre_hook
            handles.append(register(make_hook(name)))
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if not shapes[name]]
    if missing:
        what = "returns a tensor" if outputs else "is called with a tensor"
        raise ValueError(f"{missing[0]!r} never {what} in {type(model).__name__}'s forward pass")
    return shapes


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` on every parameter while the block runs; both restored after.

    Explanations must see the deterministic (eval) network, and parameters that do not require gradients
    keep autograd from building the weight-gradient graph that explainers never use.
    """
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        model.eval()
        for param, _ in flags:
            param.requires_grad_(False)
        yield model
    finally:
        for module, mode in modes:
            module.training = mode
        for param, flag in flags:
            param.requires_grad_(flag)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``model``'s submodule ``name`` (a ``named_modules()`` name) is; return the old one.

    The swap is in place: forward passes, ``named_modules()`` and the state dict see ``new`` under ``name``.
    """
    if not isinstance(new, nn.Module):
        raise TypeError(f"the replacement for {name!r} must be an nn.Module, got {type(new).__name__}")
    old = named_layer(model, name)
    parent_name, _, child = name.rpartition(".")
    parent = named_layer(model, parent_name) if parent_name else model
    setattr(parent, child, new)  # nn.Sequential and nn.ModuleList children are named "0", "1", ...: setattr works
    return old


@contextlib.contextmanager
def replaced(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """``model`` with the named submodules swapped for the given ones while the block runs; the originals
    are put back on exit, also when the block raises."""
    done: list[tuple[str, nn.Module]] = []
    try:
        for name, new in replacements.items():
            done.append((name, replace_module(model, name, new)))
        yield model
    finally:
        for name, old in reversed(done):
            replace_module(model, name, old)


def swapped_copy(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """A shallow copy of ``model`` whose submodule ``name`` is ``new``: every other module and parameter is
    shared with ``model``, which is left unchanged (only the modules on the path to ``name`` are copied).
    A lasting view of a model, such as a prototype network up to its prototype layer. The copies on the path
    share their parameters, buffers and hook tables with the originals: a hook registered on one of them
    fires on both."""
    named_layer(model, name)  # a clear error for a wrong name
    head, _, rest = name.partition(".")
    clone = copy.copy(model)
    clone._modules = dict(model._modules)
    clone._modules[head] = new if not rest else swapped_copy(model._modules[head], rest, new)
    return clone


@contextlib.contextmanager
def intervene(model: nn.Module, name: str, fn) -> Iterator[nn.Module]:
    """While the ``with`` block runs, the output of ``model``'s layer ``name`` is replaced by
    ``fn(output)`` in every forward pass; the hook is removed on exit, also after an exception."""
    layer = named_layer(model, name)

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(f"layer {name!r} returns {type(output).__name__}, not a tensor: cannot intervene on it")
        return fn(output)

    handle = layer.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def scale_channels(model: nn.Module, name: str, factors: Tensor) -> contextlib.AbstractContextManager:
    """Multiply the channels of layer ``name``'s output ``[B,C,...]`` by ``factors``: ``[C]`` (every image
    alike) or ``[B,C]`` (one row per image: several ablations in one batch). Zeros ablate channels."""

    def scaled(output: Tensor) -> Tensor:
        if output.dim() < 2:
            raise ValueError(f"layer {name!r} has output shape {list(output.shape)}; channels need [B,C,...]")
        f = factors.to(device=output.device, dtype=output.dtype)
        if f.dim() == 1:
            f = f.expand(output.shape[0], -1)
        if tuple(f.shape) != tuple(output.shape[:2]):
            raise ValueError(
                f"layer {name!r}: factors of shape {list(factors.shape)} for an output of shape {list(output.shape)}"
            )
        return output * f.reshape(*f.shape, *([1] * (output.dim() - 2)))

    return intervene(model, name, scaled)
