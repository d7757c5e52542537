"""One training run, start to end, the same for every model family; a family fills in a :class:`Recipe`.

:func:`run` does what every run does: processes and device, resume, seed and threads, the tokenizer trained once and
shared through the run folder, Adam with gradient clipping, DistributedDataParallel, bf16 autocast on CUDA, the
checkpoint payload, and validation with best/last checkpoints through :func:`training.loop.train_epochs`. It asks
the recipe only for what differs between families: the data and its tokenizer, the model, the loss of a batch, the
batches of an epoch and the validation metrics. (CTranslate2's ``Converter`` is the model: one flow, families
implement its hooks.)
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
import torch.distributed as dist
from torch import nn

from training import checkpoint
from training.config import InputError, flag
from training.loop import (
    Progress,
    Step,
    device_for,
    distributed,
    hardware,
    restore,
    resumed_config,
    save_checkpoints,
    spent_budget,
    train_epochs,
)

log = logging.getLogger("attn.train")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run`, saying what resumes it: ``resume_from`` is the last.pt this run wrote, else the
    checkpoint it was resumed from, else None (nothing to resume); ``written`` says whether this run wrote it.

    The command line cannot tell by itself: a resumed run writes to the saved run's folder unless --out is given
    anew, and a last.pt already in the folder may be another run's."""

    def __init__(self, resume_from: Path | None, written: bool, valid_every: int) -> None:
        super().__init__()
        self.resume_from, self.written, self.valid_every = resume_from, written, valid_every


