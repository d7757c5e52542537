"""What every training run of the project shares: processes, devices, progress, budgets, the ETA and the epoch loop.

Translation (:mod:`training.train`) and captioning (:mod:`training.caption_train`) give :func:`train_epochs` only
their batches and their optimiser step, so that ``--max-minutes``, ``--resume``, ``--device`` and ``torchrun`` mean
the same thing for every model family.
A config passed here needs the budget fields ``max_steps``, ``max_target_tokens``, ``max_minutes`` and ``epochs``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from training import checkpoint
from training.config import InputError, flag


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    target_tokens: int = 0
    elapsed_s: float = 0.0


@dataclass
class Step:
    """What one optimiser step on this process did, as the shared loop counts and shows it."""

    target_tokens: int
    items: int  # sentences or images
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # read (a device sync) only when the bar shows them


def train_epochs(
    cfg: Any, progress: Progress, rank: int, world: int, batches: Callable[[int], list[list[int]]],
    step: Callable[[list[int]], Step], checkpoint_now: Callable[[], None], items: str,
) -> None:
    """Run ``step`` on this process's share of every epoch's batches until a budget runs out, validating and
    checkpointing every ``cfg.valid_every`` steps and once at the end.

    ``batches(epoch)`` must give every process the same list; process ``rank`` takes every ``world``-th batch, and
    ``progress.batch_in_epoch`` is where a resumed run picks up. ``items`` names what ``Step.items`` counts on the bar.
    """
    bar = tqdm(total=cfg.max_steps or None, initial=progress.step, disable=rank != 0, dynamic_ncols=True, unit="step")
    started = time.monotonic() - progress.elapsed_s
    window_tokens, window_items, window_start = 0, 0, time.monotonic()
    validated_at = None  # the step last validated: a budget that ends on a --valid-every step is validated once
    try:  # closed on an error too, so that its message starts a line of its own, not the bar's
        while not should_stop(cfg, progress, world):
            epoch = batches(progress.epoch)
            epoch = epoch[: len(epoch) - len(epoch) % world] if world > 1 else epoch
            while progress.batch_in_epoch < len(epoch):
                done = step(epoch[progress.batch_in_epoch + rank])
                progress.step += 1
                progress.batch_in_epoch += world
                progress.target_tokens += done.target_tokens * world
                progress.elapsed_s = time.monotonic() - started
                window_tokens += done.target_tokens * world
                window_items += done.items * world
                bar.update(1)
                if progress.step % 10 == 0:
                    seconds = max(time.monotonic() - window_start, 1e-6)
                    tokens_per_s = window_tokens / seconds
                    bar.set_postfix({**{name: f"{loss.item():.3f}" for name, loss in done.losses.items()},
                                     "tok_s": f"{tokens_per_s:,.0f}", f"{items}_s": f"{window_items / seconds:,.1f}",
                                     "epoch": progress.epoch,
                                     "eta": eta(cfg, progress, tokens_per_s, len(epoch), world)})
                    window_tokens, window_items, window_start = 0, 0, time.monotonic()
                if progress.step % cfg.valid_every == 0:
                    checkpoint_now()
                    validated_at = progress.step
                if should_stop(cfg, progress, world):
                    break
            else:
                progress.epoch += 1
                progress.batch_in_epoch = 0
    finally:
        bar.close()
    if validated_at != progress.step:
        checkpoint_now()
    if world > 1:
        dist.barrier()


def restore(resume: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            ) -> tuple[Progress, dict[str, Any], list[dict[str, Any]]]:
    """Load a saved run's weights and optimiser state; return its progress, best entry and validation history."""
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    return Progress(**resume["progress"]), resume["best"], resume["history"]


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by ``torchrun`` with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def is_first_process() -> bool:
    """Whether this process is rank 0 of a ``torchrun`` (or runs alone): the one that writes the checkpoints, and so
    the one to name them."""
    return int(os.environ.get("RANK", "0")) == 0


