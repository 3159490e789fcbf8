"""Evaluation's own cost, side by side with the reference tools, as ratios from one run.

    python bench/eval.py                                   # CPU, a few COCO-sized images
    python bench/eval.py --reference /path/to/eomt-release --images 8 --offline-images 50
    python bench/eval.py --device cuda --images 50

All inputs are synthetic and shaped like COCO at 640 (640x480 images; EoMT's 200 queries, 133
panoptic / 80 instance classes, mask logits at 160x160): panoptic queries tile the image into 30
segments; instance queries are blobs of 1-30 low-resolution pixels' radius, of which the top 100
(query, class) pairs are kept. Times are per image, the best of `--repeats` passes (the machine
may be shared: compare the ratios, which are measured side by side in the same run).

- pipeline: `evaluate()` with a stand-in network (a `--model` forward at `--network-size` px for
  its cost, default the tiny EoMT at 160 px, about a metric update's cost on a CPU; it hands on
  the synthetic logits), per stage (forward, post-processing, transfer to the host,
  metric update) and in total, inline and pipelined (metric work in a background thread);
- panoptic: post-processing; PQ statistics per image; offline `pq_compute` from PNG + JSON on
  one core against panopticapi (and hotcoco, if installed), results compared;
- instance: post-processing against the release's (`--reference`: a checkout of the authors'
  code, run beside ours on the same logits, outputs compared); the metric update (RLE + record)
  against pycocotools' encode; offline AP from a results JSON, pycocotools against hotcoco;
- semantic: sliding windows + scores + merge + mIoU update, with random logits.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # hotcoco on one core, as the others

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

from eomt.config import compose
from eomt.errors import user_errors
from eomt.evaluation import evaluate, to_host
from eomt.inference import InstancePredictor, PanopticPredictor, SemanticPredictor
from eomt.inference.resize import letterbox
from eomt.metrics import InstanceEvaluator, PanopticEvaluator, SemanticEvaluator, pq_compute
from eomt.metrics.instance import ap_compute, encode_masks
from eomt.metrics.panoptic import id_to_rgb
from eomt.model import build_model

PANOPTIC_CLASSES, NUM_THINGS, INSTANCE_CLASSES, QUERIES = 133, 80, 80, 200
ORIG, CROP = (480, 640), (640, 640)


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def best_seconds(work: Callable[[], object], repeats: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        work()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def best_interleaved(works: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best time of each, their passes taking turns (a shared machine's load hits all alike)."""
    for work in works.values():
        work()  # warm-up
    best = dict.fromkeys(works, float("inf"))
    for _ in range(repeats):
        for name, work in works.items():
            sync()
            start = time.perf_counter()
            work()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def on_host(tree):
    """`tree` with its tensors on the CPU, copies finished."""
    moved, event = to_host(tree)
    if event is not None:
        event.synchronize()
    return moved


def nearest_seed(seeds: np.ndarray, h: int, w: int) -> np.ndarray:
    """(h, w) index of the nearest seed (normalised (y, x) in [0, 1]): a partition into cells."""
    ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    d = (ys[None] - seeds[:, :1, None]) ** 2 + (xs[None] - seeds[:, 1:, None]) ** 2
    return d.argmin(0)


