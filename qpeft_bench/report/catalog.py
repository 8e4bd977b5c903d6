"""Every table the report can build, as data: the per-run TABLES and the AGGREGATES (thesis layout). Adding a table
means adding a spec here (and, if it needs a value not yet pulled out of the record, one entry in
rows.RECORD_FIELDS)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qpeft_bench.report.aggregate import AggSpec
from qpeft_bench.report.formatting import GIB, MIB, Formatter, fmt_count, fmt_fixed, fmt_plain, fmt_scaled
from qpeft_bench.report.rows import COMMONSENSE_TASKS, LEADERBOARD_TASKS
from qpeft_bench.report.tables import Column, TableSpec, fmt_agg


def _num(key: str, header: str, fmt: Formatter) -> Column:
    return Column(key, header, fmt, align="right")


OVERVIEW = TableSpec(
    name="overview",
    title="Run overview",
    columns=(
        Column("run_id", "run_id"),
        Column("status", "status"),
        Column("model", "model"),
        Column("quant", "quant"),
        Column("method", "method"),
        _num("r", "r", fmt_count),
        _num("alpha", "alpha", fmt_count),
        _num("trainable_params", "trainable params", fmt_count),
        _num("trainable_pct", "trainable %", fmt_fixed(4)),
        _num("quantized_model_bytes", "quantized size (GiB)", fmt_scaled(GIB, 3)),
        _num("param_buffer_bytes", "param+buffer size (GiB)", fmt_scaled(GIB, 3)),
        _num("peft_overhead_bytes", "PEFT overhead (MiB)", fmt_scaled(MIB, 2)),
        _num("peak_memory_bytes", "peak memory (GiB)", fmt_scaled(GIB, 3)),
        _num("s_per_step", "s/step", fmt_fixed(3)),
        _num("ppl_before", "ppl before", fmt_fixed(3)),
        _num("ppl_after", "ppl after", fmt_fixed(3)),
    ),
    sort_by=("model", "quant", "method", "r", "alpha", "run_id"),
    notes=(
        "Units: GiB = 2^30 bytes, MiB = 2^20 bytes. ppl = held-out perplexity before/after training. "
        "Empty cells: value not recorded (e.g. planned or failed runs).",
    ),
)

EVALUATION = TableSpec(
    name="evaluation",
    title="Evaluation before and after fine-tuning",
    columns=(
        Column("run_id", "run_id"),
        Column("status", "status"),
        Column("model", "model"),
        Column("quant", "quant"),
        Column("peft_name", "method"),
        _num("r", "r", fmt_count),
        _num("ppl_before", "held-out ppl before", fmt_fixed(3)),
        _num("ppl_after", "held-out ppl after", fmt_fixed(3)),
        _num("wikitext_ppl_before", "WikiText ppl before", fmt_fixed(3)),
        _num("wikitext_ppl_after", "WikiText ppl after", fmt_fixed(3)),
        _num("mmlu_before", "MMLU before", fmt_fixed(4)),
        _num("mmlu_after", "MMLU after", fmt_fixed(4)),
        _num("commonsense_before", "commonsense before", fmt_fixed(4)),
        _num("commonsense_after", "commonsense after", fmt_fixed(4)),
        _num("leaderboard_avg6_after", "leaderboard 6-task", fmt_fixed(4)),
        _num("leaderboard_avg4_after", "leaderboard 4-task", fmt_fixed(4)),
        _num("gen_tokens_per_s", "gen tokens/s", fmt_fixed(1)),
        _num("forward_ms", "fwd ms", fmt_fixed(1)),
        _num("backward_ms", "bwd ms", fmt_fixed(1)),
    ),
    sort_by=("model", "quant", "peft_name", "r", "run_id"),
    notes=(
        "held-out ppl: exp(mean token NLL) over the validation split of the fine-tuning data. WikiText ppl: windowed "
        "token perplexity (non-overlapping windows of the joined test split), not lm-eval's word perplexity. MMLU: "
        "lm-eval 5-shot, unweighted mean of the 57 subjects. commonsense: lm-eval 0-shot average of 7 tasks. "
        "leaderboard: Open LLM Leaderboard v1 shots, 6-task and 4-task averages. Speed (after): greedy tokens/s at "
        "batch 1, forward/backward ms of one training step. Each record's eval.protocols names its protocols.",
    ),
)

TABLES: dict[str, TableSpec] = {spec.name: spec for spec in (OVERVIEW, EVALUATION)}


def _key_col(key: str, header: str) -> Column:
    return Column(key, header)


def _agg_col(key: str, header: str, fmt: Formatter, rule: str) -> Column:
    return Column(key, header, fmt_agg(fmt, show_n=rule != "value"), align="right", agg=True)


MODEL = _key_col("model", "model")
LAYERS = _key_col("layer_group", "layer groups")
DATA = _key_col("dataset", "data")
QUANT = _key_col("quant_setting", "quantizer")
METHOD = _key_col("method_name", "method")
R = _num("r", "r", fmt_count)
ALPHA = _num("alpha", "alpha", fmt_count)
UNITS = "Units: GiB = 2^30 bytes, MiB = 2^20 bytes."


def _agg_table(
    name: str,
    title: str,
    keys: tuple[Column, ...],
    metrics: Sequence[tuple],
    rule: str,
    runs: str,
    across: str | None = None,
    notes: tuple[str, ...] = (),
    **kw: Any,
) -> AggSpec:
    """metrics: (key, header, formatter[, rule]); a metric's own rule 'value' prints a value that the configuration
    fixes (size, parameter count) once instead of as mean ± 0 (n) in a table that averages others over seeds."""
    cols = tuple(_agg_col(m[0], m[1], m[2], m[3] if len(m) > 3 else rule) for m in metrics)
    return AggSpec(
        name=name, title=title, keys=keys, metrics=cols, rule=rule, runs=runs, across=across, notes=notes, **kw
    )


PER_DATASET = "Rows: method; columns: fine-tuning data set."
AGGREGATES: dict[str, AggSpec] = {
    spec.name: spec
    for spec in (
        _agg_table(
            "model_size",
            "Model size before and after quantization (thesis 4.1)",
            (MODEL, QUANT),
            [
                ("base_model_bytes", "unquantized (GiB)", fmt_scaled(GIB, 3)),
                ("quantized_model_bytes", "stored (GiB)", fmt_scaled(GIB, 3)),
                ("param_buffer_bytes", "param+buffer (GiB)", fmt_scaled(GIB, 3)),
                ("bits_per_weight", "bits/weight", fmt_fixed(3)),
            ],
            "value",
            "any",
            notes=(
                f"{UNITS} stored: every tensor of the quantized model including quantization state kept "
                "outside parameters (absmax, double-quant state, scales/zeros); param+buffer: parameters and "
                "buffers only, what transformers' get_memory_footprint() and the published tables print. "
                "bits/weight: stored bytes of the quantized linears x 8 / their elements.",
            ),
        ),
        _agg_table(
            "trainable_params",
            "Trainable parameters (thesis 4.3)",
            (MODEL, METHOD, R, ALPHA, LAYERS),
            [("trainable_params", "trainable params", fmt_count), ("trainable_pct", "trainable %", fmt_fixed(4))],
            "value",
            "any",
            notes=("trainable % = 100 x trainable / total parameters of the base model.",),
        ),
        _agg_table(
            "peft_overhead",
            "PEFT memory overhead (thesis 4.4)",
            (MODEL, QUANT, METHOD, R, ALPHA, LAYERS),
            [
                ("adapter_bytes", "adapters (MiB)", fmt_scaled(MIB, 3)),
                ("peft_overhead_bytes", "overhead (MiB)", fmt_scaled(MIB, 3)),
                ("qlora_recipe_overhead_bytes", "QLoRA-recipe overhead (MiB)", fmt_scaled(MIB, 3)),
            ],
            "value",
            "any",
            notes=(
                f"{UNITS} overhead: footprint with adapters minus without, same stage. QLoRA-recipe overhead: "
                "as qlora.py's set-up shows it (norms upcast to fp32, one pad-token row added), which is what "
                "the thesis' table measured.",
            ),
        ),
        _agg_table(
            "perplexity",
            "Mean evaluation perplexity per method and data set (thesis 4.5)",
            (MODEL, QUANT, METHOD),
            [("ppl_after", "held-out ppl after", fmt_fixed(3))],
            "mean_configs",
            "quality",
            across="dataset",
            notes=(
                f"{PER_DATASET} held-out perplexity after fine-tuning (lower is better), averaged over the "
                "(r, alpha) configurations and seeds of each method.",
            ),
        ),
        _agg_table(
            "mmlu",
            "Mean MMLU accuracy per method and data set (thesis 4.8)",
            (MODEL, QUANT, METHOD),
            [("mmlu_after", "MMLU after", fmt_fixed(4))],
            "mean_configs",
            "quality",
            across="dataset",
            notes=(
                f"{PER_DATASET} MMLU 5-shot after fine-tuning (unweighted mean of the 57 subjects), averaged "
                "over the (r, alpha) configurations and seeds of each method.",
            ),
        ),
        _agg_table(
            "gpu_memory",
            "Average GPU memory over the measured steps (thesis 4.10)",
            (MODEL, QUANT, METHOD),
            [("mean_memory_bytes", "mean memory (GiB)", fmt_scaled(GIB, 3))],
            "mean_configs",
            "trained",
            across="dataset",
            notes=(
                f"{PER_DATASET} {UNITS} per run: the mean over the measured steps (after warm-up) of the "
                "allocated memory (CUDA) or peak RSS (CPU), see each record's train.memory_kind; then the "
                "mean over configurations and seeds.",
            ),
        ),
        _agg_table(
            "runtime",
            "Runtime per 500 steps (thesis 4.11)",
            (MODEL, QUANT, METHOD),
            [("time_500_steps_s", "s / 500 steps", fmt_fixed(1))],
            "mean_configs",
            "trained",
            across="dataset",
            notes=(
                f"{PER_DATASET} seconds for 500 training steps, extrapolated from the measured steps after "
                "warm-up (train.time_500_steps_s); then the mean over configurations and seeds.",
            ),
        ),
        _agg_table(
            "qeft_comparison",
            "Comparison in the QEFT study's layout",
            (MODEL, DATA, QUANT, METHOD, R, ALPHA, LAYERS),
            [
                ("bits_per_weight", "bits", fmt_fixed(2), "value"),
                ("quantized_model_bytes", "base (GiB)", fmt_scaled(GIB, 2), "value"),
                ("trainable_params", "tunable params", fmt_count, "value"),
                ("time_500_steps_s", "tuning s/500 steps", fmt_fixed(1)),
                ("gen_tokens_per_s", "gen tokens/s", fmt_fixed(1)),
                *((f"lb_{task}_after", task, fmt_fixed(4)) for task in LEADERBOARD_TASKS),
                ("leaderboard_avg6_after", "avg 6", fmt_fixed(4)),
                ("leaderboard_avg4_after", "avg 4", fmt_fixed(4)),
            ],
            "mean_seeds",
            "quality",
            notes=(
                f"{UNITS} bits: stored bits per weight of the quantized linears; base: the stored quantized "
                "model; gen tokens/s: greedy generation at batch 1 after fine-tuning. Scores: Open LLM "
                "Leaderboard v1 tasks and shots after fine-tuning; avg 6 over all six, avg 4 over ARC-c, "
                "HellaSwag, MMLU and TruthfulQA.",
            ),
        ),
        _agg_table(
            "commonsense",
            "0-shot commonsense accuracy (the key-variable study's tables)",
            (MODEL, QUANT, METHOD, R, LAYERS),
            [
                *((f"cs_{task}_after", task, fmt_fixed(4)) for task in COMMONSENSE_TASKS),
                ("commonsense_after", "avg", fmt_fixed(4)),
            ],
            "mean_seeds",
            "quality",
            notes=(
                "lm-eval 0-shot after fine-tuning: hellaswag and arc_challenge acc_norm, the others acc; avg: "
                "their unweighted mean; each cell the mean ± std over seeds.",
            ),
        ),
        _agg_table(
            "per_configuration",
            "Results per (r, alpha) configuration (thesis B.2-B.7)",
            (QUANT, METHOD, R, ALPHA, LAYERS),
            [
                ("trainable_params", "trainable params", fmt_count, "value"),
                ("ppl_after", "held-out ppl after", fmt_fixed(3)),
                ("mmlu_after", "MMLU after", fmt_fixed(4)),
                ("mean_memory_bytes", "mean memory (GiB)", fmt_scaled(GIB, 3)),
                ("time_500_steps_s", "s / 500 steps", fmt_fixed(1)),
            ],
            "mean_seeds",
            "quality",
            split=("model", "dataset"),
            notes=(
                f"{UNITS} One table per model and fine-tuning data set; one row per quantizer, method and "
                "(r, alpha) configuration (and layer-group setting). held-out ppl and MMLU 5-shot after "
                "fine-tuning; mean memory and time as in the gpu_memory and runtime tables.",
            ),
        ),
        _agg_table(
            "by_layer_group",
            "ppl_after by layer group",
            (MODEL, DATA, QUANT, METHOD, R),
            [("ppl_after", "ppl_after", fmt_plain(3))],
            "mean_seeds",
            "quality",
            across="layer_group",
            across_first=("uniform",),
            notes=(
                "ppl_after: held-out perplexity after fine-tuning (lower is better). Columns: the layer-group "
                "setting (peft.variant edits and peft.by_layer values; 'uniform' = the same knobs on every "
                "module).",
            ),
        ),
    )
}
