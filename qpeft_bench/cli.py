"""`qpeft-bench`: the Hydra entry point. It composes the config, hands a plain dict to the recipe, and turns
the outcome into an exit code. Everything else lives in recipe.py."""

from __future__ import annotations

import os

# libgomp's default busy-waiting makes a 2-thread torch run 15-30x slower as soon as any other process is busy
# on a small machine (measured on the 2-core dev boxes); a short spin keeps the single-process speed.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import logging
import signal
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qpeft_bench import ASSETS, destinations, results
from qpeft_bench.config import ConfigError, ModelConfig, from_dict
from qpeft_bench.model_identity import resolve_family
from qpeft_bench.paths import CONF_DIR

log = logging.getLogger("qpeft_bench")
# peft calls a transformers property that transformers 5 deprecates; the warning is theirs, not the user's.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*is deprecated", category=FutureWarning)


def _asset(rel: str) -> str:
    """`${asset:tiny_llama}` -> absolute path of a file shipped in qpeft_bench/assets/."""
    return str(ASSETS / rel)


def _run_id(*, _root_: DictConfig) -> str:
    """`${run_id:}`: the run id of the config being composed, so Hydra's run directory is named after it."""
    return results.run_id(job_config(_root_))


def _run_dir_of(*, _root_: DictConfig) -> str:
    """Hydra's run directory: the run's own, or for mode=eval a `reeval/` folder inside the re-evaluated run (so
    Hydra's files of the evaluation do not replace those of the training). Hydra creates it before any code of
    ours runs, so a directory that must not be created is refused here."""
    if _root_.get("mode") == "eval":
        return str(destinations.existing_run(_root_.get("run_dir"))[0] / "reeval")
    return f"{_output_root(_root_=_root_)}/{_run_id(_root_=_root_)}"


def _output_root(*, _root_: DictConfig) -> str:
    """`${output_root:}`: output_root, refused when it is empty (an unset variable in a job script), the filesystem
    root, or under a file or an unwritable directory: Hydra would otherwise create the run there first."""
    return str(destinations.writable_root(_root_.get("output_root"), "output_root"))


def job_config(cfg: DictConfig) -> dict:
    """The resolved config without Hydra's own node."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    return _model_resolved(OmegaConf.to_container(OmegaConf.create(plain), resolve=True))


def _model_resolved(config: dict) -> dict:
    """A model without a card (model=auto: name, family or linear_names left to the checkpoint) made concrete from
    its config.json in the config itself, so that its run id, record and report rows say which model it is. What
    cannot be resolved is left as it is, for validate's one-line error."""
    model = config.get("model")
    if not isinstance(model, dict):
        return config
    if model.get("name") != "auto" and None not in (model.get("family"), model.get("linear_names")):
        return config  # a card: nothing to resolve
    try:
        card = resolve_family(from_dict(ModelConfig, model, "model"))
    except ConfigError:
        return config
    config["model"] = {**model, "name": card.name, "family": card.family, "linear_names": card.linear_names}
    return config


OmegaConf.register_new_resolver("asset", _asset, replace=True)
OmegaConf.register_new_resolver("run_id", _run_id, replace=True)
OmegaConf.register_new_resolver("run_dir_of", _run_dir_of, replace=True)
OmegaConf.register_new_resolver("output_root", _output_root, replace=True)