def device_for(name: str, rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():  # else device_count() is 0 and `rank % 0` a ZeroDivisionError
            raise InputError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(name)


def hardware(device: torch.device, world: int) -> str:
    """How the checkpoint and the model card describe the machine a run used."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{world}x {name} ({os.cpu_count()} cores)"


def resumed_config(cls: type, cfg: Any, saved: dict[str, Any], given: Collection[str] | None = None) -> Any:
    """The saved run's config, with the ``on_resume`` fields (training.config.option: budgets, schedule, run
    folder, threads) that were given anew taken from ``cfg``: a budget given anew extends it.

    ``given`` names the fields given on the command line (even with their default's value: ``--lr 0.001`` over a
    saved 0.5 is 0.001). Without it (a library caller) a field counts as given when ``cfg`` holds another value
    than the default."""
    if given is None:
        given = [f.name for f in fields(cls) if f.default is not MISSING and getattr(cfg, f.name) != f.default]
    replaced = {f.name: getattr(cfg, f.name) for f in fields(cls) if f.metadata.get("on_resume") and f.name in given}
    return cls(**{**saved, **replaced})


def spent_budget(cfg: Any, progress: Progress) -> str | None:
    """The budget ``progress`` has spent, as its flag and where the run is (``--epochs 1 (epoch 1)``); None while
    every budget has some left."""
    for name, limit, reached in (("epochs", cfg.epochs, progress.epoch), ("max_steps", cfg.max_steps, progress.step),
                                 ("max_target_tokens", cfg.max_target_tokens, progress.target_tokens),
                                 ("max_minutes", cfg.max_minutes, progress.elapsed_s / 60)):
        if limit and reached >= limit:
            where = {"epochs": f"epoch {reached}", "max_steps": f"step {reached}",
                     "max_target_tokens": f"{reached} target tokens", "max_minutes": f"{reached:.1f} minutes"}[name]
            return f"{flag(name)} {limit} ({where})"
    return None


def should_stop(cfg: Any, progress: Progress, world: int) -> bool:
    stop = (
        (cfg.max_steps and progress.step >= cfg.max_steps)
        or (cfg.max_target_tokens and progress.target_tokens >= cfg.max_target_tokens)
        or (cfg.max_minutes and progress.elapsed_s >= cfg.max_minutes * 60)
        or progress.epoch >= cfg.epochs
    )
    if world > 1:  # wall clocks differ between processes: agree, or one would wait forever in all_reduce
        flag = torch.tensor([1.0 if stop else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
    return bool(stop)


def eta(cfg: Any, progress: Progress, tokens_per_s: float, batches_per_epoch: int, world: int) -> str:
    """Seconds left under the tightest of the configured budgets, as h:mm:ss."""
    left = []
    per_step = progress.elapsed_s / max(progress.step, 1)
    if cfg.max_steps:
        left.append((cfg.max_steps - progress.step) * per_step)
    if cfg.max_target_tokens and tokens_per_s > 0:
        left.append((cfg.max_target_tokens - progress.target_tokens) / tokens_per_s)
    if cfg.max_minutes:
        left.append(cfg.max_minutes * 60 - progress.elapsed_s)
    steps_per_epoch = batches_per_epoch / world
    remaining_epochs = cfg.epochs - progress.epoch - progress.batch_in_epoch / max(batches_per_epoch, 1)
    left.append(remaining_epochs * steps_per_epoch * per_step)
    seconds = max(0, int(min(left)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def save_checkpoints(
    rank: int, world: int, validate: Callable[[], dict[str, Any]], progress: Progress, best: dict[str, Any],
    history: list[dict[str, Any]], payload: Callable[[], dict[str, Any]], out: Path, best_by: str = "valid_loss",
) -> None:
    """Validate and write last.pt (and best.pt on a new best ``best_by`` metric: the lowest loss, the highest
    anything else) on rank 0; others wait."""
    if rank == 0:
        metrics = validate()
        entry = {"step": progress.step, "epoch": progress.epoch, "target_tokens": progress.target_tokens,
                 "elapsed_s": round(progress.elapsed_s, 1), **metrics}
        history.append(entry)
        logging.getLogger("attn.train").info("validation %s", entry)
        sign = 1.0 if best_by.endswith("loss") else -1.0  # compare as "lower is better"
        value = sign * metrics.get(best_by, sign * float("inf"))
        if value <= sign * best.get(best_by, sign * float("inf")) or not metrics:
            best.clear()
            best.update({**entry, best_by: sign * value})
            checkpoint.save(out / "best.pt", payload())
        checkpoint.save(out / "last.pt", payload())
    if world > 1:
        dist.barrier()