def panoptic_case(rng: np.random.Generator, segments: int = 30) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Logits (Q,160,160), (Q,C+1) whose confident queries tile the image; the matching ground truth."""
    box = letterbox(torch.zeros((3, *ORIG), dtype=torch.uint8), CROP)
    seeds = rng.random((segments, 2))
    labels = rng.integers(PANOPTIC_CLASSES, size=segments)
    cells = torch.from_numpy(nearest_seed(seeds, box.resized_size[0] // 4, box.resized_size[1] // 4))
    mask_logits = torch.full((QUERIES, CROP[0] // 4, CROP[1] // 4), -8.0)
    region = mask_logits[:segments, : cells.shape[0], : cells.shape[1]]
    region[:] = torch.where(cells[None] == torch.arange(segments)[:, None, None], 8.0, -8.0)
    mask_logits += torch.randn_like(mask_logits)
    class_logits = torch.randn(QUERIES, PANOPTIC_CLASSES + 1)
    class_logits[:, -1] += 6  # most queries: no object
    class_logits[torch.arange(segments), torch.from_numpy(labels)] += 12
    ids = rng.choice(np.arange(1, 2**24), segments, replace=False)  # COCO-like 24-bit PNG ids
    gt = ids[nearest_seed(seeds, *ORIG)].astype(np.int32)
    gt[:, :8] = 0  # some void
    segments_info = [
        {"id": int(ids[i]), "category_id": int(labels[i]), "iscrowd": 0, "area": int((gt == ids[i]).sum())}
        for i in range(segments)
        if (gt == ids[i]).any()
    ]
    return mask_logits, class_logits, {"id_map": torch.from_numpy(gt), "segments": segments_info}


def instance_case(rng: np.random.Generator, objects: int = 12) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Blob logits for every query (the first `objects` confident and matching a ground truth)."""
    h, w = CROP[0] // 4, CROP[1] // 4
    rh, rw = ORIG[0] // 4, ORIG[1] // 4
    ys, xs = torch.arange(h).float()[:, None], torch.arange(w).float()[None]
    cy, cx = torch.from_numpy(rng.random(QUERIES) * rh), torch.from_numpy(rng.random(QUERIES) * rw)
    radius = torch.from_numpy(1 + rng.random(QUERIES) * 29)
    d = ((ys[None] - cy[:, None, None].float()) ** 2 + (xs[None] - cx[:, None, None].float()) ** 2) / radius[
        :, None, None
    ].float() ** 2
    mask_logits = (4 * (1 - d)).clamp(min=-10) + 0.5 * torch.randn(QUERIES, h, w)
    class_logits = torch.randn(QUERIES, INSTANCE_CLASSES + 1)
    labels = rng.integers(INSTANCE_CLASSES, size=objects)
    class_logits[torch.arange(objects), torch.from_numpy(labels)] += 8
    truth = []
    full = F.interpolate(mask_logits[None, :objects], size=CROP, mode="bilinear")[0, :, : ORIG[0], : ORIG[1]]
    for k in range(objects):
        rle = mask_utils.encode(np.asfortranarray((full[k] > 0.5).numpy().astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        truth.append(
            {
                "category_id": int(labels[k]),
                "segmentation": rle,
                "area": int(mask_utils.area(rle)),
                "iscrowd": 0,
            }
        )
    return mask_logits, class_logits, truth


class StandIn(nn.Module):
    """A network's forward (its cost) returning the synthetic logits queued for the batch; with `wait_ms`,
    a wait of that long per image instead, the GIL released, as a host waits on an accelerator."""

    def __init__(
        self,
        logits: list[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        model: str,
        size: int,
        wait_ms: float = 0.0,
    ):
        super().__init__()
        cfg = compose([f"model={model}", "model.pretrained=false", f"model.img_size=[{size},{size}]"])
        self.network = build_model(cfg.model).to(device).eval()
        self.size = size
        self.img_size, self.num_blocks = CROP, self.network.num_blocks
        self.logits, self.position, self.wait_ms = logits, 0, wait_ms

    def forward(self, images: torch.Tensor):
        if self.wait_ms:
            time.sleep(self.wait_ms * len(images) / 1000)
        else:
            self.network(
                F.interpolate(images, size=(self.size, self.size)) if self.size != CROP[0] else images
            )
        batch = [self.logits[(self.position + i) % len(self.logits)] for i in range(len(images))]
        self.position += len(images)
        masks, classes = (torch.stack(x).to(images.device) for x in zip(*batch, strict=True))
        return [masks], [classes]


def sample_of(image_id: int, task: str, truth, device_input) -> dict:
    sample = {
        "image_id": image_id,
        "orig_size": ORIG,
        "file_name": f"{image_id:06d}.jpg",
        "image": None,  # prepared already: "input"
        "input": device_input,
    }
    sample["panoptic" if task == "panoptic" else "instances"] = truth
    return sample


def pipeline_section(task: str, cases, predictor, make_evaluator, device, args) -> None:
    """Per-image stage times and evaluate()'s total, inline and pipelined, for one task."""
    repeats = args.repeats
    model = StandIn([(m, c) for m, c, _ in cases], device, args.model, args.network_size, args.wait_ms)
    prepared = letterbox(torch.zeros((3, *ORIG), dtype=torch.uint8), CROP)
    samples = [sample_of(i, task, truth, prepared) for i, (_, _, truth) in enumerate(cases)]
    loader = [samples[i : i + 2] for i in range(0, len(samples), 2)]
    n = len(samples)

    def forward_only():
        for batch in loader:
            model(predictor._batch(model, [s["input"] for s in batch]))
        sync()

    predictions = []

    def predict():
        predictions.clear()
        for batch in loader:
            predictions.append(predictor(model, [s["input"] for s in batch]))
        sync()

    def transfer():
        for p in predictions:
            host, event = to_host(p)
            if event is not None:
                event.synchronize()

    host_predictions = []

    def metric():
        evaluator = make_evaluator()
        for p, batch in zip(host_predictions, loader, strict=True):
            evaluator.update(p, batch)

    predict()
    host_predictions[:] = [on_host(p) for p in predictions]
    filled = make_evaluator()
    for p, batch in zip(host_predictions, loader, strict=True):
        filled.update(p, batch)

    def run(pipeline: bool):
        return lambda: evaluate(model, loader, predictor, make_evaluator(), progress=False, pipeline=pipeline)

    times = best_interleaved(
        {
            "forward": forward_only,
            "predict": predict,
            "transfer": transfer,
            "metric": metric,
            "compute": filled.compute,
            "inline": run(False),
            "pipelined": run(True),
        },
        repeats,
    )
    forward, total_predict, move, update, finish, inline, pipelined = (
        times[k] / n for k in ("forward", "predict", "transfer", "metric", "compute", "inline", "pipelined")
    )
    inline, pipelined = inline - finish, pipelined - finish  # the loop alone: compute() runs once, after it
    stages = {
        "forward": forward,
        "post-processing": total_predict - forward,
        "transfer": move,
        "metric update": update,
    }
    print(
        f"  evaluate() per image ({device}, network: "
        + (
            f"a {args.wait_ms:g} ms wait per image"
            if args.wait_ms
            else f"{args.model} at {args.network_size} px"
        )
        + f", batch 2, {n} images; compute() after the loop left out):"
    )
    print("    " + "  ".join(f"{k} {1000 * v:.1f} ms" for k, v in stages.items()))
    slowest = max(forward + stages["post-processing"] + move, update)
    print(
        f"    inline {1000 * inline:.1f} ms   pipelined {1000 * pipelined:.1f} ms   "
        f"(sum of stages {1000 * sum(stages.values()):.1f}, slowest side {1000 * slowest:.1f}; "
        f"pipelined/inline {pipelined / inline:.2f})"
    )


# --------------------------------------------------------------------------------------------- panoptic


def write_panoptic(folder: Path, name: str, maps, segment_lists, category_ids) -> Path:
    (folder / name).mkdir(parents=True)
    annotations = []
    for image_id, (id_map, segments) in enumerate(zip(maps, segment_lists, strict=True)):
        file_name = f"{image_id:06d}.png"
        Image.fromarray(id_to_rgb(np.asarray(id_map))).save(folder / name / file_name)
        segments = [{**s, "category_id": category_ids[s["category_id"]]} for s in segments]
        annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments})
    categories = [
        {"id": c, "name": f"c{c}", "isthing": int(i < NUM_THINGS)} for i, c in enumerate(category_ids)
    ]
    path = folder / f"{name}.json"
    path.write_text(
        json.dumps(
            {
                "annotations": annotations,
                "categories": categories,
                "images": [
                    {"id": i, "file_name": f"{i:06d}.jpg", "height": ORIG[0], "width": ORIG[1]}
                    for i in range(len(maps))
                ],
            }
        )
    )
    return path


def panoptic_offline(rng: np.random.Generator, count: int, repeats: int) -> None:
    from panopticapi.evaluation import pq_compute_single_core

    predictor = PanopticPredictor(thing_classes=range(NUM_THINGS))
    box = letterbox(torch.zeros((3, *ORIG), dtype=torch.uint8), CROP)
    cases = [panoptic_case(rng) for _ in range(count)]
    predictions = [predictor._predict(_Logits(m, c), [box], False)[0][0] for m, c, _ in cases]
    category_ids = list(range(1, 2 * PANOPTIC_CLASSES, 2))  # COCO-like: not contiguous
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gt_json = write_panoptic(
            tmp, "gt", [t["id_map"] for _, _, t in cases], [t["segments"] for _, _, t in cases], category_ids
        )
        pred_json = write_panoptic(
            tmp,
            "pred",
            [p["id_map"] for p in predictions],
            [[{"id": s["id"], "category_id": s["category_id"]} for s in p["segments"]] for p in predictions],
            category_ids,
        )
        gt, pred = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
        pairs = list(zip(gt["annotations"], pred["annotations"], strict=True))
        categories = {c["id"]: c for c in gt["categories"]}

        def reference():
            with contextlib.redirect_stdout(io.StringIO()):
                stat = pq_compute_single_core(0, pairs, str(tmp / "gt"), str(tmp / "pred"), categories)
            result = {}
            for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
                result[name], _ = stat.pq_average(categories, isthing)
            return result

        results = {"panopticapi": reference, "ours": lambda: pq_compute(gt_json, pred_json, num_workers=1)}
        with contextlib.suppress(ImportError):
            from hotcoco.panoptic import pq_compute as hotcoco_pq

            def hotcoco_run():
                with contextlib.redirect_stdout(io.StringIO()):
                    return hotcoco_pq(str(gt_json), str(pred_json))

            results["hotcoco"] = hotcoco_run
        times = {name: t / count for name, t in best_interleaved(results, repeats).items()}
        outputs = {name: fn() for name, fn in results.items()}
    expected = outputs["panopticapi"]
    print(f"  offline pq_compute, PNG + JSON, one core, {count} images:")
    for name, seconds in times.items():
        same = all(
            abs(outputs[name][g][k] - expected[g][k]) <= 1e-12
            for g in ("All", "Things", "Stuff")
            for k in ("pq", "sq", "rq")
        ) and all(outputs[name][g]["n"] == expected[g]["n"] for g in ("All", "Things", "Stuff"))
        print(
            f"    {name:12s} {1000 * seconds:6.1f} ms/image  {times['panopticapi'] / seconds:5.2f}x panopticapi"
            f"  {'identical' if same else 'DIFFERENT'} (PQ {100 * outputs[name]['All']['pq']:.3f})"
        )


class _Logits(nn.Module):
    """A network stand-in that returns fixed logits (post-processing benchmarks)."""

    def __init__(self, mask_logits: torch.Tensor, class_logits: torch.Tensor):
        super().__init__()
        self.img_size = CROP
        self.outputs = ([mask_logits[None]], [class_logits[None]])

    def forward(self, images):
        return self.outputs


def panoptic_section(args, rng, device) -> None:
    print("panoptic, COCO 640:")
    cases = [panoptic_case(rng) for _ in range(args.images)]
    predictor = PanopticPredictor(thing_classes=range(NUM_THINGS), precision=args.precision)
    box = letterbox(torch.zeros((3, *ORIG), dtype=torch.uint8), CROP)
    logits = [(m.to(device), c.to(device)) for m, c, _ in cases]
    post = best_seconds(
        lambda: [predictor._predict(_Logits(m, c), [box], False) for m, c in logits], args.repeats
    )
    predictions = [predictor._predict(_Logits(m, c), [box], False)[0][0] for m, c in logits]
    predictions = [on_host(p) for p in predictions]
    samples = [{"image_id": i, "panoptic": t} for i, (_, _, t) in enumerate(cases)]
    evaluator = PanopticEvaluator(num_classes=PANOPTIC_CLASSES, thing_classes=range(NUM_THINGS))
    update = best_seconds(lambda: evaluator.update(predictions, samples), args.repeats)
    kept = np.mean([len(p["segments"]) for p in predictions])
    print(f"  post-processing {1000 * post / args.images:.1f} ms/image ({device}, {kept:.0f} segments)")
    print(f"  PQ statistics (metric update, CPU) {1000 * update / args.images:.1f} ms/image")
    if args.offline_images:
        panoptic_offline(rng, args.offline_images, args.repeats)
    pipeline_section(
        "panoptic",
        cases,
        predictor,
        lambda: PanopticEvaluator(num_classes=PANOPTIC_CLASSES, thing_classes=range(NUM_THINGS)),
        device,
        args,
    )


# --------------------------------------------------------------------------------------------- instance


def release_instance_postprocessing(reference: Path) -> Callable:
    """The release's instance `eval_step` (training/mask_classification_instance.py) and the
    letterbox helpers it calls (training/lightning_module.py), run on given logits: their source,
    compiled here without Lightning (the network call returns the logits; metrics are captured)."""
    wanted = {
        "training/mask_classification_instance.py": ["eval_step"],
        "training/lightning_module.py": [
            "revert_resize_and_pad_logits_instance_panoptic",
            "scale_img_size_instance_panoptic",
        ],
    }
    methods = {}
    for file, names in wanted.items():
        for node in ast.walk(ast.parse((reference / file).read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in names:
                node.decorator_list = []
                namespace = {"torch": torch, "F": F, "interpolate": F.interpolate}
                exec(compile(ast.Module([node], []), file, "exec"), namespace)
                methods[node.name] = namespace[node.name]
    missing = {n for names in wanted.values() for n in names} - set(methods)
    if missing:
        raise FileNotFoundError(
            f"--reference {reference} lacks {sorted(missing)}: pass a checkout of tue-mps/eomt"
        )

    class Release:
        img_size, eval_top_k_instances = CROP, 100

        def __init__(self, mask_logits, class_logits):
            self.outputs, self.device = ([mask_logits], [class_logits]), mask_logits.device

        def __call__(self, images):
            return self.outputs

        def resize_and_pad_imgs_instance_panoptic(self, imgs):  # the input side is not timed
            return None

        def update_metrics_instance(self, preds, targets, block):
            self.predictions = preds

    for name, method in methods.items():
        setattr(Release, name, method)

    def run(mask_logits, class_logits, orig_sizes):
        release = Release(mask_logits, class_logits)
        images = [torch.zeros((3, *size), dtype=torch.uint8) for size in orig_sizes]
        targets = [{"masks": None, "labels": None, "is_crowd": None} for _ in orig_sizes]
        release.eval_step((images, targets))
        return release.predictions

    return run


def instance_section(args, rng, device) -> None:
    print("instance, COCO 640 (top 100 of 200 queries x 80 classes):")
    cases = [instance_case(rng) for _ in range(args.images)]
    predictor = InstancePredictor(topk=100, precision=args.precision)
    box = letterbox(torch.zeros((3, *ORIG), dtype=torch.uint8), CROP)
    logits = [(m.to(device), c.to(device)) for m, c, _ in cases]
    works = {"ours": lambda: [predictor._predict(_Logits(m, c), [box], False) for m, c in logits]}
    if args.reference:
        release = release_instance_postprocessing(args.reference)
        works["release"] = lambda: [release(m[None], c[None], [ORIG]) for m, c in logits]
    times = best_interleaved(works, args.repeats)
    ours = times["ours"]
    predictions = [on_host(predictor._predict(_Logits(m, c), [box], False)[0][0]) for m, c in logits]
    line = f"  post-processing ours {1000 * ours / args.images:.1f} ms/image ({device})"
    if args.reference:
        theirs = times["release"]
        same = True
        for (m, c), mine in zip(logits, predictions, strict=True):
            other = release(m[None], c[None], [ORIG])[0]
            # both keep the same top-k set in topk's (unsorted) order
            same &= torch.equal(mine["masks"], other["masks"].cpu()) and torch.equal(
                mine["labels"], other["labels"].cpu()
            )
            same &= torch.allclose(mine["scores"], other["scores"].cpu(), rtol=1e-6, atol=0)
        line += (
            f", release's {1000 * theirs / args.images:.1f}: {theirs / ours:.1f}x "
            f"(masks and labels {'identical' if same else 'DIFFERENT'}, scores to 1e-6)"
        )
    print(line)
    masks = [p["masks"] for p in predictions]
    samples = [{"image_id": i, "orig_size": ORIG, "instances": t} for i, (_, _, t) in enumerate(cases)]

    def pycocotools_encode():
        return [
            mask_utils.encode(np.asfortranarray(m.numpy().transpose(1, 2, 0).astype(np.uint8))) for m in masks
        ]

    times = best_interleaved(
        {
            "pycocotools": pycocotools_encode,
            "ours": lambda: [encode_masks(p["masks"], p.get("boxes")) for p in predictions],
        },
        args.repeats,
    )
    reference, encode = times["pycocotools"], times["ours"]
    same = pycocotools_encode() == [encode_masks(p["masks"], p.get("boxes")) for p in predictions]
    evaluator = InstanceEvaluator(num_classes=INSTANCE_CLASSES)
    update = best_seconds(lambda: evaluator.update(predictions, samples), args.repeats)
    print(
        f"  RLE encoding {1000 * encode / args.images:.1f} ms/image, pycocotools' encode "
        f"{1000 * reference / args.images:.1f}: {reference / encode:.1f}x ({'identical' if same else 'DIFFERENT'} strings); "
        f"metric update (RLE + record) "
        f"{1000 * update / args.images:.1f} ms/image"
    )
    if args.offline_images:
        instance_offline(rng, args.offline_images, args.repeats, predictor, box)
    pipeline_section(
        "instance",
        cases,
        predictor,
        lambda: InstanceEvaluator(num_classes=INSTANCE_CLASSES),
        device,
        args,
    )


def instance_offline(rng, count: int, repeats: int, predictor, box) -> None:
    images, annotations, results = [], [], []
    for image_id in range(1, count + 1):
        mask_logits, class_logits, truth = instance_case(rng)
        images.append({"id": image_id, "height": ORIG[0], "width": ORIG[1], "file_name": f"{image_id}.jpg"})
        for ann in truth:
            annotations.append(
                {
                    **ann,
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": ann["category_id"] + 1,
                }
            )
        prediction = predictor._predict(_Logits(mask_logits, class_logits), [box], False)[0][0]
        for rle, label, score in zip(
            encode_masks(prediction["masks"], prediction.get("boxes")),
            prediction["labels"].tolist(),
            prediction["scores"].tolist(),
            strict=True,
        ):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": label + 1,
                    "score": score,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                }
            )
    categories = [{"id": c + 1, "name": f"c{c}"} for c in range(INSTANCE_CLASSES)]
    with tempfile.TemporaryDirectory() as tmp:
        gt_json, results_json = Path(tmp) / "gt.json", Path(tmp) / "results.json"
        gt_json.write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories})
        )
        results_json.write_text(json.dumps(results))
        backends = ["pycocotools"]
        with contextlib.suppress(ImportError):
            import hotcoco  # noqa: F401

            backends.append("hotcoco")
        runs = {b: (lambda b=b: ap_compute(gt_json, results_json, backend=b)) for b in backends}
        times = {b: t / count for b, t in best_interleaved(runs, repeats).items()}
        outputs = {b: ap_compute(gt_json, results_json, backend=b) for b in backends}
    print(f"  offline AP from a results JSON, one core, {count} images, {len(results)} detections:")
    for b in backends:
        same = json.dumps(outputs[b]) == json.dumps(outputs["pycocotools"])
        print(
            f"    {b:12s} {1000 * times[b]:6.1f} ms/image  {times['pycocotools'] / times[b]:5.2f}x pycocotools"
            f"  {'identical' if same else 'DIFFERENT'} (AP {100 * outputs[b]['AP']:.3f})"
        )


