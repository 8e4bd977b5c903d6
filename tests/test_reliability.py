"""Reliability (issue 10): an unattended sweep keeps going through bad inputs and faults, loses nothing that finished
and never writes a credential. docs/reliability.md lists each guarantee with the test below that shows it.

- bad inputs: one actionable line, a non-zero exit, no record, no model loaded (test_bad_input_...);
- SIGKILL at random points (training, checkpoint write, record write): nothing torn, every re-run completes with the
  losses of an uninterrupted run, a completed record stays as it is (test_sigkill_...);
- out of memory and divergence: their own status, the figures at failure, the sweep goes on; the report marks them;
- the report never crashes on a corrupt or partial record;
- two processes launching one sweep: a lock per run, each run once;
- credentials planted in the environment appear in no file written by a run, a sweep or the report.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLI, FAST

from qpeft_bench import ASSETS, models, quant, recipe, report, results
from qpeft_bench import train as train_module
from qpeft_bench.config import TrainConfig

TINY = ASSETS / "tiny_llama"


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: the catalogue
# ----------------------------------------------------------------------------------------------------------------


def _model_dir(tmp: Path, name: str, drop_tokens: tuple[str, ...] = (), config: bool = True) -> Path:
    """A copy of the embedded model's card and tokenizer (no weights: bad inputs must fail before they are read)."""
    out = tmp / name
    out.mkdir()
    if config:
        shutil.copy(TINY / "config.json", out)
    shutil.copy(TINY / "tokenizer.json", out)
    tok = json.loads((TINY / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in tok.items() if k not in drop_tokens}))
    return out


def _bad_inputs(tmp: Path) -> None:
    (tmp / "empty.jsonl").write_text("")
    row = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    (tmp / "malformed.jsonl").write_text(json.dumps(row) + '\n{"instruction": "Name a fruit.", oops}\n')
    (tmp / "fields.jsonl").write_text(json.dumps({"prompt": "Name a colour.", "completion": "Blue."}) + "\n")
    _model_dir(tmp, "no_specials", drop_tokens=("pad_token", "unk_token", "eos_token"))
    _model_dir(tmp, "no_config", config=False)


