"""Training checkpoints, so a preempted or killed run resumes where it stopped (`train.checkpoint_every`).

A checkpoint is everything that decides the rest of the run: the trainable tensors, the optimizer and scheduler
states, the random generators (dropout), the losses so far and the step (the data position follows from it: the
batch stream is a pure function of the seed and the number of batches drawn). Each is written to its own
`step-<n>/` directory, fsynced, and only then named in `LATEST` (written atomically), so a kill at any moment leaves
the previous checkpoint intact and readable; older directories are removed after the pointer moves. A run that
completes removes its checkpoints (the adapter directory holds the result).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch

from qpeft_bench.results import atomic_write_json

POINTER = "LATEST"
log = logging.getLogger("qpeft_bench")


class Checkpointer:
    def __init__(self, root: Path, run_id: str, every: int, write: bool = True):
        self.root, self.run_id, self.every, self.write = Path(root), run_id, every, write

    def latest(self) -> dict | None:
        """The newest complete checkpoint of this run: None if there is none, if it belongs to another config, or if
        it cannot be read (the run then restarts: that costs the steps it held, never the run)."""
        pointer = _read_pointer(self.root / POINTER)
        if not isinstance(pointer, dict) or pointer.get("run_id") != self.run_id:
            return None
        path = self.root / str(pointer.get("dir")) / "state.pt"
        try:  # a torn file cannot be named by LATEST; a disk error or a hand edit can leave anything
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            log.warning(
                "checkpoint %s is unreadable (%s: %s); the run restarts from step 0", path, type(err).__name__, err
            )
            return None
        if not isinstance(state, dict) or state.get("step") != pointer.get("step"):
            log.warning("checkpoint %s does not hold the step its pointer names; the run restarts from step 0", path)
            return None
        return state

    def maybe_save(self, step: int, losses: list[float], model, optimizer, scheduler) -> None:
        """Save after optimizer step `step` (1-based count of steps done) when it is a multiple of `every`."""
        if not self.write or self.every <= 0 or step % self.every:
            return
        name = f"step-{step}"
        target = self.root / name
        target.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "losses": list(losses),
            "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
        }
        with open(target / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        atomic_write_json(self.root / POINTER, {"run_id": self.run_id, "dir": name, "step": step})
        for old in self.root.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def clear(self) -> None:
        if self.write:
            shutil.rmtree(self.root, ignore_errors=True)


def _read_pointer(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def restore(state: dict, model, optimizer, scheduler) -> None:
    """Put a checkpoint back into a freshly attached model and its optimizer and scheduler. (fp16 runs restart their
    loss scale from its initial value: the scaler recalibrates within a few steps.)"""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state["trainable"]):
        raise ValueError(
            "checkpoint does not match the model's trainable tensors: "
            f"{sorted(set(params) ^ set(state['trainable']))[:3]}"
        )
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])


def rng_state() -> dict:
    out = {"torch": torch.random.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
