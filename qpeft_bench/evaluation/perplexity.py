"""Perplexity under two protocols, labelled apart in records because their numbers are not comparable:

- held-out perplexity: exp(mean NLL) over the labelled tokens of the fine-tuning data's validation split;
- windowed token perplexity (the SmoothQuant / QEFT / GPTQ protocol on WikiText-2): the test split's rows
  joined with blank lines, tokenised once, cut into non-overlapping windows, NLL averaged over every
  predicted token. lm-eval's `wikitext` task (document-level rolling *word* perplexity) is a third protocol.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qpeft_bench.data import _read_rows  # the fine-tuning data's file reader: same formats, same errors
from qpeft_bench.data_files import SUFFIXES as DATA_SUFFIXES
from qpeft_bench.train import autocast, to_device

WINDOWED_PROTOCOL = "windowed token perplexity, non-overlapping windows, joined with blank lines"
# What GPTQ's datautils joins the rows of wikitext's test split with (each row is one line of the raw file).
WIKITEXT_JOIN = "\n\n"


@torch.no_grad()
def heldout_perplexity(
    model,
    batches: Iterable[dict],
    device: str,
    compute_dtype: torch.dtype = torch.float32,
    progress: bool = True,
    desc: str = "eval",
    total: int | None = None,
) -> dict:
    """Token-level NLL summed over every labelled (non -100) position, then averaged: batches of different
    lengths weigh by their tokens, not by their count. `total`: the number of batches, for the progress bar
    (None: len(batches) where it has one).

    Also returns "units": the NLL sum (nats) and the labelled tokens of each row with any ({"ids", "nll",
    "tokens"}: what a bootstrap resamples, evaluation/items.py). A batch's "index" (a tensor of row ids, e.g. the
    examples' indices in their split) names its rows; without one, rows are numbered in the order they come. The
    total is the exact sum of the rows' (math.fsum of float64 sums), so the items give the headline to rounding."""
    was_training = model.training
    model.eval()
    ids, sums, counts = [], [], []
    try:
        bar = tqdm(batches, desc=desc, unit="batch", total=total, disable=not progress, dynamic_ncols=True)
        for batch in bar:
            index = batch.get("index")
            batch = to_device({k: v for k, v in batch.items() if k != "index"}, device)
            with autocast(device, compute_dtype):
                # use_cache=False: a KV cache of every window would only cost memory (gigabytes at 2048 x 7B)
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                ).logits
            labels = batch["labels"][:, 1:]
            logits = logits[:, :-1].float()
            token_nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
            ).view(labels.shape)  # 0 where ignored
            rows = index.tolist() if index is not None else range(len(ids), len(ids) + labels.shape[0])
            for row, nll, count in zip(
                rows, token_nll.double().sum(dim=1).tolist(), (labels != -100).sum(dim=1).tolist(), strict=True
            ):
                if count:  # a row with no labelled token weighs nothing
                    ids.append(int(row))
                    sums.append(nll)
                    counts.append(int(count))
    finally:
        model.train(was_training)
    count = sum(counts)
    mean = math.fsum(sums) / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "units": {"ids": ids, "nll": sums, "tokens": counts}}


