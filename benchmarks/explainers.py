"""Speed and memory of xcnn's explainers against the model's own forward pass and the anchor libraries
(grad-cam, torchcam, captum), all measured in the same run.

    python benchmarks/explainers.py                                 # CPU defaults (about 30 minutes)
    python benchmarks/explainers.py --device cuda --batch 32 --rise-masks 4000 --scorecam-images 4 --amp --mask-defaults

Prints one Markdown table per model: seconds per image, ratio to the model's forward pass on the same
batch, and the anchor's time divided by ours (> 1 = xcnn is faster). Results go in docs/performance.md.
Competing implementations are timed round-robin, each with only its own hooks attached.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections.abc import Callable

import torch

import xcnn

warnings.filterwarnings("ignore")

# a contender: a factory returning (function to time, cleanup); hooks exist only between the two
Contender = Callable[[], tuple[Callable[[], object], Callable[[], None]]]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(
    contenders: dict[tuple[str, str], Contender], device: torch.device, repeats: int, warmup: int = 1
) -> dict[tuple[str, str], float]:
    """Median seconds per call of each contender, run round-robin so that drifts in machine speed hit all
    alike; each contender's hooks are attached only while it runs."""
    times: dict[tuple[str, str], list[float]] = {key: [] for key in contenders}
    for rep in range(warmup + repeats):
        for key, make in contenders.items():
            fn, cleanup = make()
            try:
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                if rep >= warmup:
                    times[key].append(time.perf_counter() - start)
            finally:
                cleanup()
    return {key: sorted(v)[len(v) // 2] for key, v in times.items()}


def plain(fn: Callable[[], object]) -> Contender:
    return lambda: (fn, lambda: None)


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Bench:
    def __init__(self, name: str, args: argparse.Namespace, device: torch.device) -> None:
        torch.manual_seed(0)
        self.name, self.args, self.device = name, args, device
        # random weights for ResNet-50 (as docs/performance.md records), the bundled model's own for Lite0
        self.pretrained = name == xcnn.models.BUNDLED_MODEL
        self.model = xcnn.load_model(name, pretrained=self.pretrained, device=device)
        self.layer = xcnn.default_layer(self.model)
        self.layer_module = dict(self.model.backbone.named_modules())[self.layer]
        self.x = torch.rand(args.batch, 3, *self.model.input_size, device=device)
        with torch.no_grad():
            self.targets = self.model(self.x).argmax(1)
        self.rows: list[dict] = []

    def add(self, method: str, impl: str, secs: float, images: int, ref: str | None = None, note: str = "") -> None:
        self.rows.append(
            {"model": self.name, "method": method, "impl": impl, "s_per_image": secs / images, "ref": ref, "note": note}
        )

    def forward(self) -> None:
        with torch.inference_mode():
            self.model(self.x)

    def gradient_cams(self) -> None:
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        from torchcam.methods import GradCAM as TorchcamGradCAM
        from torchcam.methods import GradCAMpp as TorchcamGradCAMpp

        model, x, targets = self.model, self.x, self.targets

        def forward_backward():  # the model's own forward and full backward (input and weight gradients)
            model(x.clone().requires_grad_(True)).gather(1, targets[:, None]).sum().backward()
            model.zero_grad(set_to_none=True)

        def gradcam_lib(cls):
            def make():
                cam = cls(model=model, target_layers=[self.layer_module])
                labels = [ClassifierOutputTarget(int(t)) for t in targets]
                return (lambda: cam(input_tensor=x, targets=labels)), cam.activations_and_grads.release

            return make

        def torchcam_lib(cls):
            def make():
                extractor = cls(model, target_layer=self.layer_module)
                return (lambda: extractor(targets.tolist(), model(x))), extractor.remove_hooks

            return make

        contenders: dict[tuple[str, str], Contender] = {
            ("forward", "model"): plain(self.forward),
            ("forward+backward", "model"): plain(forward_backward),
        }
        for method in ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"]:
            expl = xcnn.explainer(method, model, layer=self.layer)
            contenders[(method, "xcnn")] = plain(lambda e=expl: e(x, targets))
        contenders[("gradcam", "grad-cam")] = gradcam_lib(GradCAM)
        contenders[("gradcam++", "grad-cam")] = gradcam_lib(GradCAMPlusPlus)
        contenders[("gradcam", "torchcam")] = torchcam_lib(TorchcamGradCAM)
        contenders[("gradcam++", "torchcam")] = torchcam_lib(TorchcamGradCAMpp)
        for (method, impl), secs in timed(contenders, self.device, self.args.repeats).items():
            self.add(method, impl, secs, len(x), ref=None if impl in ("xcnn", "model") else method)

    def input_gradients(self) -> None:
        from captum.attr import IntegratedGradients, Saliency

        model, x, targets, args = self.model, self.x, self.targets, self.args
        steps, rows = args.ig_steps, args.inner_batch
        ours_ig = xcnn.explainer("integrated_gradients", model, steps=steps, batch_size=rows)
        ours_sal = xcnn.explainer("saliency", model)
        captum_ig, captum_sal = IntegratedGradients(model), Saliency(model)
        contenders = {
            ("integrated_gradients", "xcnn"): plain(lambda: ours_ig(x, targets)),
            ("integrated_gradients", "captum"): plain(
                lambda: captum_ig.attribute(
                    x, target=targets, n_steps=steps, method="riemann_trapezoid", internal_batch_size=rows
                )
            ),
            ("saliency", "xcnn"): plain(lambda: ours_sal(x, targets)),
            ("saliency", "captum"): plain(lambda: captum_sal.attribute(x, target=targets, abs=True)),
        }
        for (method, impl), secs in timed(contenders, self.device, max(1, self.args.repeats // 3)).items():
            note = f"{steps} steps" if method == "integrated_gradients" else ""
            self.add(method, impl, secs, len(x), ref=None if impl == "xcnn" else method, note=note)

    def scorecam(self) -> None:
        from pytorch_grad_cam import ScoreCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        from torchcam.methods import ScoreCAM as TorchcamScoreCAM

        model, args = self.model, self.args
        xs, ts = self.x[: args.scorecam_images], self.targets[: args.scorecam_images]
        ours = xcnn.explainer("scorecam", model, layer=self.layer, batch_size=args.inner_batch, amp=args.amp)

        def torchcam_lib():
            extractor = TorchcamScoreCAM(model, target_layer=self.layer_module, batch_size=args.inner_batch)

            def run():
                with torch.inference_mode():
                    return extractor(ts.tolist(), model(xs))

            return run, extractor.remove_hooks

        def gradcam_lib():
            cam = ScoreCAM(model=model, target_layers=[self.layer_module])
            cam.batch_size = args.inner_batch
            labels = [ClassifierOutputTarget(int(t)) for t in ts]
            return (lambda: cam(input_tensor=xs, targets=labels)), cam.activations_and_grads.release

        contenders: dict[tuple[str, str], Contender] = {
            ("scorecam", "xcnn"): plain(lambda: ours(xs, ts)),
            ("scorecam", "torchcam"): torchcam_lib,
        }
        if args.gradcam_scorecam:
            contenders[("scorecam", "grad-cam")] = gradcam_lib
        from xcnn.hooks import Tap

        with torch.inference_mode(), Tap(model.backbone, [self.layer]) as tap:
            model(xs)
        flat = tap.get(self.layer).flatten(2)
        constant = float((flat.amax(2) == flat.amin(2)).float().mean())  # masks to black: one shared forward
        for (method, impl), secs in timed(contenders, self.device, 1, warmup=0).items():
            note = f"batch {args.inner_batch}"
            if impl == "xcnn":
                note += f"; {constant:.0%} of the {flat.shape[1]} `{self.layer}` channels are constant on these images"
            self.add(method, impl, secs, len(xs), ref=None if impl == "xcnn" else method, note=note)

    def batch_sizes(self) -> None:
        """The model's inference forward per image at several batch sizes: what xcnn's default inner batch
        (``Explainer._rows``) is chosen by."""
        for rows in (1, 8, 64):
            x = torch.rand(rows, 3, *self.model.input_size, device=self.device)

            def run(x=x):
                with torch.inference_mode():
                    self.model(x)

            secs = timed({("forward", "model"): plain(run)}, self.device, max(1, self.args.repeats // 3))
            self.add(f"forward, batch {rows}", "model", secs[("forward", "model")], rows)

    def rise(self) -> None:
        args = self.args
        rise = xcnn.explainer("rise", self.model, masks=args.rise_masks, batch_size=args.inner_batch, amp=args.amp)
        noise = torch.rand(args.inner_batch, 3, *self.model.input_size, device=self.device)

        def plain_forwards():
            with torch.inference_mode():
                for _ in range(-(-args.rise_masks // args.inner_batch)):
                    self.model(noise)

        found = timed(
            {
                ("rise", "xcnn"): plain(lambda: rise(self.x[:1], self.targets[:1])),
                ("rise", "plain forwards"): plain(plain_forwards),
            },
            self.device,
            1,
        )
        ratio = found[("rise", "xcnn")] / found[("rise", "plain forwards")]
        self.add(
            "rise",
            "xcnn",
            found[("rise", "xcnn")],
            1,
            note=f"{args.rise_masks} masks = {ratio:.2f}x the same number of plain forwards",
        )
        self.add(
            "rise",
            "plain forwards",
            found[("rise", "plain forwards")],
            1,
            ref="rise",
            note=f"{args.rise_masks} forwards, batch {args.inner_batch}",
        )

    def tame(self) -> None:
        """TAME explanation (one pass + head) against the plain forward timed alongside, and a training
        epoch through fit_tame against a bare loop doing the same passes and against a frozen-backbone
        forward + head-only backward (what a linear probe costs)."""
        from torch.utils.data import Dataset

        from xcnn.explain.tame import tame_head
        from xcnn.hooks import Tap, frozen
        from xcnn.training.tame import TAMELoss, fit_tame

        model, x, targets, args = self.model, self.x, self.targets, self.args
        head = tame_head(model).eval()
        expl = xcnn.explainer("tame", model, head=head, batch_size=len(x))
        found = timed(
            {("forward", "model"): plain(self.forward), ("tame", "xcnn"): plain(lambda: expl(x, targets)), ("tame, all classes", "xcnn"): plain(lambda: expl.explain_all(x))},
            self.device, self.args.repeats,
        )  # fmt: skip
        fwd = found[("forward", "model")]
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), Tap(model.backbone, head.layers) as tap:
            with FlopCounterMode(display=False) as backbone_flops:
                model(x[:1])
            feats = [tap.get(n) for n in head.layers]
            with FlopCounterMode(display=False) as head_flops:
                head.class_maps(feats, targets[:1])
        flops = f"; per image the head counts {head_flops.get_total_flops() / 1e9:.2f} GFLOP against the model's {backbone_flops.get_total_flops() / 1e9:.2f} (torch.utils.flop_counter)"
        for key in [("tame", "xcnn"), ("tame, all classes", "xcnn")]:
            self.add(
                key[0],
                key[1],
                found[key],
                len(x),
                note=f"{found[key] / fwd:.2f}x the forward timed alongside; layers {', '.join(head.layers)}"
                + (flops if key[0] == "tame" else ""),
            )

        steps = args.tame_steps
        images = torch.rand(steps * len(x), 3, *model.input_size)

        class Images(Dataset):
            def __len__(self):
                return len(images)

            def __getitem__(self, i):
                return {"image": images[i]}

        loss = TAMELoss()

        def bare_loop(probe_only: bool):
            def run():
                net = tame_head(model).train()
                opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
                with frozen(model):
                    for batch in images.split(len(x)):
                        batch = batch.to(self.device)
                        # the tap must be gone before the masked forward: its hooks detach the tapped outputs
                        with torch.no_grad(), Tap(model.backbone, net.layers) as tap:
                            labels = model(batch).argmax(1)
                            feats = [tap.get(n) for n in net.layers]
                        att = torch.sigmoid(net.class_maps(feats, labels))
                        if probe_only:
                            value = att.mean()
                        else:
                            mask = torch.nn.functional.interpolate(att[:, None], size=batch.shape[-2:], mode="bilinear")
                            value = loss(model(batch * mask), att, labels)[0]
                        opt.zero_grad()
                        value.backward()
                        opt.step()

            return run

        def through_fit():
            fit_tame(model, Images(), epochs=1, batch_size=len(x), progress=False, device=self.device)

        found = timed(
            {("tame training", "xcnn fit_tame"): plain(through_fit), ("tame training", "bare loop"): plain(bare_loop(False)),
             ("tame training", "frozen forward + head backward"): plain(bare_loop(True))},
            self.device, max(1, self.args.repeats // 3),
        )  # fmt: skip
        ours = found[("tame training", "xcnn fit_tame")]
        for (method, impl), secs in found.items():
            note = f"{len(images)} images, batch {len(x)}"
            if impl != "xcnn fit_tame":
                note += f"; fit_tame's throughput is {secs / ours:.0%} of this"
            self.add(method, impl, secs, len(images), note=note)

    def mask_search(self) -> None:
        """MDM and extremal perturbation on one image: seconds, the forward/backward passes they made
        (counted by a hook on the model), their cost against the same number of the model's own
        forward+backward passes, and peak memory after a short and a 4x longer run (no graph is kept
        across steps, so it must not grow). Cost is linear in ``steps``: the default settings' time is
        extrapolated from the measured run and labelled as such; ``--mask-defaults`` also measures it, one
        call per method."""
        args, model = self.args, self.model
        x, t = self.x[:1], self.targets[:1]
        counts = {"forwards": 0, "rows": 0, "with_grad": 0, "grad_rows": 0}

        def count(_module, inputs):
            counts["forwards"] += 1
            counts["rows"] += inputs[0].shape[0]
            if torch.is_grad_enabled():
                counts["with_grad"] += 1
                counts["grad_rows"] += inputs[0].shape[0]

        def forward_backward(rows: int):  # the model's own pass on the rows of one step (MDM 2, extremal 1)
            def run():
                model(x.repeat(rows, 1, 1, 1).requires_grad_(True)).gather(1, t.repeat(rows)[:, None]).sum().backward()
                model.zero_grad(set_to_none=True)

            return plain(run)

        fb = {
            rows: secs
            for (_, rows), secs in timed(
                {("fb", r): forward_backward(r) for r in (1, 2)}, self.device, args.repeats
            ).items()
        }

        def measure(explainer) -> float:  # one timed call, its passes counted into ``counts``
            counts.update(forwards=0, rows=0, with_grad=0, grad_rows=0)
            handle = model.backbone.register_forward_pre_hook(count)
            try:
                return timed({("call", "xcnn"): plain(lambda: explainer(x, t))}, self.device, 1, warmup=0)[
                    ("call", "xcnn")
                ]
            finally:
                handle.remove()

        def passes() -> str:
            return (
                f"{counts['forwards']} forwards ({counts['rows']} rows), {counts['with_grad']} of them with a backward"
            )

        for name, default_steps, options in [
            ("mdm", 100, {"steps": args.mdm_steps}),
            ("extremal", 800, {"steps": 4 * args.mdm_steps}),
        ]:
            short = xcnn.explainer(name, model, progress=False, **options)
            short(x, t)  # warm-up
            secs = measure(short)
            peak_short, peak_long = (self.peak_mib(name, steps) for steps in (options["steps"], 4 * options["steps"]))
            per_step = secs / counts["with_grad"]
            default_secs = secs * default_steps / options["steps"]
            rows_per_step = counts["grad_rows"] // counts["with_grad"]
            self.add(
                f"{name} ({options['steps']} steps{' per scale' if name == 'mdm' else ''})", "xcnn", secs, 1,
                note=f"{passes()}, {rows_per_step} row(s) each; a step costs {per_step / fb[rows_per_step]:.2f}x the model's own forward+backward "
                f"on {rows_per_step} row(s) ({1000 * fb[rows_per_step]:.0f} ms); default {default_steps} steps: ~{default_secs:.0f} s / image (extrapolated, linear in steps); "
                f"peak memory of a fresh process explaining one image: {peak_short:.0f} MiB, {peak_long:.0f} MiB with 4x the steps",
            )  # fmt: skip
            if args.mask_defaults:  # the default settings, measured once (minutes per image on CPU)
                secs = measure(xcnn.explainer(name, model, progress=False))
                self.add(f"{name} (defaults, {default_steps} steps{' per scale' if name == 'mdm' else ''})", "xcnn", secs, 1,
                         note=f"{passes()}; measured once")  # fmt: skip

    def peak_mib(self, method: str, steps: int) -> float:
        """Peak memory (CUDA allocator, or on CPU the process's high-water mark of resident memory, VmHWM) of
        a fresh process that loads the model and explains one image with ``method`` at ``steps``. Not
        ``ru_maxrss``: Linux carries it over from the parent across fork + exec, so a child started by a
        large benchmark process would report the parent's peak."""
        import subprocess
        import sys

        code = f"""
import torch, xcnn
torch.manual_seed(0)
model = xcnn.load_model({self.name!r}, pretrained={self.pretrained}, device={str(self.device)!r})
x = torch.rand(1, 3, *model.input_size, device={str(self.device)!r})
xcnn.explainer({method!r}, model, steps={steps}, progress=False)(x)
cuda = {self.device.type == "cuda"}
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024 if not cuda else 0.0
print(torch.cuda.max_memory_allocated() / 2**20 if cuda else hwm)
"""
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])

    def memory(self) -> None:
        gc = xcnn.explainer("gradcam", self.model, layer=self.layer)
        if self.device.type == "cuda":  # the peak of Grad-CAM's calls alone, not of the sections before
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        readings = []
        for i in range(self.args.memory_calls):
            gc(self.x, self.targets)
            if i in (9, self.args.memory_calls - 1):
                sync(self.device)
                readings.append(torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else rss_mib())
        unit = "peak CUDA MiB" if self.device.type == "cuda" else "process RSS MiB"
        note = f"{unit} after 10 calls {readings[0]:.0f}, after {self.args.memory_calls} calls {readings[1]:.0f}"
        self.rows.append(
            {
                "model": self.name,
                "method": "gradcam, repeated calls",
                "impl": "xcnn",
                "s_per_image": float("nan"),
                "ref": None,
                "note": note,
            }
        )

    def run(self) -> list[dict]:
        sections = {
            "grad": self.gradient_cams, "inputgrad": self.input_gradients, "scorecam": self.scorecam, "rise": self.rise,
            "tame": self.tame, "memory": self.memory, "mask": self.mask_search, "batch": self.batch_sizes,
        }  # fmt: skip
        if "grad" not in self.args.sections:
            self.add(
                "forward",
                "model",
                timed({("forward", "model"): plain(self.forward)}, self.device, self.args.repeats)[
                    ("forward", "model")
                ],
                len(self.x),
            )
        for key in self.args.sections:
            sections[key]()
        forward = next(r["s_per_image"] for r in self.rows if r["method"] == "forward")
        for row in self.rows:
            row["x_forward"] = row["s_per_image"] / forward
        return self.rows


def table(rows: list[dict]) -> str:
    ours = {(r["model"], r["method"]): r["s_per_image"] for r in rows if r["impl"] == "xcnn"}
    lines = [
        "| model | method | implementation | ms / image | × forward | anchor ÷ xcnn | note |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        measured = r["s_per_image"] == r["s_per_image"]  # not NaN
        anchor = (
            f"{r['s_per_image'] / ours[(r['model'], r['ref'])]:.2f}"
            if r["ref"] and (r["model"], r["ref"]) in ours
            else ""
        )
        ms = f"{1000 * r['s_per_image']:.1f}" if measured else ""
        xf = f"{r['x_forward']:.2f}" if measured else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['impl']} | {ms} | {xf} | {anchor} | {r['note']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,efficientnet_lite0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--sections", default="grad,inputgrad,scorecam,rise,tame,memory,mask,batch", help="any of %(default)s"
    )
    parser.add_argument("--batch", type=int, default=4, help="images per call (default %(default)s)")
    parser.add_argument(
        "--inner-batch",
        type=int,
        default=None,
        help="rows per forward pass in inner loops (default: xcnn's, 64 on CUDA, 8-64 on CPU by image size)",
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--scorecam-images", type=int, default=1)
    parser.add_argument(
        "--gradcam-scorecam", action="store_true", help="also time grad-cam's Score-CAM (minutes per image on CPU)"
    )
    parser.add_argument("--rise-masks", type=int, default=400)
    parser.add_argument(
        "--tame-steps", type=int, default=3, help="training batches timed in the tame section (default %(default)s)"
    )
    parser.add_argument("--memory-calls", type=int, default=200)
    parser.add_argument(
        "--mdm-steps",
        type=int,
        default=10,
        help="MDM steps per scale in the mask section (extremal: 4x); default %(default)s",
    )
    parser.add_argument(
        "--mask-defaults",
        action="store_true",
        help="mask section: also time MDM and extremal once at their default steps (minutes on CPU)",
    )
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for xcnn's forward-only methods on CUDA")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    device = torch.device(args.device)
    if args.inner_batch is None:
        args.inner_batch = 64 if device.type == "cuda" else 8
    env = f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        env += f", {torch.cuda.get_device_name()}"
    print(f"# explainers benchmark ({env}; batch {args.batch})\n")
    all_rows = []
    for name in args.models.split(","):
        rows = Bench(name, args, device).run()
        all_rows += rows
        print(table(rows), "\n", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "args": vars(args), "rows": all_rows}, fh, indent=2)


if __name__ == "__main__":
    main()