class Recipe(ABC):
    """What one model family trains and how; the run around it is :func:`run`'s."""

    kind: str  # the checkpoint's kind (training.checkpoint.KINDS)
    items = "sent"  # what Step.items counts, as the progress bar names it

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg  # a config dataclass with the fields training.loop's budgets need, lr, clip, seed, out, ...

    @property
    def best_by(self) -> str:
        """The validation metric that picks best.pt (the lowest loss, the highest anything else)."""
        return "valid_loss"

    def configure(self) -> None:  # noqa: B027 - an optional hook: most families take their config as it is
        """Settle and check the config (after a resume has replaced it), before any data is read."""

    def checkpoint_fields(self) -> dict[str, Any]:
        """Fields of the checkpoint beside the common ones (e.g. the architecture)."""
        return {}

    def learning_rate(self, step: int) -> float:
        """Adam's learning rate for optimiser step ``step`` (0-based)."""
        return float(self.cfg.lr)

    @abstractmethod
    def load_data(self) -> dict[str, Any]:
        """Read the splits; return the checkpoint's ``data`` section (corpus, hash, sizes)."""

    @abstractmethod
    def train_tokenizer(self) -> bytes:
        """A SentencePiece model trained on the training split (run on rank 0 only)."""

    @abstractmethod
    def prepare(self, sp: spm.SentencePieceProcessor) -> int:
        """Encode the training and validation examples with the run's tokenizer; return how many training examples
        there are (fail if none are left)."""

    @abstractmethod
    def build_model(self, vocab_size: int) -> tuple[nn.Module, dict[str, Any]]:
        """An untrained model and its config as the checkpoint stores it."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: list[int], device: torch.device) -> tuple[torch.Tensor, Step]:
        """The loss to minimise on the training examples ``batch`` (run under autocast), and what the step did."""

    @abstractmethod
    def batches(self, epoch: int) -> list[list[int]]:
        """The training examples of every batch of ``epoch``, the same on every process."""

    @abstractmethod
    def validate(self, model: nn.Module, sp: spm.SentencePieceProcessor, device: torch.device) -> dict[str, Any]:
        """Validation metrics of ``model`` (in train mode again when it returns); {} when there is nothing to
        validate on."""

    @abstractmethod
    def describe(self, model: nn.Module, device: torch.device, world: int) -> str:
        """The log line that opens a run."""


def shared_tokenizer(recipe: Recipe, rank: int, world: int, resume: dict[str, Any] | None) -> bytes:
    """Trained on rank 0 and shared through the run folder, so every process has byte-identical vocabularies; a
    resumed run keeps its own."""
    if resume is not None:
        return bytes(resume["tokenizer"])
    path = Path(recipe.cfg.out) / "spm.model"
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(recipe.train_tokenizer())
    if world > 1:
        dist.barrier()
    return path.read_bytes()


def check_same_data(data_info: dict[str, Any], resume: dict[str, Any]) -> None:
    """Refuse to resume on other data than the run was trained on: a corpus edited since, or a relative path read
    from another directory, would otherwise be trained on silently."""
    saved = resume["data"]
    if data_info["hash"] != saved["hash"]:
        raise InputError(f"cannot resume: data {data_info['corpus']!r} hashes to {data_info['hash']}, but the run was "
                         f"trained on {saved['corpus']!r} hashing to {saved['hash']}")


def check_kept_fields(recipe: Recipe, asked: Any, given: Collection[str], resume_path: Path | None) -> None:
    """Refuse a resumed run given a value it cannot take (another --data, --attention, --hidden-dim, ...): the saved
    run's config is kept for every field but the ``on_resume`` ones, and running on with the saved value instead
    would look like the change was made. The same value (the first command run again with --resume) is no change:
    both are compared as :meth:`Recipe.configure` settles them (absolute paths, the transformer's attention)."""
    settled = copy.copy(recipe)
    settled.cfg = asked
    settled.configure()
    differ = [f for f in fields(asked) if f.name in given and not f.metadata.get("on_resume")
              and getattr(settled.cfg, f.name) != getattr(recipe.cfg, f.name)]
    if differ:
        changes = ", ".join(f"{flag(f.name)} {getattr(asked, f.name)!r} (it has {getattr(recipe.cfg, f.name)!r})"
                            for f in differ)
        anew = ", ".join(flag(f.name) for f in fields(asked) if f.metadata.get("on_resume"))
        raise InputError(f"--resume {resume_path} keeps the config the run was trained with, so it cannot take "
                         f"{changes}; only {anew} may be given anew (start a new run to change the rest)")


def check_new_run_folder(out: Path) -> None:
    """A new run does not start in a folder that holds another run's checkpoints: its first validation would replace
    that run's best.pt (hours of training, maybe) by its own, and a Ctrl-C before it would leave that run's last.pt
    beside this run's spm.model. Forgetting --resume when running a command again is the usual way to get here."""
    held = [name for name in ("last.pt", "best.pt") if (out / name).exists()]
    if held:
        raise InputError(f"--out {out} holds another run's {' and '.join(held)}: continue that run with --resume "
                         f"{out / held[0]}, or start this one in another --out (or remove the folder)")


def make_run_folder(out: Path) -> None:
    """Create the run folder now: an --out that cannot be a folder (a file is there) or that this user cannot write
    fails in one line before the data and the tokenizer take their minutes, not with a traceback then or when the
    first checkpoint is written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create the run folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: the run folder is not writable")


def carry_run_files(resume_path: Path, resume: dict[str, Any], out: Path) -> None:
    """A run resumed into a new folder gets there what its first folder had: spm.model, and best.pt (the restored
    best), so that the folder is a whole run even if this part never beats that best."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "spm.model").exists():
        (out / "spm.model").write_bytes(bytes(resume["tokenizer"]))
    best = resume_path if resume_path.name == "best.pt" else resume_path.parent / "best.pt"
    if best.is_file() and not (out / "best.pt").exists():
        shutil.copyfile(best, out / "best.pt")


def random_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The state of torch's generators, which draw the dropout masks, for the checkpoint: a resumed run then draws
    the masks the uninterrupted run would have, and ends with the same weights, rather than those of a run reseeded
    at the step it resumed from."""
    state = {"rng_state": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng_state"] = torch.cuda.get_rng_state(device)
    return state


def restore_random_state(resume: dict[str, Any], device: torch.device) -> None:
    """Set torch's generators as :func:`random_state` saved them (checkpoints from before it have none: they go on
    from the seed)."""
    if "rng_state" in resume:
        torch.set_rng_state(resume["rng_state"])
    if device.type == "cuda" and "cuda_rng_state" in resume:
        torch.cuda.set_rng_state(resume["cuda_rng_state"], device)


def run(recipe: Recipe, resume_path: Path | None = None, given: Collection[str] | None = None) -> Path:
    """Train until a budget runs out and return the path of the best checkpoint (which a resumed run that holds no
    best.pt and never beats its restored best does not write: check that it exists).

    ``given``: the config fields given on the command line, which a resumed run takes anew where they may change
    (:func:`training.loop.resumed_config`). Ctrl-C raises :class:`RunInterrupted`."""
    written: list[Path] = []  # the last.pt this run wrote (atomically: a Ctrl-C while writing leaves the older one)
    try:
        return _run(recipe, resume_path, given, written)
    except KeyboardInterrupt:
        raise RunInterrupted(written[0] if written else resume_path, bool(written), recipe.cfg.valid_every) from None


def _run(recipe: Recipe, resume_path: Path | None, given: Collection[str] | None, written: list[Path]) -> Path:
    rank, world = distributed()
    device = device_for(recipe.cfg.device, rank)
    resume = checkpoint.load(resume_path, kind=recipe.kind) if resume_path else None
    if resume is not None:
        asked = recipe.cfg
        recipe.cfg = resumed_config(type(recipe.cfg), recipe.cfg, resume["train_config"], given)
        if given is not None:
            check_kept_fields(recipe, asked, given, resume_path)
    recipe.configure()
    cfg = recipe.cfg
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    # Before the data is read (minutes): else it would read it, validate, rewrite last.pt and say nothing.
    if resume is not None and (spent := spent_budget(cfg, Progress(**resume["progress"]))):
        raise InputError(f"--resume {resume_path}: nothing left to train, the run has spent its {spent} budget; "
                         "give a larger one with --resume (--epochs and --max-* budgets given anew extend it)")

    if resume is None or (resume_path is not None and out.resolve() not in (
            resume_path.resolve().parent, Path(resume["train_config"]["out"]).resolve())):
        check_new_run_folder(out)  # a new run, or a run resumed into a folder of another one
    make_run_folder(out)
    data_info = recipe.load_data()
    if resume is not None:
        check_same_data(data_info, resume)
        if rank == 0 and resume_path is not None:
            carry_run_files(resume_path, resume, out)
    sp_bytes = shared_tokenizer(recipe, rank, world, resume)
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    data_info["train_examples"] = recipe.prepare(sp)

    model, model_config = recipe.build_model(sp.get_piece_size())
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    progress, best, history = Progress(), dict[str, Any](), list[dict[str, Any]]()
    if resume is not None:
        progress, best, history = restore(resume, model, optimizer)
        restore_random_state(resume, device)
    ddp: nn.Module = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    use_amp = cfg.amp and device.type == "cuda"

    def payload() -> dict[str, Any]:
        return {
            "kind": recipe.kind, **recipe.checkpoint_fields(), "model_config": model_config,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "tokenizer": sp_bytes,
            "train_config": asdict(cfg), "data": data_info, "progress": asdict(progress), "best": best,
            "history": history, "hardware": hardware(device, world), **random_state(device),
        }

    if rank == 0:
        log.info("%s", recipe.describe(model, device, world))
    model.train()

    def step(batch: list[int]) -> Step:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss, done = recipe.loss(ddp, batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = recipe.learning_rate(progress.step)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        return done

    def checkpoint_now() -> None:
        save_checkpoints(rank, world, lambda: recipe.validate(model, sp, device), progress, best, history, payload,
                         out, recipe.best_by)
        if rank == 0 and not written:
            written.append(out / "last.pt")

    train_epochs(cfg, progress, rank, world, recipe.batches, step, checkpoint_now, items=recipe.items)
    return out / "best.pt"
