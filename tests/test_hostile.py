"""Reliability, round two (issue 20): hostile input and hostile environments beyond the first catalogue.

Bad input ends with one line naming the knob (and the file or row where there is one), exit 1, no record, no model
loaded and nothing created outside the output root. Environment faults (a cache that cannot be written or holds
garbage, a W&B directory that cannot be written) let the run complete with a warning. Credentials reach no file and
no output. docs/reliability.md lists these guarantees; the report's and the data files' own cases are in
tests/test_report_hostile.py and tests/test_data_hostile.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import CLI, FAST

from qpeft_bench import ASSETS, models, quant, results
from qpeft_bench import train as train_module

TINY = ASSETS / "tiny_llama"
ROW = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


def _model_copy(tmp: Path, name: str, weights: bool = True, **config_edits) -> Path:
    out = tmp / name
    out.mkdir()
    for file in TINY.iterdir():
        if file.is_file() and (weights or not file.name.endswith(".safetensors")):
            shutil.copy(file, out)
    if config_edits:
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, **config_edits}))
    return out


def _inputs(tmp: Path) -> None:
    """The files the cases name, in the formats a user would have."""
    (tmp / "one.jsonl").write_text(json.dumps(ROW) + "\n")
    (tmp / "empty_targets.jsonl").write_text("".join(json.dumps({**ROW, "output": ""}) + "\n" for _ in range(20)))
    (tmp / "a_file").write_text("not a directory\n")
    (tmp / "calib.txt").write_text("")
    _model_copy(tmp, "no_weights", weights=False)
    lfs = _model_copy(tmp, "lfs_weights", weights=False)
    (lfs / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    sharded = _model_copy(tmp, "missing_shard", weights=False)
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    _model_copy(tmp, "small_vocab", vocab_size=16)
    (tmp / "not_a_run").mkdir()


# (case, overrides with {tmp}, what the one line must say)
BAD_INPUT = [
    # writes where it must not
    ("empty output_root", ["output_root="], "output_root is empty"),
    ("output_root the filesystem root", ["output_root=/"], "output_root='/' is the filesystem root"),
    ("output_root under a file", ["output_root={tmp}/a_file/runs"], "{tmp}/a_file is a file, not a directory"),
    ("mode=eval run_dir typo", ["mode=eval", "run_dir={tmp}/typo/run"], "run_dir='{tmp}/typo/run' is not a directory"),
    ("mode=eval without run_dir", ["mode=eval"], "mode=eval needs run_dir="),
    ("mode=eval run_dir without a record", ["mode=eval", "run_dir={tmp}/not_a_run"], "holds no readable result.json"),
    ("mode=eval run_dir a file", ["mode=eval", "run_dir={tmp}/a_file"], "run_dir='{tmp}/a_file' is not a directory"),
    # non-finite numbers
    ("lr nan", ["train.lr=nan"], "train.lr=nan holds nan"),
    ("lr inf", ["train.lr=inf"], "train.lr=inf holds inf"),
    ("alpha nan", ["peft.alpha=nan"], "peft.alpha=nan holds nan"),
    ("max_grad_norm nan", ["train.max_grad_norm=nan"], "train.max_grad_norm=nan holds nan"),
    ("weight decay inf", ["train.weight_decay=inf"], "train.weight_decay=inf holds inf"),
    ("dropout -inf", ["peft.dropout=-inf"], "peft.dropout=-inf holds -inf"),
    ("diverge_loss nan", ["train.diverge_loss=nan"], "train.diverge_loss=nan holds nan"),
    ("val_fraction nan", ["data.val_fraction=nan"], "data.val_fraction=nan holds nan"),
    ("memory_budget inf", ["train.memory_budget=inf"], "train.memory_budget=inf holds inf"),
    ("memory_budget 'inf' as text", ["train.memory_budget='inf'"], "train.memory_budget='inf'; give GiB"),
    ("a nan inside by_layer", ["+peft.by_layer={{mlp: {{alpha: .nan}}}}"], "nan"),
    # counts beyond any run, wrong types named by their knob
    ("grad_accum 10**23", ["train.grad_accum=100000000000000000000000"], "no count, size or seed of a run goes beyond"),
    ("max_steps -10**30", ["train.max_steps=-1000000000000000000000000000000"], "train.max_steps=-1000000000"),
    (
        "a huge rank inside by_layer",
        ["peft.by_layer.mlp.r=10000000000000"],
        "peft.by_layer.mlp.r=10000000000000: no count",
    ),
    ("a text rank inside by_layer", ["peft.by_layer.mlp.r=eight"], "peft.by_layer.mlp.r='eight' has the wrong type"),
    ("by_layer group not a mapping", ["peft.by_layer.mlp=8"], "peft.by_layer.mlp=8: expected a mapping of knobs"),
    (
        "a list of the wrong elements",
        ["eval.tasks=[ppl_heldout,3]"],
        "eval.tasks[1]=3 has the wrong type: expected str",
    ),
    # seeds out of range
    ("seed too large", ["seed=99999999999999999999"], "seed=99999999999999999999 is out of range"),
    ("negative seed", ["seed=-1"], "seed=-1 is out of range"),
    ("split seed 2**32", ["data.split_seed=4294967296"], "data.split_seed=4294967296 is out of range"),
    ("calibration seed negative", ["calib.seed=-3"], "calib.seed=-3 is out of range"),
    # data too small for its split, nothing to learn
    ("one-row data set", ["data.path={tmp}/one.jsonl"], "1 example(s) (data.max_examples=120) are too few"),
    ("max_examples=1", ["data.max_examples=1"], "1 example(s) (data.max_examples=1) are too few"),
    ("val_fraction 0.995", ["data.val_fraction=0.995"], "are too few for data.val_fraction=0.995"),
    ("every target empty", ["data.path={tmp}/empty_targets.jsonl"], "have a non-empty target after tokenization"),
    (
        "unknown data variant",
        ["data.variant=nope"],
        "data format 'alpaca' has no variant 'nope' (it has none); set data.variant=null",
    ),
    # the model's files
    ("model directory without weights", ["model.path={tmp}/no_weights"], "holds no weights"),
    ("weights that are a Git LFS pointer", ["model.path={tmp}/lfs_weights"], "is a Git LFS pointer, not the weights"),
    ("a shard the index names is missing", ["model.path={tmp}/missing_shard"], "names 1 shard(s) that are not there"),
    ("tokenizer ids beyond the embedding", ["model.path={tmp}/small_vocab"], "vocab_size=16"),
]


# Further cases of our own, beyond the (other knobs, other files): the same promise.
MORE = [
    ("empty data.path", ["data.path="], "data.path is empty"),
    ("empty model.path", ["model.path="], "model.path is empty"),
    ("empty calib.path", ["calib=text", "calib.path="], "calib.path is empty"),
    ("empty eval.data_root", ["eval=mmlu", "eval.data_root="], "eval.data_root is empty"),
    ("empty eval.wikitext.path", ["eval.tasks=[ppl_wikitext]", "eval.wikitext.path="], "eval.wikitext.path is empty"),
    (
        "a WikiText copy without a known suffix",
        ["eval.tasks=[ppl_wikitext]", "eval.wikitext.path={tmp}/a_file"],
        "eval.wikitext.path {tmp}/a_file: a WikiText copy is the raw file (.raw, .txt",
    ),
    ("no eval task", ["eval.tasks=[]"], "eval.tasks is empty"),
    ("empty peft.targets", ["peft.targets=[]"], "peft.targets=[]"),
    ("peft.targets outside the linears", ["peft.targets=[lm_head]"], "peft.targets ['lm_head'] are not among"),
    ("a linear name that matches nothing", ["model.linear_names=[nope]"], "nope"),
    ("a CUDA device that is not there", ["train.device=cuda:99"], "train.device='cuda:99'"),
    ("negative memory budget", ["train.memory_budget=-1"], "train.memory_budget=-1; give GiB"),
    ("a float for an int", ["train.max_steps=1e3"], "train.max_steps=1000.0 has the wrong type: expected int"),
    ("a bool for an int", ["peft.r=true"], "peft.r=True has the wrong type: expected int"),
    ("an int for a bool", ["overwrite=1"], "overwrite=1 has the wrong type"),
    ("a fractional seed", ["seed=1.5"], "seed=1.5 has the wrong type: expected int"),
    ("negative warm-up", ["train.warmup_steps=-1"], "train.warmup_steps=-1 must be >= 0"),
    ("zero target length", ["data.max_target_len=0"], "data.max_target_len=0 must be > 0"),
    ("zero harness limit", ["eval=mmlu", "eval.harness.limit=0"], "eval.harness.limit=0 must be > 0"),
    ("negative checkpoint interval", ["train.checkpoint_every=-5"], "train.checkpoint_every=-5 must be >= 0"),
    ("a by_layer group that does not exist", ["+peft.by_layer={{nogroup: {{r: 4}}}}"], "nogroup"),
    ("a by_layer knob that does not exist", ["+peft.by_layer={{mlp: {{nope: 4}}}}"], "nope"),
    ("an overflowing float", ["train.max_grad_norm=1e400"], "train.max_grad_norm=inf holds inf"),
    ("an underflowing learning rate", ["train.lr=1e-400"], "train.lr=0.0 must be > 0"),
    ("warm-up longer than training", ["train.warmup_steps=10"], "train.warmup_steps=10 exceeds train.max_steps=4"),
    ("an output_root named ~ literally", ["output_root='~nouser/runs'"], "~nouser names no home directory"),
    ("a float64 model", ["model.dtype=float64"], "model.dtype='float64'"),
]


def _tree(path: Path) -> set[str]:
    return {str(p) for p in path.rglob("*")}


@pytest.mark.parametrize("case, overrides, message", BAD_INPUT + MORE, ids=[c[0] for c in BAD_INPUT + MORE])
def test_bad_input_is_one_line_and_touches_nothing(case, overrides, message, tmp_path, qpeft_cli, monkeypatch):
    _inputs(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    def refuse(*args, **kwargs):
        raise AssertionError(f"{case}: a model was loaded for a bad input")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(quant, "quantize_model", refuse)
    args = [o.format(tmp=tmp_path) for o in overrides]
    root = [] if any(a.startswith("output_root=") for a in args) else [f"output_root={tmp_path / 'runs'}"]
    before, top = _tree(tmp_path), set(os.listdir("/"))
    code, output = qpeft_cli(*FAST, *args, *root)
    assert code == 1, output
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in output, output
    assert message.format(tmp=tmp_path) in errors[0], output
    runs = str(tmp_path / "runs")
    outside = [p for p in _tree(tmp_path) - before if p != runs and not p.startswith(runs + os.sep)]
    assert not outside, f"{case}: created outside the output root: {outside}"
    assert not list(tmp_path.rglob(results.RECORD)) or case.startswith("mode=eval")  # nothing claims a result
    assert set(os.listdir("/")) == top


def test_an_output_root_that_cannot_be_created_is_one_line(tmp_path, qpeft_cli):
    """/proc refuses a new directory even to root (the machines here run tests as root, which chmod cannot stop)."""
    code, output = qpeft_cli(*FAST, "output_root=/proc/qpeft-bench-runs")
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert code == 1 and len(errors) == 1 and "Traceback" not in output, output
    assert "cannot write /proc/qpeft-bench-runs" in errors[0]


def test_an_override_error_never_prints_the_credential_it_quotes(qpeft_cli):
    wandb_key = "0123456789abcdef0123456789abcdef01234567"  # W&B keys are 40 hex digits: no shape to catch
    code, output = qpeft_cli(f"wandb.api_key={wandb_key}", "hf_token=hf_" + "x" * 34)
    assert code == 1 and "Could not override 'wandb.api_key'" in output
    assert wandb_key not in output and "hf_xxxx" not in output and results.REDACTED in output


def test_a_failure_with_an_empty_message_is_summarised(tmp_path, qpeft_cli, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError()  # str(err) == ""

    monkeypatch.setattr(train_module, "train", fail)
    import qpeft_bench.recipe as recipe

    monkeypatch.setattr(recipe, "train", fail)
    code, output = qpeft_cli(*FAST, f"output_root={tmp_path}/runs", "eval.before_finetune=false")
    assert code == 1
    record = json.loads(next((tmp_path / "runs").rglob(results.RECORD)).read_text())
    assert record["status"] == "failed" and record["error"] == {"type": "RuntimeError", "message": ""}
    assert "failed" in output and "IndexError" not in output


# ----------------------------------------------------------------------------------------------------------------
# Environment faults: the run completes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["QPEFT_CACHE", "HOME"])
def test_an_unwritable_cache_is_a_warning_and_cache_base_keeps_the_run_id(
    where, tmp_path, qpeft_cli, monkeypatch, compose
):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    if where == "HOME":  # the default cache, ~/.cache/qpeft-bench, under a home that cannot be written
        monkeypatch.delenv("QPEFT_CACHE", raising=False)
        monkeypatch.setenv("HOME", "/proc/qpeft-no-home")
    else:
        monkeypatch.setenv("QPEFT_CACHE", str(blocker / "cache"))  # its folder would be under a regular file
    code, output = qpeft_cli(*FAST, f"output_root={tmp_path}/runs")
    assert code == 0, output
    assert "base-eval cache not written" in output
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob(results.RECORD)]
    assert record["status"] == "completed" and record["eval"]["before"]["ppl_heldout"] > 1
    # the way round it, eval.cache_base=false, is the same run: its id does not change
    assert results.run_id(compose([*FAST, "eval.cache_base=false"])) == record["run_id"]


@pytest.mark.parametrize(
    "garbage",
    [
        "{not json",
        json.dumps({"task": "ppl_heldout", "result": 1.0}),  # another base's entry (no identity) under this name
        "RESULT",  # a well-formed entry whose result is a string: written below with the real identity
        "NAN",  # ... whose result is not finite
        "FIFO",  # a named pipe under the entry's name: reading it would wait for ever
    ],
)
def test_a_malformed_cache_entry_is_never_trusted(garbage, tmp_path, qpeft_cli, monkeypatch):
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    assert qpeft_cli(*FAST, f"output_root={tmp_path}/first")[0] == 0
    (first,) = [json.loads(p.read_text()) for p in (tmp_path / "first").rglob(results.RECORD)]
    (entry,) = (tmp_path / "cache" / "base_eval").glob("ppl_heldout-*.json")
    if garbage in ("RESULT", "NAN"):
        stored = json.loads(entry.read_text())
        garbage = json.dumps({**stored, "result": "12.5" if garbage == "RESULT" else "nan"})
    if garbage == "FIFO":
        entry.unlink()
        os.mkfifo(entry)
    else:
        entry.write_text(garbage)
    code, output = qpeft_cli(*FAST, f"output_root={tmp_path}/second", "train.lr=1e-4")
    assert code == 0, output
    assert "computing it again" in output
    (second,) = [json.loads(p.read_text()) for p in (tmp_path / "second").rglob(results.RECORD)]
    assert second["eval"]["before"]["ppl_heldout"] == first["eval"]["before"]["ppl_heldout"]
    if garbage != "FIFO":  # a FIFO stays in the way: the write is a warning, the run's result is computed
        assert json.loads(entry.read_text())["result"] == first["eval"]["before"]["ppl_heldout"]  # repaired


def test_a_wandb_directory_that_cannot_be_written_is_a_warning(tmp_path, qpeft_cli):
    code, output = qpeft_cli(
        *FAST, f"output_root={tmp_path}/runs", "logger=wandb", "wandb.mode=offline", "wandb.dir=/proc/qpeft-wandb"
    )
    assert code == 0, output
    assert "W&B logging failed" in output  # not W&B's own fallback to files in the system's temporary folder
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob(results.RECORD)]
    assert record["status"] == "completed" and record["wandb_dir"] is None


# ----------------------------------------------------------------------------------------------------------------
# Credentials: none in any file W&B, Hydra or the run writes
# ----------------------------------------------------------------------------------------------------------------


def test_credentials_in_the_config_reach_no_wandb_or_hydra_file(tmp_path):
    """A token-shaped config value, and an environment secret pulled into the config with ${oc.env:...}: the record
    redacted them before; W&B's offline files (what `wandb sync` uploads), Hydra's saved config, overrides and a
    sweep's multirun.yaml, the logs and the output must too."""
    shaped = "hf_" + "PlantedInTheConfig" * 2
    env_secret = "s3cr3t-" + "e" * 24
    home = tmp_path / "home"
    env = {
        **os.environ,
        "MY_SERVICE_API_KEY": env_secret,
        "HF_HUB_OFFLINE": "1",
        "HOME": str(home),
        "WANDB_CACHE_DIR": str(home / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(home / "wandb_config"),
        "WANDB_DATA_DIR": str(home / "wandb_data"),
        "QPEFT_CACHE": str(home / "qpeft"),
    }
    printed = []
    for sweep in ([], ["-m", "peft.r=4,8"]):
        proc = subprocess.run(
            [
                *CLI,
                *sweep,
                *FAST,
                f"model.notes={shaped}",
                "data.name=${oc.env:MY_SERVICE_API_KEY}",
                "logger=wandb",
                "wandb.mode=offline",
                "output_root=runs",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        printed.append(proc.stdout + proc.stderr)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    names = {p.name for p in written}
    assert {"result.json", "config.yaml", "overrides.yaml", "multirun.yaml", "debug.log"} <= names
    assert any(p.suffix == ".wandb" for p in written)
    for value in (shaped, env_secret):
        assert not [str(p) for p in written if value.encode() in p.read_bytes()], value
        assert not [text for text in printed if value in text], value