# (case, overrides with {tmp} for the test's directory, what the one error line must say: the knob or the file)
CATALOGUE = [
    ("unknown key", ["+peft.rank=4"], "unknown key peft.rank; valid keys of peft:"),
    ("unknown key without +", ["peft.rank=4"], "Could not override 'peft.rank'"),
    ("unknown top-level key", ["+foo=1"], "unknown key foo; valid keys at the top level"),
    ("wrong type", ["peft.r=eight"], "peft.r='eight' has the wrong type: expected int"),
    ("wrong type of a flag", ["overwrite=maybe"], "overwrite='maybe' has the wrong type"),
    ("zero rank", ["peft.r=0"], "peft.r=0 must be > 0"),
    ("negative rank", ["peft.r=-4"], "peft.r=-4 must be > 0"),
    ("rank above min(in, out)", ["peft.r=512"], "peft.r=512 exceeds min(in, out)=256"),
    ("lambda not dividing", ["peft=qbara", "peft.balance=3"], "peft.balance=3 does not divide in_features=256"),
    ("lambda2 not dividing", ["peft=qahira", "peft.lambda2=256"], "peft.lambda2=256 does not divide out_features=128"),
    (
        "group size not dividing",
        ["quant=rtn", "quant.group_size=100"],
        "quant.group_size=100 does not divide in_features=256",
    ),
    (
        "QA-LoRA group size != quantizer's",
        ["peft=qa_lora", "quant=rtn", "quant.group_size=128"],
        "peft.group_size=64 must equal quant.group_size=128",
    ),
    ("method unsupported on the quantizer", ["peft=qa_lora"], "peft=qa_lora cannot run on quant=nf4"),
    ("missing model path", ["model.path={tmp}/no_model"], "model.path='{tmp}/no_model' is not a directory"),
    (
        "model path without config.json",
        ["model.path={tmp}/no_config"],
        "model.path='{tmp}/no_config' has no config.json",
    ),
    ("missing data file", ["data.path={tmp}/missing.json"], "data file not found: {tmp}/missing.json"),
    ("empty data file", ["data.path={tmp}/empty.jsonl"], "data file {tmp}/empty.jsonl is empty"),
    ("malformed JSONL line", ["data.path={tmp}/malformed.jsonl"], "{tmp}/malformed.jsonl line 2: malformed JSON"),
    (
        "data set without the expected fields",
        ["data.path={tmp}/fields.jsonl"],
        "{tmp}/fields.jsonl row 1: missing field(s) instruction, output",
    ),
    ("unknown sweep", ["-m", "sweep=nope"], "Could not find 'sweep/nope'. Available options in 'sweep': "),
    ("unknown group option", ["quant=nf5"], "Could not find 'quant/nf5'. Available options in 'quant': fp4"),
    ("bad override syntax", ["peft.r=["], "override 'peft.r=['"),
    (
        "tokenizer without pad (nor unk, eos) token",
        ["model.path={tmp}/no_specials"],
        "the tokenizer of {tmp}/no_specials has no eos_token",
    ),
    (
        "context shorter than the prompt",
        ["data.max_source_len=500"],
        "data.max_source_len + data.max_target_len = 628 exceeds the context length 512",
    ),
    ("calibration text file missing", ["calib=text", "calib.path={tmp}/calib.txt"], "calib.path='{tmp}/calib.txt'"),
    ("unknown eval task", ["eval.tasks=[ppl_heldout,ppl_nope]"], "unknown task 'ppl_nope'"),
    ("bad device", ["train.device=gpu"], "train.device='gpu'"),
]


