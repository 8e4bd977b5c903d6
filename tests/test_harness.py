"""lm-eval task sets on the embedded tiny model, offline, from our own fixtures (qpeft_bench/assets/eval_fixtures).

Expected values come from lm-eval's own task configs (versions, splits, subject list) or from the fixture files
(item counts); the 57 MMLU subjects are docs/reference/evaluations.md's number. The scores of the tiny model
on made-up items mean nothing; what is checked is the wiring: each set runs end to end without the network,
records lm-eval's versions, n-shot and splits, and aggregates as documented.
"""

from __future__ import annotations

import json
import math
import runpy
import shutil
import socket
from pathlib import Path

import pytest

from qpeft_bench import ASSETS, models
from qpeft_bench.config import ConfigError
from qpeft_bench.evaluation import harness

ROOT = Path(__file__).resolve().parent.parent
FIX = harness.FIXTURES
LIMIT = 2  # items per lm-eval task; MMLU-bearing sets use 1 (57 subjects x 5-shot prompts dominate the time)
MAX_GEN = 8  # gsm8k's generated tokens (lm-eval's default is 256)


@pytest.fixture(scope="module")
def tiny():
    path = str(ASSETS / "tiny_llama")
    return models.load_model(path, "float32", "cpu").eval(), models.load_tokenizer(path)


def _run(tiny, task_set: str, limit: int, model=None) -> dict:
    model = tiny[0] if model is None else model
    return harness.run_task_set(
        model,
        tiny[1],
        task_set,
        batch_size=16,
        data_root=FIX,
        limit=limit,
        device="cpu",
        max_gen_toks=MAX_GEN,
        progress=False,
    )


@pytest.fixture(scope="module")
def commonsense(tiny):
    """Run with every hub switch set to online and every socket call recorded and refused: local data must need
    neither the network nor HF_DATASETS_OFFLINE (tests/conftest.py sets it; real offline machines may not)."""
    import datasets.config
    import huggingface_hub.constants

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network access in an offline test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        for target, name in ((socket, "getaddrinfo"), (socket, "create_connection"), (socket.socket, "connect")):
            mp.setattr(target, name, refuse)
        record = _run(tiny, "commonsense", LIMIT)
    assert attempts == [], f"the offline evaluation tried the network: {attempts}"
    return record


@pytest.fixture(scope="module")
def mmlu(tiny):
    return _run(tiny, "mmlu", 1)


@pytest.fixture(scope="module")
def leaderboard(tiny):
    return _run(tiny, "leaderboard", 1)


def _lm_eval_facts(task_set: str, task: str) -> dict:
    """What lm-eval's own YAML says about a task, and how many items our fixture has in its evaluated split."""
    tm = harness.set_task_manager(task_set)
    cfg = harness.task_config(tm, task)
    split = cfg.get("test_split") or cfg.get("validation_split")
    lines = harness.local_files(cfg, FIX)[split].read_text().splitlines()
    return {"version": cfg["metadata"]["version"], "split": split, "items": len(lines)}


def _check_entry(entry: dict, task_set: str, task: str, spec: harness.TaskSpec, limit: int):
    facts = _lm_eval_facts(task_set, task)
    assert entry["version"] == facts["version"]
    assert entry["split"] == facts["split"]
    assert entry["num_fewshot"] == spec.num_fewshot
    assert (entry["metric"], entry["filter"]) == (spec.metric, spec.filter)
    assert entry["samples"] == min(limit, facts["items"])
    assert math.isfinite(entry["value"]) and 0.0 <= entry["value"] <= 1.0


def _common(record: dict, task_set: str, limit: int):
    assert record["engine"] == "lm-eval" and record["task_set"] == task_set
    from importlib.metadata import version

    assert record["lm_eval_version"] == version("lm_eval")
    assert record["batch_size"] == 16 and record["limit"] == limit
    assert record["data"] == {"source": "local", "root": str(FIX)}
    assert record["wall_time_s"] > 0 and record["seeds"]["fewshot_seed"] is not None
    assert json.loads(json.dumps(record, allow_nan=False)) == record  # goes into result.json as it is
    assert list(record["tasks"]) == [s.task for s in harness.TASK_SETS[task_set]["tasks"]]
    for name, members in harness.TASK_SETS[task_set]["averages"].items():
        assert record[name] == pytest.approx(sum(record["tasks"][m]["value"] for m in members) / len(members))