class SweepSummary(Callback):
    """Counts what each job of a sweep did and says it once at the end (Hydra prints nothing of the kind)."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.jobs: list[tuple[object, list[str]]] = []  # (job number, its overrides) per job, in order

    def on_job_end(self, config, job_return, **kwargs) -> None:
        value = job_return._return_value if hasattr(job_return, "_return_value") else None
        self.outcomes.append(value if isinstance(value, str) else "failed")
        number = OmegaConf.select(config, "hydra.job.num", default=len(self.jobs))
        self.jobs.append((number, list(OmegaConf.select(config, "hydra.overrides.task", default=None) or [])))

    def failed_points(self) -> list[str]:
        """'#<job> <the overrides that make it this point of the grid> (<status>)' of every job that did not
        complete; overrides that every job shares (output_root, train.max_steps=...) are left out."""
        shared = set.intersection(*(set(o) for _, o in self.jobs)) if len(self.jobs) > 1 else set()
        secrets = results.secret_values()
        return [
            f"#{number} {results.redact(' '.join(o for o in overrides if o not in shared), secrets)} ({outcome})"
            for (number, overrides), outcome in zip(self.jobs, self.outcomes, strict=True)
            if outcome not in ("completed", "skipped", "planned")
        ]

    def on_multirun_end(self, config, **kwargs) -> None:
        if not self.outcomes:  # a remote launcher (submitit) ran the jobs and their callbacks in other processes
            log.info("sweep finished; its jobs ran elsewhere: their records say how each went (qpeft-bench-report)")
            return
        counts = {s: self.outcomes.count(s) for s in sorted(set(self.outcomes))}
        log.info("sweep finished: %d runs: %s", len(self.outcomes), ", ".join(f"{n} {s}" for s, n in counts.items()))
        failed = self.failed_points()
        if failed:
            log.error(
                "%d of %d runs did not complete: %s; re-run the same command to redo them (completed ones are skipped)",
                len(failed),
                len(self.outcomes),
                "; ".join(failed),
            )
            sys.exit(1)  # a sweep with failed runs must not look green to make, CI or a job scheduler


class RedactSecrets(logging.Filter):
    """Credentials of the environment (results.secret_values) never reach a log file or the console: a message or
    traceback that holds one is printed with it replaced."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets = results.secret_values()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = results.redact(message, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:  # formatted once here, so the handler prints the redacted text
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = results.redact(record.exc_text, self.secrets)
        return True