@pytest.mark.parametrize("case, overrides, message", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_one_actionable_line_before_any_model_is_loaded(
    case, overrides, message, tmp_path, qpeft_cli, monkeypatch
):
    _bad_inputs(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError(f"{case}: a model was loaded for a bad input")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(quant, "quantize_model", refuse)
    args = [o.format(tmp=tmp_path) for o in overrides]
    code, output = qpeft_cli(*args, f"output_root={tmp_path / 'runs'}")
    assert code != 0
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, output
    assert message.format(tmp=tmp_path) in errors[0], output
    assert not list(tmp_path.rglob(results.RECORD))  # nothing claims anything, let alone completion


def test_the_catalogue_covers_the_issue():
    assert len(CATALOGUE) >= 20


def test_a_tokenizer_without_pad_token_pads_with_unk_and_passes(tmp_path):
    from qpeft_bench import data

    tokenizer = models.load_tokenizer(str(_model_dir(tmp_path, "no_pad", drop_tokens=("pad_token",))))
    data.check_tokenizer(tokenizer, "no_pad")  # LLaMA's case: reuse unk, no error
    assert tokenizer.pad_token_id == tokenizer.unk_token_id is not None


# ----------------------------------------------------------------------------------------------------------------
# SIGKILL at random points
# ----------------------------------------------------------------------------------------------------------------

# Forks one attempt per line it reads, so the imports (seconds) are paid once. An attempt may arm a kill inside a
# write: the n-th record or checkpoint-pointer rename (the temporary file left half written), or the n-th checkpoint
# save (state.pt half written); otherwise the driver SIGKILLs it after `delay` seconds. Prints the exit per attempt.
DRIVER = r"""
import io, json, os, signal, sys, time, traceback
from pathlib import Path

import bitsandbytes, peft, torch, transformers.models.llama.modeling_llama
from hydra.core.plugins import Plugins
from transformers import AutoModelForCausalLM, AutoTokenizer

from qpeft_bench import cli, recipe, results

Plugins.instance()  # what each attempt would import and discover again (seconds); no tensor computed: forks stay safe


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(kind, n):
    count = [0]
    if kind in ("record", "pointer"):
        name, replace = (results.RECORD if kind == "record" else "LATEST"), os.replace

        def torn_replace(src, dst, *args, **kwargs):
            if Path(dst).name == name:
                count[0] += 1
                if count[0] == n:
                    os.truncate(src, os.path.getsize(src) // 2)
                    die()
            return replace(src, dst, *args, **kwargs)

        os.replace = torn_replace
    elif kind == "checkpoint":
        save = torch.save

        def torn_save(obj, f, *args, **kwargs):
            if str(getattr(f, "name", "")).endswith("state.pt"):
                count[0] += 1
                if count[0] == n:
                    buffer = io.BytesIO()
                    save(obj, buffer, *args, **kwargs)
                    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    f.flush()
                    die()
            return save(obj, f, *args, **kwargs)

        torch.save = torn_save


for line in sys.stdin:
    job = json.loads(line)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            arm(job["kind"], job["n"])
            sys.argv = ["qpeft-bench", *job["args"]]
            cli.main()
            code = 0
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = None if job["delay"] is None else start + job["delay"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if (deadline is not None and time.monotonic() >= deadline) or time.monotonic() - start > 300:
            os.kill(pid, signal.SIGKILL)  # not reaped yet, so the pid is still this child's
            deadline = float("inf")
        time.sleep(0.005)
    print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - start}), flush=True)
"""

STEPS = 8
KILL_RUN = [
    f"train.max_steps={STEPS}",
    "train.measure_after=1",
    "data.max_examples=120",
    "eval.max_batches=2",
    "train.checkpoint_every=1",
]


def _assert_intact(root: Path) -> None:
    """Every record parses and validates; every checkpoint pointer names a checkpoint that loads, of its step."""
    for path in root.rglob(results.RECORD):
        assert report.parse_record(path).status in results.STATUSES  # RecordError on a torn or foreign file
    for pointer in root.rglob("checkpoint/LATEST"):
        named = json.loads(pointer.read_text())
        state = torch.load(pointer.parent / named["dir"] / "state.pt", map_location="cpu", weights_only=False)
        assert state["step"] == named["step"] == len(state["losses"])


def _checkpoint_step(root: Path) -> int:
    pointers = list(root.glob("*/checkpoint/LATEST"))
    return json.loads(pointers[0].read_text())["step"] if pointers else 0


def _only_record(root: Path) -> dict:
    (path,) = root.glob(f"*/{results.RECORD}")
    return json.loads(path.read_text())


def test_sigkill_at_random_points_never_tears_a_file_and_every_rerun_completes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QPEFT_CACHE": str(tmp_path / "cache")}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    log = tmp_path / "attempts.log"

    def attempt(root: Path, kind: str = "none", n: int = 0, delay: float | None = None) -> dict:
        job = {"kind": kind, "n": n, "delay": delay, "log": str(log), "args": [*KILL_RUN, f"output_root={root}"]}
        driver.stdin.write(json.dumps(job) + "\n")
        driver.stdin.flush()
        line = driver.stdout.readline()
        assert line, "the driver died"
        return json.loads(line)

    def assert_completed_as_reference(root: Path) -> dict:
        rec = _only_record(root)
        assert rec["status"] == "completed", log.read_text()[-3000:]
        assert rec["train"]["losses"] == pytest.approx(reference["train"]["losses"], rel=1e-6)
        assert rec["eval"]["after"]["ppl_heldout"] == pytest.approx(reference["eval"]["after"]["ppl_heldout"], rel=1e-6)
        assert not list(root.glob("*/checkpoint"))  # removed once complete
        return rec

    try:
        whole = attempt(tmp_path / "whole")
        assert whole["exit"] == 0, log.read_text()[-3000:]
        reference = _only_record(tmp_path / "whole")

        rng = random.Random(10)
        kinds = ["train"] * 8 + ["record", "checkpoint", "pointer"] * 4
        rng.shuffle(kinds)
        kills: list[str] = []
        resumed = 0
        cycle, root = 0, tmp_path / "killed0"
        for kind in itertools.cycle(kinds):
            if len(kills) >= 20:
                break
            # a run writes its record some 7 times (each stage); a checkpoint and its pointer after each step but the
            # last, from where it resumed on
            saves = STEPS - 1 - _checkpoint_step(root)
            kind = "train" if kind in ("checkpoint", "pointer") and saves < 1 else kind
            n = rng.randint(1, 7 if kind == "record" else max(saves, 1))
            delay = rng.uniform(0.05, 0.8) * whole["seconds"] if kind == "train" else None
            out = attempt(root, kind, n, delay)
            _assert_intact(root)
            if out["exit"] == -signal.SIGKILL:
                kills.append(kind)
                continue
            assert out["exit"] == 0, log.read_text()[-3000:]  # the attempt outlived its kill point: it completed
            resumed += "resumed_from_step" in assert_completed_as_reference(root)["train"]
            cycle, root = cycle + 1, tmp_path / f"killed{cycle + 1}"

        out = attempt(root)  # the last killed run, re-run: it resumes (or restarts) and completes
        assert out["exit"] == 0, log.read_text()[-3000:]
        resumed += "resumed_from_step" in assert_completed_as_reference(root)["train"]
        completed, logged = next(root.glob(f"*/{results.RECORD}")).read_bytes(), log.stat().st_size
        assert attempt(root)["exit"] == 0  # again, without overwrite=true: skipped, the record untouched
        assert next(root.glob(f"*/{results.RECORD}")).read_bytes() == completed
        assert b"already completed" in log.read_bytes()[logged:]
    finally:
        driver.stdin.close()
        driver.wait(timeout=120)
    assert len(kills) >= 20 and set(kills) == {"train", "record", "checkpoint", "pointer"}, kills
    assert resumed >= 1  # some re-runs continued from a checkpoint rather than from the start


def test_an_unreadable_checkpoint_restarts_the_run_instead_of_failing_it(tmp_path, caplog):
    from qpeft_bench import checkpoint

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ckpt = checkpoint.Checkpointer(tmp_path, "rid", every=1)
    ckpt.maybe_save(1, [2.5], model, optimizer, scheduler)
    assert ckpt.latest()["losses"] == [2.5]
    state = tmp_path / "step-1" / "state.pt"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])  # what a disk error or a copy cut short leaves
    assert ckpt.latest() is None and "is unreadable" in caplog.text
    state.write_bytes(good)
    for pointer in ('{"run_id": "rid"}', '["rid"]', '{"run_id": "rid", "dir": "step-1", "step": 7}'):
        (tmp_path / checkpoint.POINTER).write_text(pointer)  # hand-edited or foreign pointers
        assert ckpt.latest() is None


