"""The short summary a run logs at its end: one greppable line, and a table of what the record holds. A value that
is not the full benchmark (a limited evaluation or the shipped fixtures, evaluation/coverage.py) carries a `*`, and
one field or row says why."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from qpeft_bench import evaluation
from qpeft_bench.evaluation import coverage

GIB, MIB = 2**30, 2**20
MARK = "*"  # ASCII: log files and terminals of every kind show it


def _evaluated(record: dict, task: str) -> tuple[tuple, tuple, list[str]]:
    """(before, after headline values), their marks ("" or MARK), and the reasons of the marked ones: one per
    distinct reason, prefixed with the stage when the two stages differ."""
    ev = record.get("eval", {})
    values = tuple(evaluation.headline(ev.get(stage, {}).get(task), task) for stage in ("before", "after"))
    whys = tuple(
        None if value is None else coverage.not_full(coverage.of(record, stage, task))
        for stage, value in zip(("before", "after"), values, strict=True)
    )
    marks = tuple("" if why is None else MARK for why in whys)
    shown = [w for w in whys if w is not None]
    if len(set(shown)) == 1:
        reasons = [f"{task}: {shown[0]}"]
    else:
        reasons = [f"{task} {stage}: {w}" for stage, w in zip(("before", "after"), whys, strict=True) if w]
    return values, marks, reasons


def _not_full(reasons: list[str]) -> str:
    return f"{MARK} not the full benchmark: " + "; ".join(reasons)


def summary_line(record: dict, path: Path) -> str:
    """'<status> <run id> in 1m23s | loss 2.31 -> 1.87 | ppl_heldout 12.3 -> 9.81 | 0.123 s/step | peak 1.20 GiB
    | <record>': the run's outcome on one line (fields a run does not have are left out)."""
    meta, tr = record.get("meta", {}), record.get("train", {})
    parts = [f"{record['status']} {record['run_id']}"]
    try:
        seconds = (
            datetime.fromisoformat(meta["end_time"]) - datetime.fromisoformat(meta["start_time"])
        ).total_seconds()
        parts[0] += f" in {int(seconds) // 60}m{int(seconds) % 60:02d}s"
    except (KeyError, TypeError, ValueError):
        pass
    if tr.get("losses"):
        parts.append(f"loss {tr['losses'][0]:.4g} -> {tr['final_loss']:.4g}")
    reasons = []
    for task, _, _ in evaluation.SUMMARIES:
        (before, after), (mark_b, mark_a), why = _evaluated(record, task)
        if after is not None:
            # one mark per field, at its end (the reasons say which stage when they differ)
            parts.append(f"{task} {'-' if before is None else format(before, '.4g')} -> {after:.4g}{mark_b or mark_a}")
            reasons += why
    if tr.get("s_per_step") is not None:
        parts.append(f"{tr['s_per_step']:.3g} s/step")
    if tr.get("peak_memory_bytes") is not None:
        parts.append(f"peak {tr['peak_memory_bytes'] / GIB:.2f} GiB")
    if record.get("error"):
        error = record["error"]
        first = (str(error.get("message") or "").splitlines() or [""])[0][:120]  # `raise RuntimeError()` has none
        parts.append(f"{error.get('type', 'error')}: {first}" if first else str(error.get("type", "error")))
    if record["status"] == "diverged" and "diverged_at_step" in tr:
        parts.append(f"diverged at step {tr['diverged_at_step']}")
    if reasons:
        parts.append(_not_full(reasons))
    parts.append(str(path))
    return " | ".join(parts)


def summary_table(record: dict, path: Path) -> str:
    cfg, acc, tr, ev = record["config"], record.get("accounting", {}), record.get("train", {}), record.get("eval", {})
    reasons, truncated = [], []
    q = record.get("quant", {})
    peft = cfg.get("peft", {})

    def fmt(value, spec: str, scale: int = 1) -> str:
        return "-" if value is None else format(value / scale if scale != 1 else value, spec)

    rows = [
        ("run", f"{record['run_id']}  status: {record['status']}"),
        (
            "model / quant / method",
            f"{cfg['model']['name']} / {cfg['quant']['name']} / {peft.get('name', peft.get('method'))}"
            + (f" r={peft['r']} alpha={peft['alpha']}" if "r" in peft else ""),
        ),
        ("trainable params", f"{fmt(acc.get('trainable_params'), ',')} ({fmt(acc.get('trainable_pct'), '.4f')} %)"),
        (
            "quantized size (GiB)",
            f"{fmt(acc.get('quantized_model_bytes'), '.4f', GIB)} stored, "
            f"{fmt(acc.get('param_buffer_bytes'), '.4f', GIB)} params+buffers",
        ),
        (
            "PEFT overhead (MiB)",
            f"{fmt(acc.get('peft_overhead_bytes'), '.3f', MIB)} adapters, "
            f"{fmt(acc.get('qlora_recipe_overhead_bytes'), '.3f', MIB)} as qlora.py's set-up",
        ),
        ("bits per weight", fmt(acc.get("bits_per_weight"), ".3f")),
    ]
    if record.get("peft_layers"):  # per-layer-group knobs: how many modules got which values
        combos: dict[str, int] = {}
        for knobs in record["peft_layers"].values():
            key = " ".join(f"{k}={v}" for k, v in knobs.items())
            combos[key] = combos.get(key, 0) + 1
        rows.append(("per-layer knobs", "; ".join(f"{k}: {n} modules" for k, n in combos.items())))
    est = record.get("estimate", {})
    if est.get("peak_memory_bytes") is not None:
        per = f", per GPU of {est['gpus']} ({est['distributed']})" if est.get("gpus", 1) > 1 else ""
        rows.append(
            (
                "est. peak GPU memory (GiB)",
                f"{est['peak_memory_bytes'] / GIB:.2f} (train mode, batch "
                f"{cfg['train']['batch_size']} x {est['seq_len']} tokens{per})",
            )
        )
        rows.append(
            (
                "est. time on one H100",
                f"{est['s_per_step']:.3f} s/step, {est['run_seconds'] / 3600:.2f} h "
                f"for {cfg['train']['max_steps']} steps",
            )
        )
    if q:
        rows.append(
            (
                "quant error weight / output",
                f"{fmt(q.get('weight_rel_error'), '.4f')} / "
                f"{fmt(q.get('output_rel_error'), '.4f')} (relative, mean over "
                f"layers), {fmt(q.get('quantize_time_s'), '.2f')} s",
            )
        )
    if tr.get("s_per_step") is not None:
        rows += [
            ("s/step, tokens/s", f"{tr['s_per_step']:.3f}, {tr['tokens_per_s']:.0f}"),
            (f"peak memory (GiB, {tr.get('memory_kind')})", fmt(tr.get("peak_memory_bytes"), ".3f", GIB)),
            ("loss first -> last", f"{tr['losses'][0]:.4f} -> {tr['final_loss']:.4f}"),
        ]
    for task, label, spec_ in evaluation.SUMMARIES:
        (before, after), (mark_b, mark_a), why = _evaluated(record, task)
        if before is not None or after is not None:
            rows.append((f"{label} before -> after", f"{fmt(before, spec_)}{mark_b} -> {fmt(after, spec_)}{mark_a}"))
            reasons += why
        for stage in ("before", "after"):
            cut = (coverage.of(record, stage, task) or {}).get("truncated")
            if cut:
                truncated.append(f"{task} {stage} {cut:,}")
    if reasons:
        rows.append((f"{MARK} not the full benchmark", "; ".join(reasons)))
    if truncated:
        rows.append(("contexts truncated (items)", ", ".join(truncated) + " (cut from the left to the model's length)"))
    sp = ev.get("after", {}).get("speed")
    if sp:
        rows.append(
            (
                "generation tok/s, fwd / bwd ms",
                f"{sp['generation']['tokens_per_s']:.1f}, "
                f"{sp['step']['forward_ms']:.1f} / {sp['step']['backward_ms']:.1f}",
            )
        )
    if "error" in record:
        rows.append(("error", f"{record['error']['type']}: {record['error']['message']}"))
    rows.append(("record", str(path)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
