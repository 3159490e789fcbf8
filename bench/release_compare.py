"""Train this project and the authors' release from one random start on the same generated data,
score both with our evaluate.py and print the per-class PQ of each, seed after seed, then the paired
difference per class with its 95% interval (an interval that holds 0: the codes do not differ).

    python bench/release_compare.py --release /work/wt/release --release-python /work/wt/relvenv/bin/python \
        --out /tmp/compare --seeds 0 1 2 3 4 5
    ... --train 100 --size 64 --steps 300 --lr 1e-3 --queries 50 --points 1024   # ~5x cheaper

`--release`: a checkout of github.com/tue-mps/eomt; `--release-python`: a Python that imports its
requirements (lightning, jsonargparse, torchmetrics, transformers, wandb) and this project's
packages (torch, torchvision, timm, pycocotools), e.g. a venv holding the former plus a `.pth` file
naming this project's site-packages. The defaults are the recipe of issue 23 (200 training images
at 128 px, batch 4, lr 3e-4, warmups 20/40, 600 steps, 2048 points, 200 queries, masked attention
and annealing off, fp32), on a timm `test_vit` backbone that both codes build. The data are our
generated COCO-layout zips (things: disc, box, triangle, class 0 with crowd regions; stuff: sky,
ground) with category ids rewritten to 1..5, things first, so that the release's fixed COCO id
table (1 -> 0, 2 -> 1, ...) gives our contiguous ids. Both codes start from the same random weights
(saved in our format and in the release's Lightning layout), train without compile and with 0
loader workers, and are scored by our evaluate.py on the same validation images; the release's last
checkpoint reaches it through our weight conversion (eomt.model.weight_formats). Per-step losses
of both go to <out>/s<seed>/{ours,release}/losses.csv. Each training process gets `--threads`
torch threads (1: on a shared 2-core machine two threads per process ran 5-10x slower). On this
machine, shared, the defaults take about 7 minutes per code and seed, the cheaper line about 2.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eomt.config import compose  # noqa: E402
from eomt.data.synthetic import CLASS_NAMES, THINGS, generate  # noqa: E402
from eomt.model import build_model  # noqa: E402
from eomt.model.weight_formats import AUTHORS_DINOV2  # noqa: E402

# Our generated categories -> ids the release's COCO CLASS_MAPPING sends to our contiguous ids.
RELEASE_IDS = {name: i + 1 for i, name in enumerate(CLASS_NAMES)}


def make_data(out: Path, num_train: int, num_val: int, size: int, seed: int) -> Path:
    """Generated COCO-layout zips with category ids 1..C in our contiguous order (things first)."""
    data = out / "data"
    if (data / "panoptic_annotations_trainval2017.zip").is_file():
        return data
    generate("coco", data, num_train, num_val, (size, size), seed)
    path = data / "panoptic_annotations_trainval2017.zip"
    with zipfile.ZipFile(path) as src:
        members = {info.filename: src.read(info) for info in src.infolist()}
    for name, payload in list(members.items()):
        if name.endswith(".json"):
            annotations = json.loads(payload)
            old_to_new = {c["id"]: RELEASE_IDS[c["name"]] for c in annotations["categories"]}
            for category in annotations["categories"]:
                category["id"] = old_to_new[category["id"]]
            for annotation in annotations["annotations"]:
                for segment in annotation["segments_info"]:
                    segment["category_id"] = old_to_new[segment["category_id"]]
            members[name] = json.dumps(annotations).encode()
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w") as dst:
        for name, payload in members.items():
            dst.writestr(name, payload, compress_type=zipfile.ZIP_STORED)
    os.replace(tmp, path)
    return data


def our_overrides(args: argparse.Namespace, data: Path) -> list[str]:
    epochs = args.steps // (args.train // args.batch)
    return [
        "dataset=coco",
        f"dataset.root={data}",
        f"dataset.panoptic.num_classes={len(CLASS_NAMES)}",
        f"dataset.panoptic.class_names=[{','.join(CLASS_NAMES)}]",
        f"dataset.panoptic.thing_classes=[{','.join(str(i) for i in range(len(THINGS)))}]",
        f"dataset.panoptic.epochs={epochs}",
        f"dataset.crop_size=[{args.size},{args.size}]",
        f"dataset.scale_range=[{args.scale_range[0]},{args.scale_range[1]}]",
        "model=tiny",
        f"model.backbone={args.backbone}",
        "model.backbone_kwargs=null",
        "model.masked_attn=false",
        f"model.num_blocks={args.num_blocks}",
        f"task.num_queries={args.queries}",
        "trainer.device=cpu",
        "trainer.precision=fp32",
        "trainer.compile=false",
        "trainer.num_workers=0",
        f"trainer.batch_size={args.batch}",
        "trainer.log_every_steps=1",
        f"trainer.ckpt_every_steps={args.steps}",
        "eval.every_epochs=0",
        "eval.num_workers=0",
        f"schedule.lr={args.lr}",
        f"schedule.warmup_steps={args.warmup[0]}",
        f"schedule.backbone_warmup_steps={args.warmup[1]}",
        "schedule.annealing=false",
        f"loss.num_points={args.points}",
    ]


def save_start(args: argparse.Namespace, overrides: list[str], seed: int, out: Path) -> tuple[Path, Path]:
    """The same random weights in our format and in the release's (Lightning `state_dict`)."""
    torch.manual_seed(seed)
    model = build_model(compose(overrides).model)
    state = model.state_dict()
    ours, release = out / "start_ours.pt", out / "start_release.ckpt"
    torch.save({"model": state}, ours)
    release_state = AUTHORS_DINOV2.from_ours(state)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    release_state["network.encoder.pixel_mean"] = mean.reshape(1, -1, 1, 1)
    release_state["network.encoder.pixel_std"] = std.reshape(1, -1, 1, 1)
    torch.save({"state_dict": release_state}, release)
    return ours, release


THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # set by --threads


def run(cmd: list[str], cwd: Path, log: Path) -> None:
    with open(log, "w") as f:
        result = subprocess.run(
            cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **THREADS}
        )
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} ... failed (exit {result.returncode}); see {log}")


def train_ours(args, overrides: list[str], start: Path, seed: int, run_dir: Path) -> Path:
    cmd = [sys.executable, "train.py", *overrides, f"seed={seed}", f"trainer.init_from={start}"]
    cmd += [f"trainer.max_steps={args.steps}", f"hydra.run.dir={run_dir}"]
    log = run_dir.parent / f"{run_dir.name}.log"
    run(cmd, ROOT, log)
    with open(run_dir / "losses.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["step", "loss"])
        for step, loss in re.findall(r"step (\d+)/\d+ +loss ([0-9.eE+-]+)", log.read_text()):
            writer.writerow([int(step) - 1, loss])  # 0-based, as Lightning counts
    return run_dir


RELEASE_CONFIG = """\
seed_everything: {seed}
compile_disabled: true
trainer:
  accelerator: cpu
  devices: 1
  precision: 32
  max_steps: {steps}
  max_epochs: {epochs}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  default_root_dir: {run_dir}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args:
      save_dir: {run_dir}
model:
  class_path: training.mask_classification_panoptic.MaskClassificationPanoptic
  init_args:
    attn_mask_annealing_enabled: false
    lr: {lr}
    warmup_steps: [{warmup0}, {warmup1}]
    num_points: {points}
    ckpt_path: {start}
    network:
      class_path: models.eomt.EoMT
      init_args:
        num_q: {queries}
        num_blocks: {num_blocks}
        masked_attn_enabled: false
        encoder:
          class_path: models.vit.ViT
          init_args:
            backbone_name: {backbone}
data:
  class_path: datasets.coco_panoptic.COCOPanoptic
  init_args:
    path: {data}
    stuff_classes: {stuff}
    num_workers: 0
    batch_size: {batch}
    img_size: [{size}, {size}]
    num_classes: {num_classes}
    scale_range: [{scale0}, {scale1}]
"""


def train_release(args, data: Path, start: Path, seed: int, run_dir: Path) -> Path:
    """Train with the release's `main.py fit`; our-format state dict of its last checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "config.yaml"
    config.write_text(
        RELEASE_CONFIG.format(
            seed=seed,
            steps=args.steps,
            epochs=args.steps // (args.train // args.batch),
            run_dir=run_dir,
            lr=args.lr,
            warmup0=args.warmup[0],
            warmup1=args.warmup[1],
            points=args.points,
            start=start,
            queries=args.queries,
            num_blocks=args.num_blocks,
            backbone=args.backbone,
            data=data,
            stuff=list(range(len(THINGS), len(CLASS_NAMES))),
            batch=args.batch,
            size=args.size,
            num_classes=len(CLASS_NAMES),
            scale0=args.scale_range[0],
            scale1=args.scale_range[1],
        )
    )
    run(
        [args.release_python, "main.py", "fit", "-c", str(config)],
        args.release,
        run_dir.parent / "release.log",
    )
    last = max(glob.glob(f"{run_dir}/**/*.ckpt", recursive=True), key=os.path.getmtime)
    weights = run_dir / "weights.ckpt"
    # The release's own Python reads its Lightning file (hyperparameters hold pickled modules) and
    # keeps only the state dict, which our loader then reads with weights_only=True.
    extract = (
        "import sys, torch; c = torch.load(sys.argv[1], map_location='cpu', weights_only=False); "
        "torch.save({'state_dict': c['state_dict']}, sys.argv[2])"
    )
    run([args.release_python, "-c", extract, last, str(weights)], args.release, run_dir / "extract.log")
    losses = sorted(glob.glob(f"{run_dir}/**/metrics.csv", recursive=True))
    if losses:
        with open(losses[-1]) as f, open(run_dir / "losses.csv", "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["step", "loss"])
            for row in csv.DictReader(f):
                if row.get("losses/train_loss_total"):
                    writer.writerow([row["step"], row["losses/train_loss_total"]])
    return weights


def evaluate(overrides: list[str], checkpoint: Path, out_dir: Path) -> dict:
    cmd = [sys.executable, "evaluate.py", *overrides, f"checkpoint={checkpoint}", f"hydra.run.dir={out_dir}"]
    run(cmd, ROOT, out_dir.parent / f"{out_dir.name}.log")
    return json.loads((out_dir / "metrics.json").read_text())


def pq_row(metrics: dict) -> list[float]:
    panoptic = metrics["details"]
    per_class = panoptic["per_class"]
    row = [100 * panoptic["All"]["pq"]]
    for c in range(len(CLASS_NAMES)):
        entry = per_class.get(str(c), per_class.get(c))
        row.append(float("nan") if entry is None else 100 * entry["pq"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--release", type=Path, required=True, help="checkout of tue-mps/eomt")
    parser.add_argument("--release-python", default=sys.executable, help="Python with the release's deps")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--codes", nargs="+", default=["ours", "release"], choices=["ours", "release"])
    parser.add_argument("--train", type=int, default=200, help="generated training images")
    parser.add_argument("--val", type=int, default=120, help="generated validation images")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600, help="a multiple of train // batch")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, nargs=2, default=[20, 40])
    parser.add_argument("--points", type=int, default=2048)
    parser.add_argument("--backbone", default="test_vit", help="a timm ViT both codes can build")
    parser.add_argument("--num-blocks", type=int, default=2)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--scale-range", type=float, nargs=2, default=[0.5, 2.0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    args = parser.parse_args()
    THREADS.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.steps % (args.train // args.batch):
        parser.error(f"--steps must be a multiple of the {args.train // args.batch} steps of an epoch")
    args.out.mkdir(parents=True, exist_ok=True)
    data = make_data(args.out, args.train, args.val, args.size, args.data_seed)
    overrides = our_overrides(args, data)

    header = ["seed", "code", "PQ", *CLASS_NAMES]
    print(" | ".join(f"{h:>8}" for h in header), flush=True)
    table: dict[str, list[list[float]]] = {code: [] for code in args.codes}
    for seed in args.seeds:
        seed_dir = args.out / f"s{seed}"
        seed_dir.mkdir(exist_ok=True)
        start_ours, start_release = save_start(args, overrides, seed, seed_dir)
        for code in args.codes:
            if code == "ours":
                weights = train_ours(args, overrides, start_ours, seed, seed_dir / "ours")
            else:
                weights = train_release(args, data, start_release.resolve(), seed, seed_dir / "release")
            row = pq_row(evaluate(overrides, weights, seed_dir / f"eval_{code}"))
            table[code].append(row)
            print(" | ".join([f"{seed:>8}", f"{code:>8}", *(f"{v:8.1f}" for v in row)]), flush=True)
    if len(args.seeds) > 1 and len(table) == 2:
        print(
            "paired difference ours - release over seeds (mean, 95% interval; an interval holding 0 is noise):"
        )
        for column, name in enumerate(header[2:]):
            mean, low, high = paired_interval(
                [a[column] - b[column] for a, b in zip(table["ours"], table["release"], strict=True)]
            )
            print(f"  {name:>8}: {mean:+6.1f}  [{low:+6.1f}, {high:+6.1f}]")


def paired_interval(differences: list[float]) -> tuple[float, float, float]:
    """Mean and Student-t 95% interval of paired differences (one per seed)."""
    from scipy import stats

    mean = statistics.mean(differences)
    half = stats.t.ppf(0.975, len(differences) - 1) * statistics.stdev(differences) / len(differences) ** 0.5
    return mean, mean - half, mean + half


if __name__ == "__main__":
    main()