# ----------------------------------------------------------------------------------------------------------------
# Out of memory, divergence
# ----------------------------------------------------------------------------------------------------------------


def test_out_of_memory_is_recorded_with_the_memory_held_and_the_sweep_goes_on(tmp_path, qpeft_cli, monkeypatch):
    real = train_module.accumulate
    calls = itertools.count()

    def accumulate(*args, **kwargs):  # the first training step of the sweep runs out of memory
        if next(calls) == 0:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated on the CPU)")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "accumulate", accumulate)
    code, output = qpeft_cli("-m", "peft.r=4,8", *FAST, f"output_root={tmp_path / 'runs'}")
    assert code == 1  # a sweep with a run that did not complete must not look green
    assert "sweep finished: 2 runs: 1 completed, 1 oom" in output
    assert "1 of 2 runs did not complete: #0 peft.r=4 (oom); re-run the same command" in output  # which point
    recs = {}
    for path in tmp_path.glob(f"runs/*/{results.RECORD}"):
        rec = json.loads(path.read_text())
        recs[rec["config"]["peft"]["r"]] = rec
    oom, ok = recs[4], recs[8]
    assert oom["status"] == "oom" and ok["status"] == "completed"
    err = oom["error"]
    assert err["type"] == "OutOfMemoryError" and "Tried to allocate 20.00 GiB" in err["message"]
    # the memory at failure: this process held at least the quantized model it had loaded
    assert err["memory_kind"] == "cpu_rss"
    assert oom["accounting"]["quantized_model_bytes"] < err["rss_bytes"] <= err["peak_rss_bytes"]
    held = [line for line in output.splitlines() if "out of memory (" in line]
    assert len(held) == 1 and f"({err['rss_bytes'] / 2**30:.2f} GiB held)" in held[0]


