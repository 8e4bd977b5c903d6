"""Contexts that lm-eval cut to the model's length, counted per lm-eval task and said once per task.

lm-eval's HFLM truncates a context that does not fit the model from the left and logs one warning per request
("Combined length of context (...) exceeds model's maximum length (...). Truncating ... tokens from the left.";
for generation, "Left truncation applied ..." per batch): 338 of them in one MMLU run, none naming its task, and the
record kept no trace. `CountingHFLM` counts, per lm-eval task, the items (documents) with a truncated request, by
the same length tests HFLM applies; `collapsed_warnings` drops those warnings meanwhile, and `log_counts` says
one line per task instead. Counting changes nothing lm-eval computes. Imports lm-eval: load it only to evaluate.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict

from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import normalize_gen_kwargs

log = logging.getLogger("qpeft_bench")
# The starts of HFLM's two truncation warnings (lm_eval/models/huggingface.py, 0.4.13).
WARNINGS = ("Combined length of context", "Left truncation applied")


class CountingHFLM(HFLM):
    """HFLM that records, per lm-eval task, which documents had a request cut to `max_length` from the left."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.truncated: dict[str, set] = defaultdict(set)  # task -> doc ids
        self._owners: dict[tuple[str, str], list[tuple[str, int]]] = {}

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # _loglikelihood_tokens sees (context, continuation) pairs only, reordered: remember whose each pair is
        self._owners = {}
        for req in requests:
            self._owners.setdefault(tuple(req.args), []).append((req.task_name, req.doc_id))
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self.backend == "causal":  # HFLM's test: context + continuation longer than max_length + 1
            for pair, context_enc, continuation_enc in requests:
                if len(context_enc) + len(continuation_enc) > self.max_length + 1:
                    for task, doc in self._owners.get(tuple(pair) if pair else (), ()):
                        self.truncated[task].add(doc)
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def generate_until(self, requests, disable_tqdm: bool = False):
        if self.backend == "causal":  # HFLM keeps the last max_length - max_gen_toks tokens of the context
            for req in requests:
                context, gen_kwargs = req.args
                room = self.max_length - normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)["max_gen_toks"]
                if len(self.tok_encode(context)) > room:
                    self.truncated[req.task_name].add(req.doc_id)
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def counts(self) -> dict[str, int]:
        return {task: len(docs) for task, docs in self.truncated.items()}


class _DropTruncationWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(WARNINGS)


@contextlib.contextmanager
def collapsed_warnings():
    """Without HFLM's per-request truncation warnings meanwhile (log_counts says them once per task)."""
    logger, drop = logging.getLogger(HFLM.__module__), _DropTruncationWarnings()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def log_counts(counts: dict[str, tuple[int, int]], max_length: int) -> None:
    """One line per task with truncated contexts: {task: (truncated items, items)}."""
    for task, (cut, items) in counts.items():
        if cut:
            log.warning(
                "%s: %d of %d contexts truncated to the model's %d tokens (from the left)", task, cut, items, max_length
            )