# --------------------------------------------------------------------------------------------- semantic


class RandomLogits(nn.Module):
    """Stand-in network: random EoMT-shaped outputs (the network's cost is not measured here)."""

    def __init__(self, img_size: int, num_queries: int, num_classes: int):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.num_queries, self.num_classes = num_queries, num_classes
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor):
        b, _, h, w = images.shape
        masks = torch.randn(b, self.num_queries, h // 4, w // 4, device=images.device)
        classes = torch.randn(b, self.num_queries, self.num_classes + 1, device=images.device)
        return [masks], [classes]


def semantic_section(args, device) -> None:
    model = RandomLogits(512, num_queries=100, num_classes=150).to(device)
    predictor = SemanticPredictor()
    images = [torch.randint(0, 256, (3, 512, 683), dtype=torch.uint8) for _ in range(args.images)]
    inputs = [predictor.prepare(image, model.img_size) for image in images]  # the loader's workers' part
    targets = [{"image_id": i, "semantic": torch.randint(0, 150, (512, 683))} for i in range(args.images)]
    evaluator = SemanticEvaluator(num_classes=150)
    predictions = []
    post = best_seconds(
        lambda: predictions.__setitem__(slice(None), [predictor(model, [x])[0] for x in inputs]), args.repeats
    )
    host = [on_host(p) for p in predictions]
    update = best_seconds(
        lambda: [evaluator.update([p], [t]) for p, t in zip(host, targets, strict=True)], args.repeats
    )
    print(f"semantic, ADE20K 512 (512x683 images, 2 windows each, random logits, {device}):")
    print(
        f"  windows + scores + merge {1000 * post / args.images:.1f} ms/image; "
        f"mIoU update {1000 * update / args.images:.1f} ms/image"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=4, help="images per in-memory measurement")
    parser.add_argument(
        "--offline-images", type=int, default=20, help="images of the offline tools (0: skip)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", type=Path, help="a checkout of the authors' release (tue-mps/eomt)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: per-core figures)")
    parser.add_argument("--tasks", default="panoptic,instance,semantic")
    parser.add_argument("--model", default="tiny", help="model group of the stand-in network's forward")
    parser.add_argument(
        "--precision", default="fp32", help="autocast of the forward on CUDA (bf16|fp16|fp32)"
    )
    parser.add_argument(
        "--wait-ms",
        type=float,
        default=0.0,
        help="the stand-in network waits this long per image instead (GIL released: an accelerator's forward)",
    )
    parser.add_argument(
        "--network-size",
        type=int,
        default=160,
        help="the stand-in network's input (640: its cost at the crop)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tasks = args.tasks.split(",")
    with torch.inference_mode():
        if "panoptic" in tasks:
            panoptic_section(args, rng, device)
        if "instance" in tasks:
            instance_section(args, rng, device)
        if "semantic" in tasks:
            semantic_section(args, device)


if __name__ == "__main__":
    with user_errors():
        main()
