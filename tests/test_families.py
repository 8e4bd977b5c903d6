"""Model families (qpeft_bench/families.py): each declaration is what transformers builds, a checkpoint without a card
runs from its config.json, plan mode counts each family's quantized model to the byte, and layer groups go by role."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FAST, measured_accounting

from qpeft_bench import ASSETS, adapters, calibration, families, layers, models, plan, quant
from qpeft_bench.config import ConfigError
from qpeft_bench.spec import validate

FAMILIES = families.names()
TOKENIZER = ("tokenizer.json", "tokenizer_config.json")


def _arch(model_type: str) -> dict:
    return {"model_type": model_type, **families.TINY_ARCH}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{model_type: a directory in the save_pretrained layout}: a tiny random model of each family, built offline
    from its config, with the embedded tokenizer (its vocabulary is the models')."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for model_type in FAMILIES:
        torch.manual_seed(0)
        model = models.random_model(_arch(model_type), "bfloat16", "cpu")
        where = root / f"tiny-{model_type}"
        model.save_pretrained(where)
        for name in TOKENIZER:
            shutil.copy(ASSETS / "tiny_llama" / name, where / name)
        out[model_type] = where
    return out


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_declaration_is_what_transformers_builds(model_type):
    family = families.get(model_type)
    arch = _arch(model_type)
    model = models.build_meta_model(arch, "float32")
    block = model.get_submodule(family.blocks)[0]
    linears = {n: (m.in_features, m.out_features, m.bias is not None) for n, m in block.named_modules()
               if isinstance(m, torch.nn.Linear)}  # fmt: skip
    assert linears == {lin.path: (*lin.shape(family.dims(arch)), lin.bias(arch)) for lin in family.linears}
    norms = {n for n, m in block.named_modules() if "norm" in type(m).__name__.lower()}
    assert norms == {*family.block_norms, *family.head_norms}
    assert len(model.get_submodule(family.blocks)) == arch["num_hidden_layers"]
    # every linear of a block is in exactly one layer group by role
    groups = layers.TYPE_GROUPS
    for name in family.linear_names:
        assert (name in groups["attn"]) + (name in groups["mlp"]) == 1, name


@pytest.mark.parametrize(
    "model_type, attn, mlp",
    [("llama", 4, 3), ("mistral", 4, 3), ("qwen2", 4, 3), ("qwen3", 4, 3), ("gemma2", 4, 3), ("gemma3_text", 4, 3),
     ("phi3", 2, 2), ("opt", 4, 2)],
)  # fmt: skip
def test_layer_groups_count_by_role_per_family(model_type, attn, mlp):
    model = models.build_meta_model(_arch(model_type), "float32")
    names = list(models.find_linears(model, families.get(model_type).linear_names))
    blocks = families.TINY_ARCH["num_hidden_layers"]
    count = {g: sum(layers.members(g, n, blocks, {}) for n in names) for g in ("attn", "mlp")}
    assert count == {"attn": attn * blocks, "mlp": mlp * blocks}
    halves = [sum(layers.members(g, n, blocks, {}) for n in names) for g in ("first_half", "second_half")]
    assert halves == [len(names) // 2] * 2


def test_every_declared_family_is_tested():
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "opt"}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_checkpoint_without_a_card_composes_from_its_config(compose, checkpoints, model_type):
    spec = validate(compose(["model=auto", f"model.path={checkpoints[model_type]}"]))
    assert spec.model.family == model_type
    assert spec.model.linear_names == families.get(model_type).linear_names
    assert spec.model.name == f"tiny-{model_type}"


def test_an_unknown_model_type_is_one_line_naming_the_known_ones(compose, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    with pytest.raises(ConfigError, match=r"model_type 'mamba' is no family qpeft-bench knows; known: llama, "):
        validate(compose(["model=auto", f"model.path={tmp_path}"]))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(ConfigError, match="its text model is model_type gemma3_text"):
        validate(compose(["model=auto", f"model.path={tmp_path}"]))


def test_a_card_whose_family_contradicts_the_checkpoint_is_refused(compose, checkpoints):
    with pytest.raises(ConfigError, match=r"the card's family=llama but .*config.json has model_type=qwen2"):
        validate(compose(["model=auto", "model.family=llama", f"model.path={checkpoints['qwen2']}"]))
    with pytest.raises(ConfigError, match=r"linear_names \['q_proj'\] are no linear of a phi3 block"):
        validate(compose(["model=auto", f"model.path={checkpoints['phi3']}", "model.linear_names=[q_proj]"]))


PLAN_QUANTS = [
    ("nf4", []),
    ("int8", []),
    ("rtn", ["quant.group_size=32"]),
    ("gptq", ["quant.group_size=32"]),
    ("owq", ["quant.group_size=32"]),
    ("hqq", []),
]


@pytest.mark.parametrize("qname, knobs", PLAN_QUANTS, ids=[q for q, _ in PLAN_QUANTS])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_plan_equals_the_really_quantized_model_to_the_byte(compose, checkpoints, model_type, qname, knobs):
    spec = validate(compose(["model=auto", f"model.path={checkpoints[model_type]}", f"quant={qname}", *knobs]))
    planned = plan.plan_accounting(spec)
    real = measured_accounting(spec, samples=4, seq_len=32)
    keys = ("total_params", "base_model_bytes", "param_buffer_bytes", "quantized_model_bytes", "quant_state_bytes",
            "trainable_params", "adapter_bytes", "peft_overhead_bytes")  # fmt: skip
    assert {k: real[k] for k in keys} == {k: planned[k] for k in keys}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_plan_mode_estimates_memory_and_time_for_every_family(compose, checkpoints, model_type):
    spec = validate(compose(["model=auto", f"model.path={checkpoints[model_type]}", "mode=plan", "quant=gptq",
                             "quant.group_size=32"]))  # fmt: skip
    est = plan.plan_estimate(spec, plan.plan_accounting(spec))
    assert "unavailable" not in est and est["peak_memory_bytes"] > 0 and est["s_per_step"] > 0
    assert est["calibration"]["peak_bytes"] > 0


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_run_trains_and_evaluates_each_family_from_its_checkpoint(qpeft_cli, checkpoints, model_type, tmp_path):
    code, out = qpeft_cli("model=auto", f"model.path={checkpoints[model_type]}", "quant=nf4", "peft=lora",
                          f"hydra.run.dir={tmp_path}", *FAST)  # fmt: skip
    assert code == 0, out[-3000:]
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["status"] == "completed" and record["eval"]["after"]
    # the record (and so the report) names the model and its family, not "auto"
    model = record["config"]["model"]
    assert (model["name"], model["family"]) == (f"tiny-{model_type}", model_type)
    assert model["linear_names"] == families.get(model_type).linear_names
    losses = record["train"]["losses"]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)


def _published_counts() -> list[dict]:
    import csv

    from conftest import ROOT

    with open(ROOT / "tests" / "reference" / "param_counts.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("row", _published_counts(), ids=lambda r: r["name"])
def test_plan_mode_counts_each_popular_checkpoint_as_published(compose, row):
    # tests/reference/param_counts.csv: the count as its model card or hub page prints it; ours must round to it
    spec = validate(compose(["mode=plan", f"model={row['name']}"]))
    assert spec.model.hub_id == row["hub_id"]
    total = plan.plan_accounting(spec)["total_params"]
    # within one unit of the last printed digit: cards round (Gemma's 9.2417 -> 9.24) or cut (Qwen's 7.6156 -> 7.61)
    unit = 10 ** -len(row["printed_as"].rstrip("B").split(".")[-1])
    assert abs(total / 1e9 - float(row["published_params"]) / 1e9) < unit, total


@pytest.mark.parametrize("card", ["llama3_2_1b", "gemma2_9b", "gemma3_1b"])
def test_tied_embeddings_are_counted_once(compose, card):
    spec = validate(compose(["mode=plan", f"model={card}"]))
    arch = spec.model.arch_dict()
    model = models.build_meta_model(arch, spec.model.dtype)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    once = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    assert plan.plan_accounting(spec)["total_params"] == once
    assert (
        once
        == sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
        - arch["vocab_size"] * arch["hidden_size"]
    )


def _support_matrix():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("support_matrix", ROOT / "scripts" / "support_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_family_matrix_is_current(compose):
    from conftest import ROOT

    sm = _support_matrix()
    readme = (ROOT / "README.md").read_text()
    table = sm.family_markdown(compose)
    assert sm.readme_with(table, readme, sm.FAMILY_START, sm.FAMILY_END) == readme, (
        "README.md's family matrix is stale: run python scripts/support_matrix.py --write"
    )
    assert "| `qeft` |" in table and "phi3" in table


def _one_step(spec, checkpoint) -> None:
    """Load, quantize, attach the method and take one forward and backward: a finite loss and a gradient on every
    trainable tensor."""
    model = models.load_model(str(checkpoint), "bfloat16", "cpu")
    targets = list(models.find_linears(model, spec.model.linear_names))
    windows = calibration.random_windows(model.config.vocab_size, 4, 32, 0)
    quant.quantize_model(spec.quant_name, model, targets, spec.quant, "bfloat16", "cpu", windows=windows)
    with models.seeded(0):
        model = adapters.get(spec.peft_method).attach(model, targets, spec.peft)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert trainable and torch.isfinite(loss)
    assert not [n for n, p in trainable if p.grad is None]


@pytest.mark.slow  # ~2 min on 2 cores (190 cells): make test-full; the fast suite runs each family end to end
def test_every_yes_cell_of_a_family_takes_a_training_step(compose, checkpoints, tmp_path, monkeypatch):
    """Per family: every quantizer the family matrix says yes to (with LoRA), and every method on its first
    quantizer of the method matrix that the family also takes."""
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))  # LoftQ's cache
    sm = _support_matrix()
    family_cells = sm.family_matrix(compose, {t: str(p) for t, p in checkpoints.items()})
    method_cells = sm.matrix(compose)
    methods = sorted({p for p, _ in method_cells})
    done = []
    for model_type, checkpoint in checkpoints.items():
        model = ["model=auto", f"model.path={checkpoint}"]
        for q in sorted({q for q, _ in family_cells}):
            if family_cells[q, model_type] is None:
                _one_step(validate(compose([f"quant={q}", "peft=lora", *model])), checkpoint)
                done.append((model_type, q, "lora"))
        for p in methods:
            q = next(q for (pp, q), why in sorted(method_cells.items()) if pp == p and why is None
                     and family_cells[q, model_type] is None)  # fmt: skip
            _one_step(validate(compose([*sm.cell_overrides(p, q, compose), *model])), checkpoint)
            done.append((model_type, q, p))
    assert len({m for m, _, _ in done}) == len(FAMILIES) and len({p for _, _, p in done}) == len(methods)


def test_a_config_json_transformers_rejects_is_one_line_naming_the_field(compose, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "wide"}))
    with pytest.raises(
        ConfigError, match=r"transformers rejects this llama architecture: .*'hidden_size' expected int"
    ):
        validate(compose(["model=auto", f"model.path={tmp_path}"]))


def test_a_checkpoint_without_tokenizer_files_is_one_line_before_any_model_loads(
    qpeft_cli, checkpoints, tmp_path, monkeypatch
):
    bare = tmp_path / "bare"
    shutil.copytree(checkpoints["qwen2"], bare)
    for name in TOKENIZER:
        (bare / name).unlink()
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code, out = qpeft_cli("model=auto", f"model.path={bare}", f"hydra.run.dir={tmp_path / 'run'}", *FAST)
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert code == 1 and len(errors) == 1 and "Traceback" not in out, out
    assert f"no tokenizer could be loaded from {bare}" in errors[0] and "tokenizer.json" in errors[0]


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_smoothquant_smoothing_preserves_the_function_of_the_llama_like_families(checkpoints, model_type):
    """SmoothQuant's fold uses LLaMA's norm -> readers wiring on these: it must leave the function as it was (the
    norms and readers of this test's model really change)."""
    from qpeft_bench.quant import smoothquant as sq

    model = models.load_model(str(checkpoints[model_type]), "float32", "cpu").eval()
    with torch.no_grad():  # norms of ones would hide a wrong fold
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    targets = list(models.find_linears(model, families.get(model_type).linear_names))
    ids = calibration.random_windows(model.config.vocab_size, 2, 24, 5)
    windows = calibration.random_windows(model.config.vocab_size, 4, 32, 0)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    norm = model.model.layers[0].input_layernorm.weight.clone()
    sq.prepare(
        model, targets, sq.Config(), lambda ts, r: calibration.capture_inputs(model, ts, windows, r, "cpu"), "cpu"
    )
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert not torch.allclose(norm, model.model.layers[0].input_layernorm.weight)  # really smoothed
    assert float((after - before).norm() / before.norm()) < 1e-5


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_qeft_channel_reordering_preserves_the_function_of_the_llama_like_families(checkpoints, model_type):
    from qpeft_bench.quant import qeft

    model = models.load_model(str(checkpoints[model_type]), "float32", "cpu").eval()
    ids = calibration.random_windows(model.config.vocab_size, 2, 24, 5)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    hidden = model.config.hidden_size
    perm = torch.randperm(hidden, generator=torch.Generator().manual_seed(0))
    q = model.model.layers[0].self_attn.q_proj.weight.clone()
    qeft.reorder_hidden(model, perm)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q[:, perm])  # really reordered
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert float((after - before).norm() / before.norm()) < 1e-5


@pytest.mark.parametrize("layers", [3, 1])
def test_a_config_json_whose_block_count_is_not_the_weights_is_refused_before_loading(
    qpeft_cli, checkpoints, tmp_path, monkeypatch, layers
):
    """transformers fills missing blocks with random weights (or drops extra ones) with a log line only: the run
    would complete on a model that is not the checkpoint (found by a hostile trial)."""
    wrong = tmp_path / "wrong"
    shutil.copytree(checkpoints["qwen2"], wrong)
    config = json.loads((wrong / "config.json").read_text())
    config.pop("layer_types", None)  # transformers would refuse its length first
    (wrong / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code, out = qpeft_cli("model=auto", f"model.path={wrong}", f"hydra.run.dir={tmp_path / 'run'}", *FAST)
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert code == 1 and len(errors) == 1, out
    assert f"the weights hold 2 decoder blocks but the architecture says num_hidden_layers={layers}" in errors[0]