@pytest.fixture(scope="module")
def tiny_runs(compose, tmp_path_factory):
    """Real records of the embedded model: a completed run and every partial record it wrote on the way (what a run
    killed at that point leaves), and runs that diverge at step 2 on a NaN, an infinite and an exploding loss."""
    root = tmp_path_factory.mktemp("tiny_runs")
    partial: list[str] = []
    write = results.atomic_write_json

    def write_and_keep(path, data):
        write(path, data)
        partial.append(Path(path).read_text())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(results, "atomic_write_json", write_and_keep)
        assert recipe.run(compose(FAST), root / "completed", progress=False, summary=False) == "completed"
    diverged = {}
    for name, loss in (("nan", float("nan")), ("inf", float("inf")), ("exploding", 1e6)):
        real = train_module.accumulate
        calls = itertools.count()

        def accumulate(*args, _loss=loss, _real=real, _calls=calls, **kwargs):
            value, tokens = _real(*args, **kwargs)
            return (_loss if next(_calls) == 2 else value), tokens

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train_module, "accumulate", accumulate)
            config = compose([*FAST, f"seed={len(diverged) + 1}"])
            assert recipe.run(config, root / name, progress=False, summary=False) == "diverged"
        diverged[name] = json.loads((root / name / results.RECORD).read_text())
    return root, partial, diverged


def test_divergence_is_recorded_with_its_step_and_marked_by_the_report(tiny_runs, tmp_path, capsys):
    root, _, diverged = tiny_runs
    assert 1e6 > TrainConfig().diverge_loss  # "exploding" is above the default threshold
    for name, rec in diverged.items():
        assert rec["status"] == "diverged" and rec["train"]["diverged_at_step"] == 2
        assert rec["train"]["diverged_loss"] == {"nan": "nan", "inf": "inf", "exploding": 1e6}[name]
    assert report.main([str(root), "--out", str(tmp_path / "tables"), "--table", "overview"]) == 0
    overview = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in overview.splitlines() if line.startswith("| ")}
    for rec in diverged.values():
        assert "diverged" in [cell.strip() for cell in rows[rec["run_id"]].split("|")]
    assert report.main([str(root), "--out", str(tmp_path / "tables"), "--table", "all"]) == 0
    tables = capsys.readouterr().out
    # aggregated tables: the group carries a '*' and a note names the diverged runs it left out of the means
    marked = [line for line in tables.splitlines() if line.startswith("- * diverged")]
    assert marked and all(all(rec["run_id"] in line for rec in diverged.values()) for line in marked)
    assert re.search(r"\| lora\* +\|", tables)


# ----------------------------------------------------------------------------------------------------------------
# The report on corrupt and partial records
# ----------------------------------------------------------------------------------------------------------------

