"""Train EoMT: `python train.py dataset=ade20k model=vit_l`, `torchrun --nproc_per_node 4 train.py ...`,
or `python train.py -m +sweep=annealing hydra/launcher=slurm`.

One readable loop: data -> model -> loss -> backward -> clip -> step, with the published recipe
(REFERENCE §2), mask annealing (§1), gradient accumulation, AMP, torch.compile, DDP, TensorBoard,
periodic atomic checkpoints and automatic resume from the run directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from eomt import distributed
from eomt.api import load_model
from eomt.checkpointing import CheckpointManager, rng_state, set_rng_state
from eomt.data import build_dataset
from eomt.data.collate import collate_train, count_skipped
from eomt.data.sampler import ResumableSampler, SeededSamples
from eomt.preemption import PreemptionHandler, ignore_in_dataloader_worker
from eomt.run_setup import AMP_DTYPES, check_config, one_line_errors, resolve_device, write_run_info
from eomt.tb_hparams import hparams_from_overrides, log_hparams
from eomt.training import annealing_probs, annealing_windows, param_groups, set_lr
from eomt.validation import Validator

log = logging.getLogger("eomt.train")


class TrainingDiverged(RuntimeError):
    pass


def batch_layout(cfg: DictConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, accumulation steps) so that micro * world * accum == batch_size."""
    total = cfg.trainer.batch_size
    micro = cfg.trainer.micro_batch_size or max(1, total // world_size)
    if total % (micro * world_size):
        raise ValueError(
            f"trainer.batch_size={total} is not a multiple of micro_batch_size={micro} x {world_size} ranks; "
            "choose trainer.micro_batch_size so that it divides"
        )
    return micro, total // (micro * world_size)


def annealing_schedule(cfg: DictConfig, model: torch.nn.Module, total_steps: int):
    """Per-step attention-mask probabilities for the query blocks, or None for models without them."""
    if not hasattr(model, "attn_mask_probs"):
        return None
    num_blocks = model.attn_mask_probs.numel()
    if not cfg.schedule.annealing:
        return lambda step: [1.0] * num_blocks
    starts, ends = annealing_windows(
        total_steps, num_blocks, cfg.schedule.anneal_starts, cfg.schedule.anneal_ends
    )
    return lambda step: annealing_probs(step, starts, ends, cfg.schedule.poly_power)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = ()):
        self.cfg = cfg
        self.run_dir = run_dir
        self.overrides = hparams_from_overrides(overrides)  # what this run sets on the command line
        self.device = resolve_device(cfg.trainer.device)
        self.env = distributed.init(self.device.type)
        self.main = distributed.is_main()
        precision = cfg.trainer.precision if self.device.type == "cuda" else "fp32"
        self.amp_dtype = AMP_DTYPES[precision]
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        if cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.micro, self.accum = batch_layout(cfg, self.env.world_size)
        self.train_set = build_dataset(cfg.dataset, cfg.task.name, "train", train=True)
        self.sampler = ResumableSampler(
            self.train_set, self.env.world_size, self.env.rank, cfg.seed, batch_size=self.micro
        )
        self.steps_per_epoch = len(self.sampler) // self.micro // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the {cfg.dataset.name} train split has {len(self.train_set)} images, fewer than one step of "
                f"trainer.batch_size={cfg.trainer.batch_size}; lower the batch size"
            )
        self.total_steps = cfg.trainer.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, cfg.trainer.max_steps or self.total_steps)

        # The bare module: saved and evaluated. Fine-tuning starts from any checkpoint eomt.api reads.
        self.model = load_model(cfg.model, cfg.trainer.init_from, cfg.trainer.skip_class_head).train()
        self.model.to(self.device)
        torch.manual_seed(cfg.seed + self.env.rank)  # ranks sample loss points and masks independently
        self.criterion = instantiate(cfg.loss).to(self.device)
        self.optimizer = torch.optim.AdamW(
            param_groups(
                self.model,
                lr=cfg.schedule.lr,
                weight_decay=cfg.schedule.weight_decay,
                layer_decay=cfg.schedule.layer_decay,
                decay_query_blocks=cfg.schedule.decay_query_blocks,
            ),
            lr=cfg.schedule.lr,
            fused=self.device.type == "cuda",
        )
        self.scaler = torch.amp.GradScaler(enabled=precision == "fp16")
        self.annealing = annealing_schedule(cfg, self.model, self.total_steps)
        self.checkpoints = CheckpointManager(run_dir / "checkpoints", cfg.trainer.keep_last)
        self.validator = Validator(cfg, self.device) if cfg.eval.every_epochs else None
        self.preemption = PreemptionHandler()
        self.step = 0
        self.validated_at = -1
        self.bad_steps = 0
        self.skipped_steps = 0
        self.epoch_skipped = 0  # corrupt files the loaders skipped this epoch
        self.history: list[dict[str, float]] = []  # this process's per-step logs, for tests and callers

        if self.env.world_size > 1:  # the ViT-Adapter baseline has BatchNorm; EoMT has none
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.forward_model = torch.compile(self.model) if cfg.trainer.compile else self.model
        if self.env.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.forward_model, device_ids=ids)

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = rng_state()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "rng": distributed.all_gather_object(rng),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def save(self) -> None:
        state = self.state_dict()  # every rank takes part in gathering the RNG states
        if self.main:
            path = self.checkpoints.save(state, self.step)
            log.info("saved %s", path)
        distributed.barrier()

    def resume(self) -> None:
        if self.cfg.trainer.resume == "never":
            return
        path = self.checkpoints.latest()
        if path is None:
            return
        state = CheckpointManager.load(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        rngs = state["rng"]
        set_rng_state(rngs[self.env.rank] if self.env.rank < len(rngs) else rngs[0])
        log.info("resumed from %s at step %d", path, self.step)

    # --- one optimisation step ---------------------------------------------------------------
    def train_step(self, micro_batches: list) -> dict[str, float] | None:
        if self.annealing is not None:
            probs = self.annealing(self.step)
            self.model.attn_mask_probs.copy_(torch.tensor(probs, dtype=self.model.attn_mask_probs.dtype))
        sched = self.cfg.schedule
        set_lr(
            self.optimizer,
            self.step,
            self.total_steps,
            sched.warmup_steps,
            sched.backbone_warmup_steps,
            sched.poly_power,
            sched.two_stage_warmup,
        )
        logs: dict[str, float] = {}
        finite = True
        for i, (images, targets) in enumerate(micro_batches):
            images = images.to(self.device, non_blocking=True).float().div_(255)
            self.epoch_skipped += count_skipped(targets)
            targets = [
                {k: t[k].to(self.device, non_blocking=True) for k in ("masks", "labels")} for t in targets
            ]
            sync = i == len(micro_batches) - 1 or self.env.world_size == 1
            no_sync = self.forward_model.no_sync if not sync else nullcontext
            with no_sync():
                autocast = torch.autocast(
                    self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
                )
                with autocast:
                    mask_logits, class_logits = self.forward_model(images)
                if not self.cfg.trainer.intermediate_losses:
                    mask_logits, class_logits = mask_logits[-1:], class_logits[-1:]
                loss, terms = self.criterion(mask_logits, class_logits, targets)
                finite &= bool(torch.isfinite(loss))
                self.scaler.scale(loss / len(micro_batches)).backward()
            for k, v in terms.items():
                logs[k] = logs.get(k, 0.0) + float(v) / len(micro_batches)
            logs["loss"] = logs.get("loss", 0.0) + float(loss.detach()) / len(micro_batches)

        if not distributed.all_true(finite):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.skipped_steps += 1
            log.warning("step %d: non-finite loss, step skipped (%d in a row)", self.step, self.bad_steps)
            if self.bad_steps >= self.cfg.trainer.max_bad_steps:
                raise TrainingDiverged(
                    f"{self.bad_steps} non-finite losses in a row at step {self.step}; lower schedule.lr, use "
                    "trainer.precision=bf16 or fp32, or check the data; the last checkpoint is in "
                    f"{self.checkpoints.folder}"
                )
            return None
        self.bad_steps = 0
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.schedule.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        logs["grad_norm"] = float(grad_norm)
        return logs

    # --- the loop ----------------------------------------------------------------------------
    def loader(self, epoch: int, start_batch: int) -> DataLoader:
        self.sampler.set_position(epoch, start_batch)
        workers = self.cfg.trainer.num_workers
        return DataLoader(
            SeededSamples(self.train_set, self.cfg.seed),
            batch_size=self.micro,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate_train,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(self.cfg.seed + epoch),
            worker_init_fn=ignore_in_dataloader_worker,
        )

    def fit(self) -> None:
        self.resume()
        self.preemption.install()
        writer = SummaryWriter(self.run_dir / "tb", purge_step=self.step) if self.main else None
        progress = tqdm(
            total=self.last_step, initial=self.step, disable=not self.main, desc="train", dynamic_ncols=True
        )
        window: dict[str, float] = {}
        window_steps, window_start = 0, time.perf_counter()
        try:
            while self.step < self.last_step:
                epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
                batches = iter(self.loader(epoch, step_in_epoch * self.accum))
                for _ in range(step_in_epoch, self.steps_per_epoch):
                    logs = self.train_step([next(batches) for _ in range(self.accum)])
                    self.step += 1
                    progress.update(1)
                    if logs is not None:
                        self.history.append({"step": self.step, **logs})
                        for k, v in logs.items():
                            window[k] = window.get(k, 0.0) + v
                        window_steps += 1
                        progress.set_postfix(loss=f"{logs['loss']:.3f}")
                    if writer is not None and (
                        self.step % self.cfg.trainer.log_every_steps == 0 or self.step == 1
                    ):
                        elapsed = time.perf_counter() - window_start
                        self.log_scalars(writer, window, window_steps, elapsed)
                        window, window_steps, window_start = {}, 0, time.perf_counter()
                    stop = self.preemption.should_stop()
                    if (
                        self.step % self.cfg.trainer.ckpt_every_steps == 0
                        or stop
                        or self.step == self.last_step
                    ):
                        self.save()
                    if stop:
                        log.info("preemption signal: checkpoint written at step %d, exiting", self.step)
                        self.preemption.finish()
                        return
                    if self.step == self.last_step:
                        break
                end_of_epoch = self.step % self.steps_per_epoch == 0
                if end_of_epoch:
                    self.report_skipped(epoch, writer)
                if self.validator and end_of_epoch and (epoch + 1) % self.cfg.eval.every_epochs == 0:
                    self.validate(writer)
            if self.validated_at != self.step:
                self.validate(writer)  # the final model is always evaluated
            distributed.check_replicas(self.model)
            self.finish(writer)
        finally:
            self.preemption.uninstall()
            progress.close()
            if writer is not None:
                writer.close()
        if self.skipped_steps:
            log.warning("%d steps were skipped for non-finite losses", self.skipped_steps)

    def finish(self, writer: SummaryWriter | None) -> None:
        """The run's row in TensorBoard's HParams tab: what it varies and its final metrics."""
        if writer is None:
            return
        record = self.validator.record if self.validator else {}
        metrics = {f"val/{k}": v for k, v in record.get("metrics", {}).items()}
        metrics.update({f"cost/{k}": record[k] for k in ("fps", "gflops", "params") if k in record})
        hparams = {"variant": self.cfg.get("variant") or "-", "model": self.cfg.model.name, **self.overrides}
        log_hparams(writer, hparams, metrics, step=self.step)

    def report_skipped(self, epoch: int, writer: SummaryWriter | None) -> None:
        skipped = int(
            distributed.all_reduce_sum_(torch.tensor(float(self.epoch_skipped), device=self.device)).item()
        )
        if skipped and self.main:
            log.warning(
                "epoch %d: %d corrupt files were skipped (see the warnings naming them)", epoch, skipped
            )
        if writer is not None:
            writer.add_scalar("data/skipped_files", skipped, self.step)
        self.epoch_skipped = 0

    def validate(self, writer: SummaryWriter | None) -> None:
        if self.validator is None:
            return
        final = self.step == self.last_step
        self.validator.run(self.model, step=self.step, writer=writer, run_dir=self.run_dir, benchmark=final)
        self.validated_at = self.step
        self.model.train()

    def log_scalars(
        self, writer: SummaryWriter, window: dict[str, float], steps: int, elapsed: float
    ) -> None:
        for k, v in window.items():
            writer.add_scalar(f"train/{k}", v / max(steps, 1), self.step)
        last_block = f"backbone.blocks.{len(self.model.backbone.blocks) - 1}"
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        for name in ("backbone.blocks.0", last_block, "heads"):
            writer.add_scalar(f"lr/{name}", lrs[name], self.step)
        if self.annealing is not None:
            for i, p in enumerate(self.model.attn_mask_probs.tolist()):
                writer.add_scalar(f"annealing/block{i}", p, self.step)
        images = steps * self.cfg.trainer.batch_size
        writer.add_scalar("perf/images_per_s", images / max(elapsed, 1e-9), self.step)
        if self.device.type == "cuda":
            writer.add_scalar("perf/peak_memory_gib", torch.cuda.max_memory_allocated() / 2**30, self.step)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    check_config(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with one_line_errors():
            trainer = Trainer(cfg, run_dir, HydraConfig.get().overrides.task)
            if trainer.main:
                write_run_info(cfg, run_dir)
            trainer.fit()
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