def redact_log_records() -> None:
    """Every log record's message redacted as it is made, whoever logs it and whatever handlers Hydra sets up later
    (its launcher logs each job's overrides, "#0 : peft.r=4 ...", after configuring logging anew)."""
    make = logging.getLogRecordFactory()
    if getattr(make, "qpeft_redacts", False):
        return
    secrets = results.secret_values()

    def redacting(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        message = record.getMessage()
        clean = results.redact(message, secrets)
        if clean != message:
            record.msg, record.args = clean, None
        return record

    redacting.qpeft_redacts = True
    logging.setLogRecordFactory(redacting)


def redact_log_handlers() -> None:
    """Hydra sets up the job's handlers (console, `<run dir>/cli.log`) anew for each job; filter each of them."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())


def redact_hydra_files(hc) -> None:
    """Hydra saves the config and the command line (`.hydra/*.yaml`, a sweep's multirun.yaml) before any code of ours
    runs; a credential typed as an override, or pulled in with ${oc.env:...}, is taken out of them here."""
    out = Path(hc.runtime.output_dir)
    files = list((out / hc.output_subdir).glob("*.yaml")) if hc.output_subdir else []
    if hc.mode == RunMode.MULTIRUN:
        files.append(Path(hc.sweep.dir) / "multirun.yaml")
    for file in files:
        if file.is_file():
            results.redact_file(file)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="run")
def _main(cfg: DictConfig) -> str:
    from qpeft_bench import recipe  # heavy imports (torch, transformers) only once the config composed

    redact_log_handlers()
    hc = HydraConfig.get()
    redact_hydra_files(hc)
    status = recipe.run(job_config(cfg), Path(hc.runtime.output_dir))
    if hc.mode == RunMode.RUN and status not in ("completed", "skipped", "planned"):
        sys.exit(1)
    return status


def _terminate(signum, frame) -> None:
    # SIGTERM (scancel, a SLURM time limit, a container stop) unwinds like Ctrl-C, so the run's record is written
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> None:
    redact_log_records()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        _main_dispatch()
    except KeyboardInterrupt as err:  # the run's record already says failed (recipe.run); no traceback
        how = err.args[0] if err.args and isinstance(err.args[0], str) else "SIGINT"
        print(f"qpeft-bench: interrupted by {how}", file=sys.stderr)
        sys.exit(128 + getattr(signal, how, signal.SIGINT))  # what a shell reports for a process the signal killed
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main_dispatch() -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for Hydra's own report with the full traceback
        _dispatch()
        return
    # Hydra prints a composition error (unknown option, key or sweep, bad override syntax) over 5-20 lines: the
    # option list, its search path, a hint. Ask it to raise instead, and say what to change on one line. (Jobs
    # that a remote launcher submits meanwhile inherit the variable: their errors then carry full tracebacks.)
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _dispatch()
    except (HydraException, OmegaConfBaseException) as err:
        print(f"qpeft-bench: {one_line(err)}", file=sys.stderr)
        sys.exit(1)
    except OSError as err:  # Hydra creating the run or sweep directory (a read-only filesystem, /proc, a full disk)
        where = f" {err.filename}" if err.filename else ""
        print(
            f"qpeft-bench: error: cannot write{where}: {err.strerror or err}; choose another output_root",
            file=sys.stderr,
        )
        sys.exit(1)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


def one_line(err: BaseException) -> str:
    """A Hydra/OmegaConf error as one line: the override it is about, its message and the first line of its cause,
    the option list joined; the config search path and the hint about tracebacks left out."""
    cause = err
    while cause is not None and not isinstance(cause, ConfigError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:  # one of our checks, run by a resolver (the run directory's): its own words
        return f"config error: {results.redact(str(cause), results.secret_values())}"
    lines = str(err).splitlines()
    if isinstance(err.__cause__, OmegaConfBaseException):
        lines.append(str(err.__cause__).splitlines()[0])
    parts: list[str] = []
    for line in lines:
        if line.startswith("Config search path"):
            break
        if not line.strip() or "HYDRA_FULL_ERROR" in line:
            continue
        if line.startswith("\t") and parts:  # an option listed under "Available options in 'quant':"
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line.strip()
        else:
            parts.append(line.strip().rstrip("."))
    override = getattr(err, "override", None)  # a syntax error: which argument
    text = (f"override {override!r}: " if override else "") + (". ".join(parts) or type(err).__name__)
    # Hydra quotes the override back ("use +wandb.api_key=<value>"); stderr is a file under SLURM
    return "error: " + results.redact(text, results.secret_values())


def _dispatch() -> None:
    args = sys.argv[1:]
    multirun = bool({"-m", "--multirun"} & set(args))
    plain = [a for a in args if a not in ("-m", "--multirun")]
    if multirun and not any(a.startswith("-") for a in plain):
        if "mode=plan" in plain:
            sys.exit(plan_grid(plain))
        if "mode=list" in plain:
            sys.exit(list_grid([a for a in plain if a != "mode=list"]))
    index = [a for a in plain if a.startswith("grid_index=")]
    if index and not multirun:  # one point of a grid: a job-array task (scripts/slurm_array.sh)
        sys.argv = [sys.argv[0], *grid_point([a for a in plain if a not in index], index[0].split("=", 1)[1])]
    _main()


def list_grid(overrides: list[str]) -> int:
    """`qpeft-bench -m ... mode=list`: each grid point's index, run id and overrides, one per line (nothing runs);
    `qpeft-bench <same overrides> grid_index=<i>` then runs point i alone, as a job-array task does."""
    from qpeft_bench import grid, results

    points = grid.expand(CONF_DIR, overrides)
    keys = grid.varying(points)
    failed = 0
    for i, (point, cfg) in enumerate(grid.compose_points(CONF_DIR, points)):
        shown = " ".join(line for line in point if line.partition("=")[0] in keys) or "(single point)"
        if isinstance(cfg, Exception):
            failed += 1
            print(f"{i}\tFAILED\t{shown}\t{str(cfg).splitlines()[0]}")
        else:
            print(f"{i}\t{results.run_id(job_config(cfg))}\t{shown}")
    print(f"{len(points)} grid points", file=sys.stderr)
    return 1 if failed else 0


def grid_point(overrides: list[str], index: str) -> list[str]:
    """The full override list of grid point `index` (as `mode=list` numbers them)."""
    from qpeft_bench import grid

    points = grid.expand(CONF_DIR, overrides)
    if not index.isdigit() or int(index) >= len(points):
        sys.exit(f"grid_index={index}: the grid has {len(points)} points (0 .. {len(points) - 1})")
    return points[int(index)]


def plan_grid(overrides: list[str]) -> int:
    """`qpeft-bench -m ... mode=plan`: every grid point planned in this process (qpeft_bench/grid.py says why not
    through Hydra's launcher), a record per point as `-m` would write it, and the grid printed as one table."""
    from qpeft_bench import grid  # heavy imports only now

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    rows, failed, seconds = grid.plan(CONF_DIR, overrides, job_config)
    print(grid.render(rows))
    print(grid.totals(rows, failed, seconds))
    return 1 if failed else 0


if __name__ == "__main__":
    main()
