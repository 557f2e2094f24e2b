"""Watch the layers through training: a :class:`~xcnn.training.trainer.Callback` for the shared ``fit``
loop that, every ``every`` epochs, fits layer-wise probes on held-out images and records their accuracy,
the top filters by Taylor importance, a summary of each layer's feature correlation and the linear CKA of
each layer to itself at the previous check.

Records go to ``out_dir/monitor.json`` (rewritten atomically at every check from the checkpointed state,
so a resumed run continues the same history) and their scalars to the epoch's metrics (TensorBoard and
``history.json``, under ``monitor/...``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from .._io import atomic_write
from .._validate import check_number, check_positive, read_json
from ..models import Classifier, stage_layers, survey_layers
from ..training.trainer import Callback, TrainerContext
from .features import _check_layers, _pearson_matrix, correlation_summary, linear_cka, pooled_features, stack_data
from .importance import Data, _check_layer, _check_progress, filter_importance
from .probes import _check_labels, fit_alternate

__all__ = ["MONITOR_FILE", "Monitor", "load_history"]

MONITOR_FILE = "monitor.json"


def _classifier(model: nn.Module) -> Classifier:
    """``model`` itself, or the classifier a method's training module wraps."""
    if isinstance(model, Classifier):
        return model
    found = next((m for m in model.modules() if isinstance(m, Classifier)), None)
    if found is None:
        raise TypeError(f"the monitor needs an xcnn Classifier; {type(model).__name__} contains none")
    return found


