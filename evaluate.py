"""Evaluate a checkpoint on the validation split of its dataset.

    python evaluate.py experiment=coco_panoptic_vit_l_640 checkpoint=pytorch_model.bin dataset.root=/data/coco
    python evaluate.py checkpoint=outputs/demo     # a run directory: its newest checkpoint, its config.yaml's
        # network, dataset and task (overrides still win); a Transformers folder: its config.json
    python evaluate.py checkpoint=tue-mps/coco_panoptic_eomt_large_640 dataset.root=/data/coco  # a released
        # model (docs/model_zoo.md), fetched through the Hugging Face cache; its preset unless experiment= is given
    python evaluate.py experiment=demo runtime=openvino model_file=demo.onnx eval.cpu_precision=bf16 name=demo_ov
        # a file of python -m eomt.export in its runtime (onnxruntime | openvino | torch-export)
    torchrun --nproc_per_node 4 evaluate.py ...      # the images are split over the ranks

Prints the metrics table (PQ/SQ/RQ, mIoU, or the AP set), writes metrics.json and the first
`eval.num_overlays` [prediction | ground truth] overlays into the output directory, and with
`eval.write_predictions=true` the predictions in the task's standard format (COCO panoptic PNG +
JSON, COCO results JSON, or label PNGs with the benchmark's label ids).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from eomt import distributed
from eomt.api import load_model
from eomt.checkpoint_config import adopt_run_config, checkpoint_overrides, run_config
from eomt.config import check_config, check_overrides
from eomt.device import resolve_device
from eomt.errors import ConfigError, user_errors
from eomt.evaluation import METRICS_FILE, Evaluation
from eomt.inference.runtime import load_exported
from eomt.inference.writers import prediction_writer, write_png
from eomt.run_info import write_run_info

log = logging.getLogger("eomt.evaluate")


def load_network(cfg: DictConfig, device: torch.device) -> nn.Module:
    """The checkpoint's EoMT (runtime=torch), or the exported `model_file` in its runtime."""
    if cfg.runtime == "torch":
        if cfg.checkpoint is None:
            raise ConfigError(
                "checkpoint=... is missing: a file, run directory or released name "
                "(or runtime=onnxruntime|openvino|torch-export model_file=<exported file>)"
            )
        return load_model(cfg.model, cfg.checkpoint).to(device)
    if cfg.model_file is None:
        raise ConfigError(f"runtime={cfg.runtime} scores an exported file: add model_file=<file>")
    network = load_exported(cfg.runtime, cfg.model_file, device, cfg.eval.cpu_precision)
    if cfg.dataset.class_names is not None:
        network.metadata.check_matches(cfg.task.name, list(cfg.dataset.class_names), cfg.model_file)
    OmegaConf.update(cfg, "model.img_size", list(network.img_size))  # the loader prepares the file's size
    return network


def evaluate_checkpoint(cfg: DictConfig, out_dir: Path, overrides: list[str] | None = None) -> dict:
    """`overrides`: the command line's; given, a run directory's saved config fills what they leave open."""
    if cfg.runtime == "torch" and overrides is not None:
        adopt_run_config(cfg, overrides, cfg.checkpoint)
    check_config(cfg)
    device = resolve_device(cfg.trainer.device)
    distributed.init(device.type)
    model = load_network(cfg, device)
    evaluation = Evaluation.from_config(cfg, device)
    writers = []
    if cfg.eval.write_predictions:
        writers.append(
            prediction_writer(cfg.task.name, cfg.dataset.name, evaluation.dataset, out_dir / "predictions")
        )
    result = evaluation.run(model, run_dir=out_dir, callbacks=writers, benchmark=True)
    for writer in writers:
        writer.close()
    if distributed.is_main():
        write_run_info(cfg, out_dir)
        for image_id, overlay in result.overlays:
            write_png(out_dir / "overlays" / f"{image_id}.png", overlay.transpose(1, 2, 0))
        print(f"metrics: {out_dir / METRICS_FILE}, overlays: {out_dir / 'overlays'}")
    return result.metrics


@hydra.main(config_path="eomt/conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        with user_errors():
            hydra_cfg = HydraConfig.get()
            evaluate_checkpoint(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    # A released checkpoint's preset and a Transformers config.json are overrides, so they join the command
    # line before Hydra composes; a run directory's config.yaml is taken after (evaluate_checkpoint), its
    # name naming the output directory.
    given = sys.argv[1:]
    with user_errors():
        sys.argv[1:] = checkpoint_overrides(given)
        if added := [o for o in sys.argv[1:] if o not in given]:
            print(
                f"the checkpoint's config: {' '.join(added)} (pass experiment= to choose another)", flush=True
            )
        checkpoint = next((o.partition("=")[2] for o in given if o.startswith("checkpoint=")), None)
        saved = run_config(checkpoint)
        if saved is not None and "name" in saved and not any(o.startswith("name=") for o in given):
            sys.argv.append(f"name={saved.name}")
        check_overrides(sys.argv[1:], "evaluate")
    main()