ODD_VALUES = [None, "x", "", 7, -1, 0, 1e308, True, [], [1, "a"], {}, {"a": {"b": None}}, "nan", "inf"]
ODD_PATHS = [
    ("status",),
    ("run_id",),
    ("config",),
    ("accounting",),
    ("train",),
    ("eval",),
    ("meta",),
    ("error",),
    ("estimate",),
    ("quant",),
    ("config", "peft"),
    ("config", "peft", "r"),
    ("config", "peft", "by_layer"),
    ("config", "peft", "variant"),
    ("config", "quant"),
    ("config", "quant", "group_size"),
    ("config", "model"),
    ("config", "model", "name"),
    ("config", "data"),
    ("config", "train"),
    ("config", "train", "max_steps"),
    ("config", "seed"),
    ("accounting", "trainable_params"),
    ("accounting", "total_params"),
    ("accounting", "quantized_model_bytes"),
    ("train", "losses"),
    ("train", "s_per_step"),
    ("train", "peak_memory_bytes"),
    ("train", "final_loss"),
    ("eval", "before"),
    ("eval", "after"),
    ("eval", "after", "ppl_heldout"),
    ("meta", "start_time"),
]


def _with(record: dict, path: tuple[str, ...], value) -> dict:
    out = json.loads(json.dumps(record))
    node = out
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return out


def test_the_report_never_crashes_on_corrupt_or_partial_records(tiny_runs, tmp_path, capsys):
    root, partial, _ = tiny_runs
    text = (root / "completed" / results.RECORD).read_text()
    record = json.loads(text)
    runs = tmp_path / "runs"
    files: dict[str, bytes] = {f"partial{i}": snap.encode() for i, snap in enumerate(partial)}
    rng = random.Random(0)
    for cut in sorted({0, 1, *rng.sample(range(2, len(text)), 40)}):
        files[f"cut{cut}"] = text[:cut].encode()  # a record cut short, as a plain non-atomic write would leave
    for i in range(10):
        raw = bytearray(text.encode())
        for pos in rng.sample(range(len(raw)), 5):
            raw[pos] = rng.randrange(256)  # garbage bytes, invalid UTF-8 included
        files[f"garbage{i}"] = bytes(raw)
    for i, (path, value) in enumerate(itertools.product(ODD_PATHS, ODD_VALUES)):
        files[f"odd{i}"] = json.dumps(_with(record, path, value)).encode()
    for name, content in files.items():
        (runs / name).mkdir(parents=True)
        (runs / name / results.RECORD).write_bytes(content)
    (runs / "dangling").mkdir()
    (runs / "dangling" / results.RECORD).symlink_to(tmp_path / "nowhere.json")

    loaded = report.load_records(runs)
    unreadable = {u.path.parent.name for u in loaded.unreadable}
    assert {n for n in files if n.startswith("cut")} <= unreadable | {f"cut{len(text)}"}
    assert "dangling" in unreadable
    for table in ("all", "overview"):
        code = report.main([str(runs), "--out", str(tmp_path / "tables"), "--table", table, "--figures"])
        assert code == 0
        out = capsys.readouterr().out
        for name in unreadable:  # each is listed, with its reason
            assert f"unreadable: {runs / name / results.RECORD} (" in out


# ----------------------------------------------------------------------------------------------------------------
# A lock per run id
# ----------------------------------------------------------------------------------------------------------------

HOLD = (
    "import sys, time\nfrom qpeft_bench import results\nassert results.RunLock(sys.argv[1]).acquire() is None\n"
    "print('locked', flush=True)\ntime.sleep(600)\n"
)


def test_a_run_held_by_another_process_is_skipped_and_a_dead_holder_blocks_nothing(compose, tmp_path, caplog):
    caplog.set_level("INFO", logger="qpeft_bench")
    config = compose(["mode=plan"])
    run_dir = tmp_path / results.run_id(config)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert results.RunLock(run_dir).acquire() == holder.pid
        assert recipe.run(config, run_dir, progress=False) == "skipped"
        assert f"skip: run {results.run_id(config)} is running in another process (pid {holder.pid})" in caplog.text
        assert not (run_dir / results.RECORD).exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel drops the lock with the process
        holder.wait()
    assert recipe.run(config, run_dir, progress=False) == "planned"
    lock = results.RunLock(run_dir)
    assert lock.acquire() is None  # and run() gave its own lock back
    assert results.RunLock(run_dir).acquire() == os.getpid()  # a second open file of this process is refused too
    lock.release()