def test_commonsense_runs_offline_with_lm_eval_metadata(commonsense):
    _common(commonsense, "commonsense", LIMIT)
    for spec in harness.TASK_SETS["commonsense"]["tasks"]:
        _check_entry(commonsense["tasks"][spec.task], "commonsense", spec.task, spec, LIMIT)
    # evaluations.md: hellaswag and arc_challenge report acc_norm, the others acc; all 0-shot.
    metrics = {t: e["metric"] for t, e in commonsense["tasks"].items()}
    assert metrics == {t: "acc_norm" if t in ("hellaswag", "arc_challenge") else "acc" for t in metrics}
    assert {e["num_fewshot"] for e in commonsense["tasks"].values()} == {0}
    assert len(metrics) == 7


def test_mmlu_covers_every_subject_and_averages_them_unweighted(mmlu):
    _common(mmlu, "mmlu", 1)
    entry = mmlu["tasks"]["mmlu"]
    tm = harness.set_task_manager("mmlu")
    subjects = harness.leaf_tasks(tm, "mmlu")
    assert len(subjects) == 57  # evaluations.md: 57 subjects
    assert sorted(entry["subtasks"]) == sorted(subjects)
    spec = harness.TASK_SETS["mmlu"]["tasks"][0]
    for task, sub in entry["subtasks"].items():
        _check_entry(sub, "mmlu", task, spec, 1)
        assert sub["fewshot_split"] == harness.task_config(tm, task)["fewshot_split"]  # shots from dev
    values = [s["value"] for s in entry["subtasks"].values()]
    assert entry["value"] == pytest.approx(sum(values) / len(values))
    assert mmlu["average"] == entry["value"]
    assert entry["samples"] == 57 and entry["version"] == tm.task_index["mmlu"].cfg["metadata"]["version"]
    assert (entry["num_fewshot"], entry["split"], entry["fewshot_split"]) == (5, "test", "dev")


def test_group_value_is_the_unweighted_subject_mean_not_lm_evals_weighted_one():
    """On subjects of different sizes the two aggregations differ; ours is the studies' unweighted mean and
    lm-eval's (kept as lm_eval_value) weighs by items, as lm-eval's mmlu group YAML declares."""
    tm = harness.set_task_manager("mmlu")
    subjects = harness.leaf_tasks(tm, "mmlu")
    acc = {t: i / (len(subjects) - 1) for i, t in enumerate(subjects)}
    size = {t: i + 1 for i, t in enumerate(subjects)}
    out = {
        "configs": {t: {"test_split": "test", "fewshot_split": "dev"} for t in subjects},
        "results": {t: {"acc,none": acc[t], "acc_stderr,none": 0.1} for t in subjects},
        "versions": dict.fromkeys(subjects, 1.0),
        "n-shot": dict.fromkeys(subjects, 5),
        "n-samples": {t: {"original": size[t], "effective": size[t]} for t in subjects},
    }
    entry = harness.summarize(out, "mmlu")["tasks"]["mmlu"]
    unweighted = sum(acc.values()) / len(acc)
    weighted = sum(acc[t] * size[t] for t in subjects) / sum(size.values())
    assert entry["value"] == pytest.approx(unweighted)
    assert entry["lm_eval_value"] == pytest.approx(weighted)
    assert abs(unweighted - weighted) > 0.1
    # stderr of a mean of k independent means: sqrt(sum se^2) / k
    assert entry["stderr"] == pytest.approx(math.sqrt(len(subjects) * 0.1**2) / len(subjects))
    assert entry["samples"] == sum(size.values())


def test_leaderboard_records_shots_metrics_and_both_averages(leaderboard):
    _common(leaderboard, "leaderboard", 1)
    tasks = leaderboard["tasks"]
    for spec in harness.TASK_SETS["leaderboard"]["tasks"]:
        if spec.task != "mmlu":
            _check_entry(tasks[spec.task], "leaderboard", spec.task, spec, 1)
    assert len(tasks["mmlu"]["subtasks"]) == 57
    assert set(harness.TASK_SETS["leaderboard"]["averages"]["average_4"]) == {
        "arc_challenge",
        "hellaswag",
        "mmlu",
        "truthfulqa_mc2",
    }
    assert set(harness.TASK_SETS["leaderboard"]["averages"]["average"]) == set(tasks) and len(tasks) == 6
    # The few-shot overrides reached lm-eval: these differ from the n-shot lm-eval's YAMLs set on their own.
    assert tasks["hellaswag"]["num_fewshot"] != 0 and tasks["arc_challenge"]["fewshot_split"] == "train"
    # gsm8k generation: lm-eval's stop strings kept, our token cap applied and recorded.
    gen = tasks["gsm8k"]["generation_kwargs"]
    assert gen["max_gen_toks"] == MAX_GEN and "Question:" in gen["until"]
    assert leaderboard["generation_overrides"] == {"max_gen_toks": MAX_GEN}


