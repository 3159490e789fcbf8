"""Train EoMT: `python train.py dataset=ade20k model=vit_l`, `torchrun --nproc_per_node 4 train.py ...`,
or `python train.py -m +sweep=annealing hydra/launcher=slurm`.

`build_run(cfg)` makes the parts (data, model, optimiser, schedules, checkpoints, evaluation) as
plain objects; `train(run)` is the loop: data -> model -> loss -> backward -> clip -> step, with the
published recipe (REFERENCE §2), mask annealing (§1), gradient accumulation, AMP, torch.compile,
DDP, TensorBoard, periodic atomic checkpoints and automatic resume from the run directory.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from eomt import distributed
from eomt.api import load_model
from eomt.checkpointing import CheckpointManager, TrainState
from eomt.compilation import CompileStats
from eomt.config import check_config, check_overrides
from eomt.data import build_dataset
from eomt.data.collate import collate_train, count_skipped
from eomt.data.sampler import ResumableSampler, SeededSamples
from eomt.device import AMP_DTYPES, resolve_device, training_precision
from eomt.errors import ConfigError, user_errors
from eomt.evaluation import Evaluation
from eomt.parallel import (
    UnshardedCopy,
    check_strategy,
    checkpoint_every,
    clip_grad_norm,
    gradient_sync,
    wrap_for_training,
)
from eomt.preemption import PreemptionHandler, TrainingStopped, ignore_in_dataloader_worker
from eomt.profiling import LoadMeter, bf16_peak_flops, gflops_per_image, training_mfu
from eomt.run_info import write_run_info
from eomt.tb_hparams import log_hparams, sweep_hparams
from eomt.training import annealing_probs, annealing_windows, batch_layout, param_groups, set_lr

log = logging.getLogger("eomt.train")

Batch = tuple[Tensor, list[dict]]  # (uint8 images (B,3,H,W), targets): one micro-batch


class TrainingDiverged(RuntimeError):
    pass


# --- the parts of a run ---------------------------------------------------------------------------
@dataclass
class TrainData:
    """The training split in a resumable order: `micro` images per rank, `accum` micro-batches per step."""

    dataset: Dataset
    sampler: ResumableSampler
    micro: int
    accum: int
    seed: int
    num_workers: int
    pin_memory: bool

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.num_samples // self.micro // self.accum

    def loader(self, epoch: int, start_batch: int) -> DataLoader:
        self.sampler.set_position(epoch, start_batch)
        return DataLoader(
            SeededSamples(self.dataset, self.seed),
            batch_size=self.micro,
            sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=collate_train,
            pin_memory=self.pin_memory,
            drop_last=True,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(self.seed + epoch),
            worker_init_fn=ignore_in_dataloader_worker,
        )

    def batches(self, start_step: int) -> Iterator[Batch]:
        """The micro-batches of every step from `start_step` on (`accum` a step), epoch after epoch."""
        epoch, step_in_epoch = divmod(start_step, self.steps_per_epoch)
        while True:
            loader = iter(self.loader(epoch, step_in_epoch * self.accum))
            for _ in range(step_in_epoch * self.accum, self.steps_per_epoch * self.accum):
                yield next(loader)
            epoch, step_in_epoch = epoch + 1, 0


def build_data(cfg: DictConfig, env: distributed.DistEnv, device: torch.device) -> TrainData:
    micro, accum = batch_layout(cfg.trainer.batch_size, cfg.trainer.micro_batch_size, env.world_size)
    dataset = build_dataset(cfg.dataset, cfg.task.name, "train", train=True)
    sampler = ResumableSampler(dataset, env.world_size, env.rank, cfg.seed, batch_size=micro)
    data = TrainData(dataset, sampler, micro, accum, cfg.seed, cfg.trainer.num_workers, device.type == "cuda")
    if data.steps_per_epoch == 0:
        raise ConfigError(
            f"the {cfg.dataset.name} train split has {len(dataset)} images, fewer than one step of "
            f"trainer.batch_size={cfg.trainer.batch_size}; lower the batch size"
        )
    return data


def annealing_schedule(cfg: DictConfig, model: nn.Module, total_steps: int) -> Callable | None:
    """step -> attention-mask probabilities of the query blocks, or None for models without them."""
    if not hasattr(model, "attn_mask_probs"):
        return None
    num_blocks = model.attn_mask_probs.numel()
    if not cfg.schedule.annealing:
        return lambda step: [1.0] * num_blocks
    starts, ends = annealing_windows(
        total_steps, num_blocks, cfg.schedule.anneal_starts, cfg.schedule.anneal_ends
    )
    return lambda step: annealing_probs(step, starts, ends, cfg.schedule.poly_power)


def check_schedule(schedule: DictConfig, total_steps: int, epochs: int, steps_per_epoch: int) -> None:
    """The warmups must end before the run does (checked before the model and loader workers exist)."""
    warmups = schedule.warmup_steps + schedule.backbone_warmup_steps
    if total_steps <= warmups:
        raise ConfigError(
            f"schedule.warmup_steps + schedule.backbone_warmup_steps = {schedule.warmup_steps} + "
            f"{schedule.backbone_warmup_steps} must be fewer than the run's {total_steps} steps "
            f"(trainer.epochs={epochs} x {steps_per_epoch} steps per epoch); shorten the warmups or raise "
            "trainer.epochs"
        )


def build_optimizer(cfg: DictConfig, model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(
        model,
        lr=cfg.schedule.lr,
        weight_decay=cfg.schedule.weight_decay,
        layer_decay=cfg.schedule.layer_decay,
        decay_query_blocks=cfg.schedule.decay_query_blocks,
        weight_decay_exempt=list(cfg.schedule.weight_decay_exempt),
    )
    return torch.optim.AdamW(groups, lr=cfg.schedule.lr, fused=device.type in ("cuda", "cpu"))


@dataclass
class Run:
    cfg: DictConfig
    run_dir: Path
    device: torch.device
    precision: str  # bf16 | fp16 | fp32 (fp16 on CUDA only)
    world_size: int
    data: TrainData
    total_steps: int
    last_step: int
    model: nn.Module  # the module trained, saved and annealed: the bare one, or itself sharded (fsdp)
    forward_model: nn.Module  # what the loop calls: `model`, or `model` in DDP (eomt.parallel)
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    apply_lr: Callable[[int], None]  # writes the step's learning rates into the optimiser
    annealing: Callable[[int], list[float]] | None
    state: TrainState  # the counters: steps done, skipped steps
    checkpoints: CheckpointManager  # saves and restores model, optimizer, scaler, state on its cadence
    evaluation: Evaluation | None
    evaluated: Callable[[], nn.Module]  # the full network to evaluate: `model`, or a gathered copy (fsdp)
    hparams: dict[str, Any]  # this run's row in TensorBoard's HParams tab
    forward_gflops: float | None  # one image's training forward (CUDA only: MFU in the log)

    @property
    def main(self) -> bool:
        return distributed.is_main()

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.precision]


def forward_gflops(model: nn.Module, device: torch.device) -> float | None:
    """GFLOPs of one training forward at the model's input size (for MFU; CUDA only, counted before compiling)."""
    if device.type != "cuda" or not hasattr(model, "img_size"):
        return None
    return gflops_per_image(model, torch.rand(1, 3, *model.img_size, device=device))