class Monitor(Callback):
    """Layer-wise inspection at the end of every ``every``-th epoch (and the last one).

    ``data``: labelled images the model does not train on (the validation set); ``images`` of them (a
    seeded random draw, the same at every check, drawn and checked when the monitor is built) are used,
    alternately for fitting the probes (even positions) and for measuring (odd positions: probe accuracy,
    Taylor importance, correlation, CKA). ``layers``: default the stage outputs;
    ``importance_layer``: the layer whose filters are ranked (default the deepest of ``layers``).
    Runs on rank 0 only; the model's weights, BatchNorm statistics and mode are left as they were, and
    the trainer restores every RNG after it, so a monitored run trains exactly like an unmonitored one.
    """

    name = "monitor"

    def __init__(
        self,
        data: Data,
        *,
        layers: Sequence[str] | None = None,
        every: int = 1,
        images: int | None = 512,
        importance_layer: str | None = None,
        top: int = 10,
        l2: float = 1e-3,
        batch_size: int = 64,
        progress: bool | None = False,
    ) -> None:
        check_positive("every", every)
        if images is not None:
            check_number("images", images, integer=True, low=4)  # two of each half at least
        check_positive("top", top)
        l2 = check_number("l2", l2, low=0)  # an infinite penalty would leave every probe at chance, silently
        check_positive("batch_size", batch_size)
        _check_progress(progress)
        if layers is not None:
            if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
                raise ValueError(f"layers must be a non-empty list of module names or None, got {layers!r}")
            bad = next((n for n in layers if not isinstance(n, str)), None)
            if bad is not None:
                raise TypeError(f"layers must hold module names (str), got {type(bad).__name__} {bad!r}")
        if importance_layer is not None and not isinstance(importance_layer, str):
            raise TypeError(f"importance_layer must be a module name (str) or None, got {importance_layer!r}")
        self.data, self.images, self.every, self.top = data, images, every, top
        self.layers = list(layers) if layers is not None else None
        self.importance_layer = importance_layer
        self.l2, self.batch_size, self.progress = l2, batch_size, progress
        self.records: list[dict] = []
        self.previous: dict[str, Tensor] = {}
        # the images are drawn and checked now, on every process (a bad set fails before any training starts
        # or any file is written, and in the same way on every rank of a distributed run)
        self._stacked: dict[str, Tensor] | None = self._draw()

    def _draw(self) -> dict[str, Tensor]:
        """The monitor's images (a seeded draw of ``images`` of ``data``), each batch checked as it is read
        (finite pixels in [0,1], integer labels), and a probe-fitting half that a probe can be fitted on."""
        stacked = stack_data(self.data, self.images, seed=0)
        if len(stacked["label"]) < 4:
            raise ValueError(f"the monitor needs at least 4 labelled images, the data have {len(stacked['label'])}")
        labels = stacked["label"]
        _check_labels(labels[0::2], int(labels.max()) + 1)  # one class only, fewer images than classes
        return stacked

    # checkpointed state -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"records": self.records, "layers": self.layers, "previous": self.previous}

    def load_state_dict(self, state: dict) -> None:
        self.records = list(state.get("records", []))
        self.previous = dict(state.get("previous", {}))
        if state.get("layers") is not None:
            self.layers = list(state["layers"])

    # the check ----------------------------------------------------------------------------------------

    def on_train_begin(self, ctx: TrainerContext) -> None:
        """Check the layers before any training (rank 0; the other ranks never check, and drop the images)."""
        if ctx.rank == 0:
            self._prepare(_classifier(ctx.model))
        else:
            self._stacked = None

    def _prepare(self, clf: Classifier) -> None:
        if self._stacked is None:
            self._stacked = self._draw()
        if self.layers is None:
            self.layers = stage_layers(clf)
        self.layers = _check_layers(clf, self.layers)
        if self.importance_layer is not None:
            _check_layer(clf, self.importance_layer, "importance_layer")
        shapes = survey_layers(clf).shapes
        for name in [*self.layers, *([self.importance_layer] if self.importance_layer else [])]:
            if len(shapes.get(name, ())) != 3:
                raise ValueError(
                    f"layer {name!r} outputs {list(shapes.get(name, ()))} per image; the monitor needs feature maps [C,h,w]"
                )

    def on_epoch_end(self, ctx: TrainerContext) -> None:
        due = (ctx.epoch + 1) % self.every == 0 or ctx.epoch == ctx.epochs - 1
        if ctx.rank != 0 or not due:
            return
        clf = _classifier(ctx.model)
        record = self.check(clf, ctx.epoch)
        if "val/acc" in ctx.metrics:
            record["val_acc"] = ctx.metrics["val/acc"]
        self.records.append(record)
        for layer, acc in record["probe_accuracy"].items():
            ctx.metrics[f"monitor/probe_acc/{layer}"] = acc
        for layer, value in record.get("cka_to_previous", {}).items():
            if value is not None:
                ctx.metrics[f"monitor/cka_previous/{layer}"] = value
        for layer, summary in record["correlation"].items():
            ctx.metrics[f"monitor/mean_abs_corr/{layer}"] = summary["mean_abs"]
        if ctx.out_dir is not None:
            self.write(Path(ctx.out_dir) / MONITOR_FILE)

    def check(self, model: nn.Module, epoch: int) -> dict:
        """Inspect ``model`` now: one record (plain numbers, lists and dicts)."""
        clf = _classifier(model)
        self._prepare(clf)
        layer_for_importance = self.importance_layer or self.layers[-1]
        stacked = self._stacked
        eval_rows = slice(1, None, 2)  # the probes fit the even positions and are measured on these
        feats, labels = pooled_features(clf, stacked, self.layers, batch_size=self.batch_size, progress=self.progress)
        k = int(labels.max()) + 1
        _, _, accuracy = fit_alternate(feats, labels, self.layers, k, self.l2)
        record: dict = {"epoch": epoch, "probe_accuracy": accuracy, "correlation": {}, "cka_to_previous": {}}
        for layer in self.layers:
            x_eval = feats[layer][eval_rows]
            record["correlation"][layer] = correlation_summary(_pearson_matrix(x_eval), top=3)
            if layer in self.previous:
                try:
                    record["cka_to_previous"][layer] = linear_cka(x_eval, self.previous[layer].double())
                except ValueError:  # a constant representation: CKA is undefined
                    record["cka_to_previous"][layer] = None
            self.previous[layer] = x_eval.float().clone()
        evaluation = {key: value[eval_rows] for key, value in stacked.items()}
        taylor = filter_importance(
            clf, evaluation, layer_for_importance, "taylor", batch_size=self.batch_size, progress=self.progress
        )
        order = taylor.argsort(descending=True)[: self.top]
        total = float(taylor.sum())
        record["importance"] = {
            "layer": layer_for_importance,
            "top": [[int(i), float(taylor[i])] for i in order],
            "top_share": float(taylor[order].sum()) / total if total > 0 else None,
        }
        return record

    def write(self, path: Path) -> None:
        payload = {
            "layers": self.layers,
            "every": self.every,
            "images": None if self._stacked is None else len(self._stacked["label"]),
            "records": self.records,
        }
        text = json.dumps(payload, indent=1, allow_nan=False)
        atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def load_history(run_dir: str | Path) -> dict:
    """The monitor records of a training run (``run_dir/monitor.json``), with a clear error when the run
    was not monitored."""
    run_dir = Path(run_dir)
    path = run_dir / MONITOR_FILE
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    if not path.is_file():
        raise ValueError(
            f"{run_dir} has no monitor records ({MONITOR_FILE}); train with --monitor (xcnn train benchmark "
            "--monitor, or a Monitor callback) to record them"
        )
    history = read_json(path, "monitor records")
    if not isinstance(history, dict) or not history.get("records"):
        raise ValueError(f"{path} holds no monitor records")
    return history