def test_peft_wrapped_model_gives_the_same_scores_and_keeps_its_mode(tiny, commonsense):
    """A fresh LoRA (B = 0) changes no output, so the peft wrapper must score exactly like the bare model; the
    model comes back in the training mode it was handed in."""
    import copy

    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(tiny[0]), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    wrapped.train()
    record = _run(tiny, "commonsense", LIMIT, model=wrapped)
    assert wrapped.training
    assert {t: e["value"] for t, e in record["tasks"].items()} == {
        t: e["value"] for t, e in commonsense["tasks"].items()
    }


def test_overrides_touch_only_the_data_source_and_n_shot():
    for task_set in harness.TASK_SETS:
        tm = harness.set_task_manager(task_set)
        (hub,) = harness.lm_eval_tasks(task_set, None)
        (local,) = harness.lm_eval_tasks(task_set, FIX)
        assert all(set(m) == {"task", "num_fewshot"} for m in hub["task"])  # hub ids unchanged
        for m in local["task"]:
            unset = set(m) & set(harness.SPLIT_KEYS)  # splits the task does not read at its n-shot (issue 19)
            assert set(m) - unset == {"task", "num_fewshot", "dataset_path", "dataset_name", "dataset_kwargs"}
            assert all(m[k] is None for k in unset)
            reads = harness.read_splits(harness.task_config(tm, m["task"]), m["num_fewshot"])
            assert not unset & set(reads) and set(m["dataset_kwargs"]["data_files"]) == set(reads.values())
            assert all(Path(p).is_file() for p in m["dataset_kwargs"]["data_files"].values())


def test_missing_local_file_names_the_path_and_the_settings(tmp_path, monkeypatch, tiny):
    root = tmp_path / "data"
    shutil.copytree(FIX, root)
    cfg = harness.task_config(harness.set_task_manager("commonsense"), "arc_challenge")
    gone = harness.local_files(cfg, root)["test"]
    gone.unlink()
    with pytest.raises(ConfigError) as err:
        harness.run_task_set(tiny[0], tiny[1], "commonsense", batch_size=1, data_root=root, device="cpu")
    msg = str(err.value)
    assert str(gone) in msg and "1 file(s)" in msg and "data_root" in msg and harness.ENV_DATA in msg
    # The environment variable is the fallback root, and the message says which one was used.
    monkeypatch.setenv(harness.ENV_DATA, str(root))
    with pytest.raises(ConfigError, match=rf"set by \${harness.ENV_DATA}"):
        harness.check_local_data("commonsense", None)
    assert harness.check_local_data("mmlu", None) == root  # MMLU's files are all there
    assert harness.resolve_data_root(FIX) == FIX  # an explicit root wins over the variable
    monkeypatch.delenv(harness.ENV_DATA)
    assert harness.check_local_data("commonsense", None) is None  # neither: the hub


def test_bad_arguments_are_config_errors(tiny):
    with pytest.raises(ConfigError, match="choose one of"):
        harness.check_local_data("mmlu_pro", FIX)
    with pytest.raises(ConfigError, match="model is on cpu"):
        harness.run_task_set(tiny[0], tiny[1], "commonsense", batch_size=1, data_root=FIX, device="cuda")


def test_fixture_script_is_deterministic_and_matches_the_committed_files(tmp_path):
    script = runpy.run_path(str(ROOT / "scripts" / "make_eval_fixtures.py"))
    committed = {p.relative_to(FIX).as_posix(): p.read_bytes() for p in FIX.rglob("*") if p.is_file()}
    for run in ("a", "b"):
        script["main"](["--out", str(tmp_path / run)])
        out = tmp_path / run
        assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == committed
    assert sum(len(b) for b in committed.values()) < 300 * 1024
    # It only replaces its own output folder.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        script["main"](["--out", str(tmp_path / "other")])
    assert (tmp_path / "other" / "keep.txt").exists()


@pytest.mark.slow
def test_task_dirs_resolve_to_the_same_yaml_as_lm_evals_full_index():
    from lm_eval.tasks import TaskManager

    full = TaskManager().task_index
    for task_set in harness.TASK_SETS:
        tm = harness.set_task_manager(task_set)
        for spec in harness.TASK_SETS[task_set]["tasks"]:
            for task in harness.leaf_tasks(tm, spec.task):
                assert tm.task_index[task].yaml_path == full[task].yaml_path, task