def context_length(model) -> int | None:
    """The model's maximum number of positions, or None when its config does not say (peft wrappers
    forward `config` to the base model)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _window_batches(windows: torch.Tensor, batch_size: int) -> Iterator[dict]:
    # Every window is full length: no padding, every position attends and is a label.
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def windowed_perplexity(
    model,
    tokenizer,
    text: str,
    *,
    seq_len: int,
    batch_size: int,
    device: str,
    compute_dtype: torch.dtype,
    progress: bool = True,
    max_windows: int | None = None,
) -> dict:
    """Windowed token perplexity of `text` (for WikiText-2: `wikitext_text()`), as GPTQ's llama.py/opt.py eval:

    - `text` is tokenised ONCE with the tokenizer's defaults, so a LLaMA tokenizer puts one BOS at the very
      start and none at later windows (GPTQ: `tokenizer("\\n\\n".join(test["text"]))`);
    - the ids are cut into floor(len / seq_len) non-overlapping windows of seq_len tokens; the last partial
      window is DROPPED (GPTQ: `nsamples = numel // seqlen`); nothing is prepended to a window;
    - each window predicts its own shifted labels, i.e. seq_len - 1 tokens (the first token of a window is
      context only); the NLL is averaged over all windows * (seq_len - 1) predicted tokens. GPTQ averages per
      window and then over windows, which is the same number since every window predicts as many tokens.

    `max_windows` evaluates only the first windows (quick runs; the record says how many of how many).
    The result's "units" hold each window's NLL sum and tokens (heldout_perplexity; not for the record).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: a window needs at least 2 tokens to predict one")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    context = context_length(model)
    if context is not None and seq_len > context:
        raise ValueError(
            f"seq_len={seq_len} exceeds the model's context length {context} "
            "(max_position_embeddings); use a window of at most that many tokens"
        )
    # verbose=False: the whole split is far longer than model_max_length by design; we cut it ourselves.
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    total = ids.numel() // seq_len
    if total == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    n = total if max_windows is None else min(total, max_windows)
    if n < 1:
        raise ValueError(f"max_windows={max_windows} must be at least 1")
    windows = ids[: n * seq_len].view(n, seq_len)
    out = heldout_perplexity(
        model,
        _window_batches(windows, batch_size),
        device,
        compute_dtype,
        progress,
        desc="ppl windows",
        total=math.ceil(n / batch_size),
    )
    assert out["tokens"] == n * (seq_len - 1)  # every label is a real token: no padding, no -100
    return {
        **out,
        "windows": n,
        "windows_total": total,
        "seq_len": seq_len,
        "text_tokens": ids.numel(),
        "protocol": WINDOWED_PROTOCOL,
    }


def _raw_rows(file: Path) -> list[str]:
    # The hub's wikitext rows are the raw file's lines with their newline kept and blank lines as "" (its
    # builder reads the file line by line), so a .raw/.txt copy joins to exactly the same text.
    with open(file, encoding="utf-8") as handle:
        return [line if line.strip() else "" for line in handle]


def wikitext_text(
    path: str | None = None, hub_id: str = "wikitext", variant: str | None = "wikitext-2-raw-v1", split: str = "test"
) -> str:
    """The rows of a wikitext split joined with blank lines, the text `windowed_perplexity` evaluates.

    `path`: a local copy, either in the hub's schema (.parquet, .json, .jsonl, optionally .gz, a "text"
    column: one row per line of the raw file) or the raw file itself (.raw, .txt: wiki.test.raw).
    `path=None` reads `hub_id` / `variant` / `split` through `datasets` (`variant=None` for a repository or
    local folder without named configs).
    """
    if path is None:
        import datasets  # lazy: ~1 s to import and never needed for local files

        try:
            rows = datasets.load_dataset(hub_id, variant, split=split)["text"]
        except ConnectionError as err:  # what an offline machine gets
            raise ConnectionError(
                f"{err}; offline, pass the path of a local copy of {hub_id!r} ({variant}, {split}) instead"
            ) from err
        return WIKITEXT_JOIN.join(rows)
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"wikitext file not found: {path} (give a local copy of the {split} split "
            "in the hub's schema or the raw .raw/.txt file, or path=None to read the hub)"
        )
    if file.suffix in (".raw", ".txt"):
        return WIKITEXT_JOIN.join(_raw_rows(file))
    if not file.name.removesuffix(".gz").endswith(DATA_SUFFIXES):
        raise ValueError(
            f"eval.wikitext.path {path}: a WikiText copy is the raw file (.raw, .txt: wiki.test.raw) or the hub's "
            "rows in .parquet, .json or .jsonl (optionally .gz), a 'text' column; rename or convert it"
        )
    return WIKITEXT_JOIN.join(row["text"] for row in _read_rows(str(file), ("text",)))
