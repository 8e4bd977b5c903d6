"""Optional W&B logging of a finished run (`logger=wandb`). The local record stays the source of truth: this only
mirrors it (config, the loss curve, the metrics, the record as a file), after the run, so W&B can never lose or
delay a result. Off by default; never required. The W&B run is named after the run id."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from qpeft_bench import results

log = logging.getLogger("qpeft_bench")


def _flat(prefix: str, value, out: dict) -> dict:
    """Numbers of a nested dict as 'a/b/c' keys (what W&B's summary shows as columns)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = value
    return out


def log_record(record: dict, record_path: Path, *, project: str, mode: str, directory: str | None) -> str | None:
    """Mirror a finished run's record into W&B; returns the W&B run's local directory, or None if W&B failed (a
    warning, never an error: the run itself is done and recorded)."""
    record = results.redacted(record)  # W&B writes what it is given to files that `wandb sync` uploads
    argv = sys.argv
    try:
        directory = directory or str(record_path.parent)
        # W&B itself falls back to the system's temporary folder when it cannot make its own: files nobody asked for
        Path(directory).mkdir(parents=True, exist_ok=True)
        import wandb

        # W&B copies the command line into wandb-metadata.json; an override may carry a credential
        sys.argv = [results.redact(a, results.secret_values()) for a in argv]
        run = wandb.init(
            project=project,
            name=record["run_id"],
            id=record["run_id"],
            resume="allow",
            config=record.get("config", {}),
            mode=mode,
            dir=directory,
            reinit="finish_previous",
        )
        for step, loss in enumerate(record.get("train", {}).get("losses", [])):
            run.log({"train/loss": loss}, step=step)
        summary = {"status": record.get("status")}
        for section in ("accounting", "estimate", "eval"):
            _flat(section, record.get(section, {}), summary)
        train = {k: v for k, v in record.get("train", {}).items() if k != "losses"}
        _flat("train", train, summary)
        run.summary.update(summary)
        artifact = wandb.Artifact(f"record-{record['run_id']}", type="run-record")
        artifact.add_file(str(record_path), name="result.json")
        run.log_artifact(artifact)
        local = run.dir
        run.finish()
        return str(Path(local).parent)
    except Exception as err:
        log.warning("W&B logging failed (%s: %s); the local record is complete", type(err).__name__, err)
        return None
    finally:
        sys.argv = argv