def build_run(cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = ()) -> Run:
    """Every part of the run, in the order that matters (see the comments)."""
    check_config(cfg)
    check_strategy(cfg.trainer)
    fsdp = cfg.trainer.strategy == "fsdp"
    device = resolve_device(cfg.trainer.device)
    env = distributed.init(device.type, group_of_one=fsdp)  # fsdp shards over a group, even of one
    precision = training_precision(cfg.trainer.precision, device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    data = build_data(cfg, env, device)
    total_steps = cfg.trainer.epochs * data.steps_per_epoch
    check_schedule(cfg.schedule, total_steps, cfg.trainer.epochs, data.steps_per_epoch)
    # The bare module: trained, saved and evaluated (fsdp shards it in place below). Fine-tuning starts
    # from any checkpoint eomt.api reads.
    model = load_model(cfg.model, cfg.trainer.init_from, cfg.trainer.skip_class_head).train().to(device)
    torch.manual_seed(cfg.seed + env.rank)  # ranks sample loss points and masks independently
    criterion = instantiate(cfg.loss).to(device)
    evaluation = Evaluation.from_config(cfg, device) if cfg.eval.every_epochs else None
    gflops = forward_gflops(model, device)  # counted before compiling
    if env.world_size > 1:  # the ViT-Adapter baseline has BatchNorm (EoMT has none); params are kept
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    unsharded = UnshardedCopy(model) if fsdp else None  # the evaluated network's template, before sharding
    # checkpointing, compile and DDP / FSDP (eomt.parallel); the optimiser after: fsdp makes new parameters
    forward_model = wrap_for_training(model, cfg.trainer, device, env.world_size, precision)
    optimizer = build_optimizer(cfg, model, device)
    state = TrainState()
    sched = cfg.schedule
    return Run(
        cfg=cfg,
        run_dir=run_dir,
        device=device,
        precision=precision,
        world_size=env.world_size,
        data=data,
        total_steps=total_steps,
        last_step=min(total_steps, cfg.trainer.max_steps or total_steps),
        model=model,
        forward_model=forward_model,
        criterion=criterion,
        optimizer=optimizer,
        scaler=scaler,
        apply_lr=lambda step: set_lr(
            optimizer,
            step,
            total_steps,
            sched.warmup_steps,
            sched.backbone_warmup_steps,
            sched.poly_power,
            sched.two_stage_warmup,
        ),
        annealing=annealing_schedule(cfg, model, total_steps),
        state=state,
        checkpoints=CheckpointManager(
            run_dir / "checkpoints",
            cfg.trainer.keep_last,
            every_steps=cfg.trainer.ckpt_every_steps,
            train_state=state,
            parts={"model": model, "optimizer": optimizer, "scaler": scaler},
            config=OmegaConf.to_container(cfg, resolve=True),
            sharded=fsdp,  # fsdp: every rank writes its shards (step_N/ directories)
        ),
        evaluation=evaluation,
        evaluated=(lambda: model) if unsharded is None else (lambda: unsharded(model)),
        hparams={
            "variant": cfg.get("variant") or "-",
            "model": cfg.model.name,
            **sweep_hparams(cfg, overrides),  # what the sweep varies, config groups as the keys they change
        },
        forward_gflops=gflops,
    )


def banner(run: Run, start: int, checkpoint: Path | None) -> str:
    """What this run is about to do, logged first: where, from what, to where, on what."""
    data, cfg = run.data, run.cfg
    origin = f"resumed from {checkpoint} at step {start}" if checkpoint else "fresh start at step 0"
    every = checkpoint_every(cfg.trainer.activation_checkpointing)
    recompute = {0: "", 1: ", blocks recomputed"}.get(every, f", 1 block in {every} recomputed")
    return (
        f"run {run.run_dir}: {origin}, last step {run.last_step} of {run.total_steps}\n"
        f"  {run.world_size} rank(s) on {run.device} ({cfg.trainer.strategy}{recompute}), precision {run.precision}, "
        f"batch {cfg.trainer.batch_size} = {data.micro} per micro-batch x {run.world_size} rank(s) x "
        f"{data.accum} accumulation step(s), {data.steps_per_epoch} steps per epoch"
    )


# --- one optimisation step -------------------------------------------------------------------------
def optimisation_step(run: Run, micro_batches: list[Batch], step: int) -> dict[str, Tensor] | None:
    """Forward, backward and update over the micro-batches of one step.

    Returns the step's loss terms (averaged over the micro-batches, still on the device) or None
    when a rank saw a non-finite loss and the step was skipped. The one host synchronisation is
    the finite flag that all ranks agree on.
    """
    terms: dict[str, Tensor] = {}
    finite = torch.ones((), dtype=torch.bool, device=run.device)
    for i, (images, targets) in enumerate(micro_batches):
        images = images.to(run.device, non_blocking=True).float().div_(255)
        targets = [{k: t[k].to(run.device, non_blocking=True) for k in ("masks", "labels")} for t in targets]
        with gradient_sync(run.forward_model, sync=i == len(micro_batches) - 1):
            with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
                mask_logits, class_logits = run.forward_model(images)
            if not run.cfg.trainer.intermediate_losses:
                mask_logits, class_logits = mask_logits[-1:], class_logits[-1:]
            loss, loss_terms = run.criterion(mask_logits, class_logits, targets)
            finite &= torch.isfinite(loss)
            run.scaler.scale(loss / len(micro_batches)).backward()
        for k, v in {"loss": loss, **loss_terms}.items():
            terms[k] = terms.get(k, 0.0) + v.detach().float() / len(micro_batches)

    if not distributed.all_true(finite):
        run.optimizer.zero_grad(set_to_none=True)
        run.state.bad_steps += 1
        run.state.skipped_steps += 1
        log.warning("step %d: non-finite loss, step skipped (%d in a row)", step, run.state.bad_steps)
        if run.state.bad_steps >= run.cfg.trainer.max_bad_steps:
            raise TrainingDiverged(
                f"{run.state.bad_steps} non-finite losses in a row at step {step}; lower schedule.lr, use "
                "trainer.precision=bf16 or fp32, or check the data; the last checkpoint is in "
                f"{run.checkpoints.folder}"
            )
        return None
    run.state.bad_steps = 0
    run.scaler.unscale_(run.optimizer)
    terms["grad_norm"] = clip_grad_norm(run.model.parameters(), run.cfg.schedule.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return terms


# --- around the step ------------------------------------------------------------------------------
class TrainLog:
    """The steps' loss terms summed on the device; every `every` steps they are read back once and
    written, with lrs, annealing and speed, to TensorBoard and as one line to train.log (rank 0)."""

    def __init__(self, run: Run, writer: SummaryWriter | None, start_step: int):
        self.run = run
        self.writer = writer
        self.every = run.cfg.trainer.log_every_steps
        self.first_step = start_step + 1  # this process's first step: it compiles
        self.compile_stats = CompileStats() if run.cfg.trainer.compile else None
        self.peak_flops = (
            bf16_peak_flops(torch.cuda.get_device_name(run.device)) if run.device.type == "cuda" else None
        )
        self._reset(start_step)

    def _reset(self, step: int) -> None:
        self.names: list[str] = []
        self.sum: Tensor | None = None
        self.finite_steps = 0  # steps whose terms are in `sum` (skipped ones are not)
        self.since_step, self.since = step, time.perf_counter()
        self.load = LoadMeter()  # was the speed measured alone? (other processes' share of our CPUs)

    def maybe_log(self, step: int, terms: dict[str, Tensor] | None) -> None:
        """`step` steps are done; `terms` are the last one's (None: it was skipped)."""
        if self.writer is None:
            return
        if terms is not None:
            values = torch.stack([v.reshape(()) for v in terms.values()])
            self.names, self.sum = list(terms), values if self.sum is None else self.sum + values
            self.finite_steps += 1
        if step == self.first_step:
            self._log_first_step(step)
        if step % self.every and step != 1:
            return
        run, writer = self.run, self.writer
        means = {}
        if self.sum is not None:  # the one read back from the device
            means = dict(zip(self.names, (self.sum / self.finite_steps).tolist(), strict=True))
        for name, value in means.items():
            writer.add_scalar(f"train/{name}", value, step)
        lrs = {g["name"]: g["lr"] for g in run.optimizer.param_groups}  # one per block, embeddings, heads
        for name, lr in lrs.items():
            writer.add_scalar(f"lr/{name}", lr, step)
        if run.annealing is not None:
            for i, p in enumerate(run.annealing(step - 1)):
                writer.add_scalar(f"annealing/block{i}", p, step)
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        images_per_s = self.finite_steps * run.cfg.trainer.batch_size / elapsed
        writer.add_scalar("perf/images_per_s", images_per_s, step)
        mfu = ""
        load = self.load.conditions()
        if load["other_load"] is not None:
            writer.add_scalar("perf/other_load", load["other_load"], step)
        loaded = (
            f" (under load: others used {load['other_load']:.0%} of the CPUs)" if load["under_load"] else ""
        )
        if run.device.type == "cuda":
            writer.add_scalar("perf/peak_memory_gib", torch.cuda.max_memory_allocated() / 2**30, step)
            if self.peak_flops and run.forward_gflops:
                value = training_mfu(run.forward_gflops, images_per_s, self.peak_flops)
                writer.add_scalar("perf/mfu", value, step)
                mfu = f" (MFU {value:.1%})"
        eta = (run.last_step - step) * elapsed / max(step - self.since_step, 1)
        loss = f"{means['loss']:.4f}" if "loss" in means else "- (non-finite)"
        log.info(
            "step %d/%d  loss %s  lr %.3g  %.1f images/s%s%s  ETA %s",
            step,
            run.last_step,
            loss,
            max(lrs.values()),
            images_per_s,
            mfu,
            loaded,
            _duration(eta),
        )
        self._reset(step)

    def _log_first_step(self, step: int) -> None:
        """The first step's time, and what compiling it took."""
        seconds = time.perf_counter() - self.since
        self.writer.add_scalar("perf/first_step_s", seconds, step)
        if self.compile_stats is None:
            return
        summary = self.compile_stats.summary()
        self.writer.add_scalar("compile/first_step_compile_s", summary.seconds, step)
        log.info("step %d took %.1f s; %s", step, seconds, summary.line())

    def close(self, step: int) -> None:
        """At the end of the run: everything Dynamo compiled, and any function that hit the recompile limit."""
        if self.writer is None or self.compile_stats is None:
            return
        summary = self.compile_stats.summary()
        self.writer.add_scalar("compile/graphs", summary.graphs, step)
        self.writer.add_scalar("compile/recompiles", summary.recompiles, step)
        log.info("%s over the run", summary.line())
        for name in summary.at_limit:
            log.warning(
                "torch.compile: %s reached the recompile limit (%d) and runs eagerly from then on; run with "
                "TORCH_LOGS=recompiles to see why it recompiles",
                name,
                summary.recompile_limit,
            )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def report_skipped_files(run: Run, skipped: int, epoch: int, step: int, writer: SummaryWriter | None) -> None:
    """Corrupt files the loaders of all ranks skipped this epoch (one collective per epoch)."""
    skipped = int(distributed.all_reduce_sum_(torch.tensor(float(skipped), device=run.device)).item())
    if skipped and run.main:
        log.warning("epoch %d: %d corrupt files were skipped (see the warnings naming them)", epoch, skipped)
    if writer is not None:
        writer.add_scalar("data/skipped_files", skipped, step)


def validate(run: Run, step: int, writer: SummaryWriter | None) -> dict[str, Any]:
    """Score the full network on the val split; the last step's record also holds its forward cost."""
    result = run.evaluation.run(
        run.evaluated(), step=step, writer=writer, run_dir=run.run_dir, benchmark=step == run.last_step
    )
    run.model.train()
    return result.record


def log_hparams_row(run: Run, writer: SummaryWriter | None, record: dict[str, Any], step: int) -> None:
    """The run's row in TensorBoard's HParams tab: what it varies and its final metrics."""
    if writer is None:
        return
    metrics = {f"val/{k}": v for k, v in record.get("metrics", {}).items()}
    metrics.update({f"cost/{k}": record[k] for k in ("fps", "gflops", "params") if k in record})
    log_hparams(writer, run.hparams, metrics, step=step)


def warn_finished(run: Run, step: int) -> None:
    log.warning(
        "%s already finished at step %d (last step %d): nothing to train; pass a new name=... for a "
        "separate run, or trainer.resume=never to train this one again from scratch",
        run.run_dir,
        step,
        run.last_step,
    )


# --- the loop -------------------------------------------------------------------------------------
def train(run: Run) -> None:
    """Resume, then step until the last step: save when the checkpoint manager says so, evaluate at
    epoch ends and at the end. A stop signal raises TrainingStopped (fetching, after a step, or in an
    evaluation), caught once: the last finished step is saved (unless it is already), then exit."""
    data, state, every_epochs = run.data, run.state, run.cfg.eval.every_epochs
    checkpoint = run.checkpoints.restore_training_state() if run.cfg.trainer.resume != "never" else None
    start = state.step
    if run.main:
        log.info("%s", banner(run, start, checkpoint))
    if start >= run.last_step:
        if run.main:
            warn_finished(run, start)
        return
    preemption = PreemptionHandler()
    preemption.install()
    # Steps after the checkpoint that an interrupted run logged are dropped: logging restarts at start + 1.
    # events in the run directory itself: TensorBoard names the run after it (no "/tb" suffix)
    writer = SummaryWriter(run.run_dir, purge_step=start + 1) if run.main else None
    train_log = TrainLog(run, writer, start)
    progress = tqdm(
        total=run.last_step, initial=start, disable=not run.main, desc="train", dynamic_ncols=True
    )
    batches, skipped_files, record = data.batches(start), 0, {}
    try:
        for step in range(start, run.last_step):
            micro_batches = preemption.next_batches(batches, data.accum)
            skipped_files += sum(count_skipped(targets) for _, targets in micro_batches)
            run.apply_lr(step)
            if run.annealing is not None:
                run.model.set_attn_mask_probs(run.annealing(step))
            terms = optimisation_step(run, micro_batches, step)
            state.step = done = step + 1
            progress.update(1)
            train_log.maybe_log(done, terms)
            preemption.check()
            last = done == run.last_step
            run.checkpoints.maybe_save(done, last)
            epoch, step_in_epoch = divmod(done, data.steps_per_epoch)
            if step_in_epoch == 0:  # an epoch ended
                report_skipped_files(run, skipped_files, epoch - 1, done, writer)
                skipped_files = 0
            if run.evaluation is not None and (last or (step_in_epoch == 0 and epoch % every_epochs == 0)):
                with preemption.stop_if_workers_die():  # the final model is always evaluated
                    record = validate(run, done, writer)
        distributed.check_replicas(run.model)  # logs whether every rank ends with the same weights
        log_hparams_row(run, writer, record, run.last_step)
        train_log.close(run.last_step)
    except TrainingStopped:
        checkpoint = run.checkpoints.save_training_state(state.step)
        log.info("preemption signal: checkpoint written at step %d, exiting", state.step)
        progress.close()  # the stop line stays the last line on stderr
        preemption.finish(checkpoint)
    finally:
        preemption.uninstall()
        progress.close()
        if writer is not None:
            writer.close()
    if state.skipped_steps:
        log.warning("%d steps were skipped for non-finite losses", state.skipped_steps)


@hydra.main(config_path="eomt/conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with user_errors():
            run = build_run(cfg, run_dir, HydraConfig.get().overrides.task)
            if run.main:
                write_run_info(cfg, run_dir)
            train(run)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    with user_errors():
        check_overrides(sys.argv[1:], "train")
    main()