def test_two_processes_launching_the_same_sweep_run_each_run_once(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QPEFT_CACHE": str(tmp_path / "cache")}
    sweep = ["-m", "peft.r=4,8", "seed=0,1", *FAST, "output_root=runs"]
    procs = [
        subprocess.Popen(
            [*CLI, *sweep], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    records = [report.parse_record(p).data for p in tmp_path.glob(f"runs/*/{results.RECORD}")]
    assert len(records) == 4 and {r["status"] for r in records} == {"completed"}
    for rec in records:  # each run trained by exactly one of the two processes
        assert sum(out.count(f"completed {rec['run_id']} in ") for out in outs) == 1, outs
    for out in outs:  # and each process accounted for all four: ran it, or skipped it
        assert out.count("] - completed ") + out.count("] - skip: run ") == 4, out


# ----------------------------------------------------------------------------------------------------------------
# Credentials
# ----------------------------------------------------------------------------------------------------------------

SECRETS = {
    "HF_TOKEN": "hf_FakeTokenPlantedByTestReliability0123",
    "HUGGING_FACE_HUB_TOKEN": "hf_AnotherFakeHubTokenForTheScan4567",
    "WANDB_API_KEY": "0123456789abcdeffedcba9876543210fakewandb",
    "AWS_SECRET_ACCESS_KEY": "FakeAwsSecretKeyPlantedByTheTest/abc+123",
    "MY_SERVICE_TOKEN": "ghp_FakeGithubTokenPlantedByTheTest0123456789ab",
    "QPEFT_NOTE": "hf_TokenShapedValueUnderAnInnocentName89",  # a token by its shape, whatever the name
}


def test_planted_credentials_appear_in_no_file_a_run_a_sweep_or_the_report_writes(tmp_path):
    home = tmp_path / "home"
    env = {
        **os.environ,
        **SECRETS,
        "HF_HUB_OFFLINE": "1",
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(home / "wandb_config"),
        "WANDB_DATA_DIR": str(home / "wandb_data"),
        "QPEFT_CACHE": str(home / "qpeft"),
        "TMPDIR": str(home / "tmp"),
        "MPLCONFIGDIR": str(home / "mpl"),
    }
    (home / "tmp").mkdir(parents=True)
    wandb = ["logger=wandb", "wandb.mode=offline"]
    printed = []
    for args in ([*FAST, *wandb], ["-m", "peft.r=4,16", *FAST, *wandb]):
        proc = subprocess.run(
            [*CLI, *args, "output_root=runs"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        printed.append(proc.stdout + proc.stderr)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "qpeft-bench-report"), "runs", "--out", "tables", "--figures"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    printed.append(proc.stdout + proc.stderr)

    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    names = {p.name for p in written}
    # the scan covers what matters: records, saved configs, logs, W&B's offline files, the report's output
    assert {"result.json", "config.yaml", "overrides.yaml", "hydra.yaml", "cli.log", "debug.log"} <= names
    assert any(p.suffix == ".wandb" for p in written) and any(p.suffix == ".md" for p in written)
    assert len(list(tmp_path.glob("runs/*/result.json"))) == 3
    for value in SECRETS.values():
        assert not [str(p) for p in written if value.encode() in p.read_bytes()], value
        assert not [text for text in printed if value in text], value


def test_records_and_logs_redact_credentials_that_reach_them(tmp_path, monkeypatch):
    from qpeft_bench.cli import RedactSecrets

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # short flag values are not secrets
    leak = f"HTTP 401 for https://hub/?token={SECRETS['HF_TOKEN']} with {SECRETS['WANDB_API_KEY']}"
    typed = "hf_" + "TypedOnTheCommandLine" * 2  # never in the environment: caught by its shape
    path = tmp_path / results.RECORD
    results.atomic_write_json(
        path,
        {"error": {"message": leak}, "config": {"note": typed, "steps": 3, "data": "/data/hf_datasets_cache/x.json"}},
    )
    saved = json.loads(path.read_text())
    assert saved["error"]["message"] == f"HTTP 401 for https://hub/?token={results.REDACTED} with {results.REDACTED}"
    assert saved["config"] == {"note": results.REDACTED, "steps": 3, "data": "/data/hf_datasets_cache/x.json"}

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets())
    logger = logging.getLogger("qpeft_bench.test_redaction")
    logger.addHandler(handler)
    try:
        logger.error("run failed: %s", leak)
        try:
            raise RuntimeError(leak)
        except RuntimeError:
            logger.exception("traceback follows")
    finally:
        logger.removeHandler(handler)
    logged = stream.getvalue()
    assert "run failed: HTTP 401" in logged and "RuntimeError: HTTP 401" in logged
    assert all(value not in logged for value in SECRETS.values())


def test_memory_at_failure_reads_this_process():
    before = results.memory_at_failure("cpu")
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched: resident
    after = results.memory_at_failure("cpu")
    assert before["memory_kind"] == after["memory_kind"] == "cpu_rss"
    assert after["rss_bytes"] - before["rss_bytes"] >= block.numel() * 0.9
    assert after["rss_bytes"] <= after["peak_rss_bytes"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_cuda_out_of_memory_is_recorded_and_the_next_run_completes(compose, tmp_path, monkeypatch):
    """The CUDA allocator's own OutOfMemoryError (an allocation far beyond the card in the first training step), not
    a simulated one: status oom with the allocator's figures, and the next run of the process trains normally."""
    real = train_module.accumulate
    calls = itertools.count()

    def accumulate(*args, **kwargs):
        if next(calls) == 0:
            torch.empty(2**50, dtype=torch.uint8, device="cuda")  # a petabyte: refused by the allocator
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "accumulate", accumulate)
    assert recipe.run(compose([*FAST, "train.device=cuda"]), tmp_path / "oom", progress=False) == "oom"
    rec = json.loads((tmp_path / "oom" / results.RECORD).read_text())
    assert rec["error"]["type"] == "OutOfMemoryError" and rec["error"]["memory_kind"] == "cuda_allocated"
    assert rec["error"]["memory_allocated_bytes"] >= rec["accounting"]["quantized_model_bytes"] > 0
    assert recipe.run(compose([*FAST, "train.device=cuda", "seed=1"]), tmp_path / "next", progress=False) == "completed"


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_an_interrupted_run_says_so_in_its_record_and_on_one_line(how, tmp_path, qpeft_cli, monkeypatch):
    """Ctrl-C or SIGTERM (scancel, a SLURM time limit) in the middle of training: the record says failed with
    the signal, not `running` forever; no traceback; the exit code is the shell's 128 + signal."""
    from qpeft_bench import cli

    def interrupted(*args, **kwargs):
        if how == "SIGTERM":
            cli._terminate(signal.SIGTERM, None)  # what the handler does when the signal arrives
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "fine_tune", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    code, output = qpeft_cli(*FAST, f"output_root={tmp_path / 'runs'}")
    assert code == 128 + getattr(signal, how), output
    assert f"qpeft-bench: interrupted by {how}" in output and "Traceback" not in output, output
    (path,) = tmp_path.rglob(results.RECORD)
    record = json.loads(path.read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "Interrupted"
    assert record["error"]["message"].startswith(f"stopped by {how} at ")
    assert signal.getsignal(signal.SIGTERM) == before  # the handler goes when the command ends
