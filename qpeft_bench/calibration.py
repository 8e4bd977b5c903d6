"""Calibration data and activation statistics for the quantizers that need them (GPTQ, OWQ, QEFT, SmoothQuant)
and for the error probe every quantizer is measured with.

Calibration text comes from the fine-tuning data (its training split) or from a local text file; it is
tokenized once and cut into `samples` windows of `seq_len` tokens at seeded random offsets, as GPTQ does with
C4. Nothing here downloads anything.

`capture_inputs` runs the model over the windows with forward pre-hooks on the target linears and folds each
layer's input (tokens x in_features) into a running statistic: the Hessian proxy sum(x x^T), the per-channel
maximum |x|, or the inputs themselves. Layers fed the very same tensor (q, k, v; gate, up) share one statistic:
it is computed once, which on LLaMA-2-7B saves a quarter of the Hessian memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from qpeft_bench.data_files import decode_utf8


def example_texts(examples: list[dict]) -> list[str]:
    """The text of fine-tuning examples (prompt and response), as the model reads it."""
    return [ex["source"] + ex["target"] for ex in examples]


def read_text(path: str) -> list[str]:
    """The text of calib.path as one document. FileNotFoundError, or a one-line ValueError naming the file (and the
    line and byte offset of what is not UTF-8) for a file that is not UTF-8, a Git LFS pointer, or empty."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"calibration text file {path!r} does not exist")
    if not file.is_file():
        raise ValueError(f"calibration text file {path!r} is not a regular file (calib.path must name a text file)")
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise ValueError(f"calibration text file {path!r} cannot be read ({err.strerror or err})") from None
    text = decode_utf8(raw, f"calibration text file {path!r}")
    if not text.strip():
        raise ValueError(f"calibration text file {path!r} holds no text ({len(raw)} bytes of whitespace)")
    return [text]


def check_text(path: str) -> None:
    """Pre-flight of calib=text: read_text's errors before any model is loaded (no tokenizer needed)."""
    read_text(path)


def token_windows(tokenizer, texts: list[str], samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """(samples, seq_len) token ids: windows at seeded random offsets of the concatenated texts."""
    sep = tokenizer.eos_token or "\n\n"
    ids = tokenizer(sep.join(texts), add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    if ids.numel() < seq_len:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens, fewer than calib.seq_len={seq_len}; "
            "lower calib.seq_len or use a longer text"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def random_windows(vocab_size: int, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Random token ids: for size and speed measurements on random-weight models, where no text means anything."""
    return torch.randint(0, vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Statistics of layer inputs. A reducer maps (state or None, x of shape (tokens, in_features)) -> state and may
# update the state in place.
# ---------------------------------------------------------------------------------------------------------------


def hessian(state, x: torch.Tensor):
    """[sum over tokens of x x^T in fp32, token count]: the H of GPTQ/OWQ up to the factor 2/n."""
    x = x.float()
    if state is None:
        state = [torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device), 0]
    state[0].addmm_(x.T, x)
    state[1] += x.shape[0]
    return state


def absmax(state, x: torch.Tensor):
    """Per input channel max |x| (SmoothQuant's activation statistic)."""
    m = x.abs().amax(0).float()
    return m if state is None else torch.maximum(state, m, out=state)


def keep(state, x: torch.Tensor):
    """The inputs themselves (the error probe: a single small batch)."""
    return x.detach().clone() if state is None else torch.cat([state, x.detach()])


def square_sum(state, x: torch.Tensor):
    """[sum over tokens of x_j^2 per channel in fp32, token count]: H's diagonal up to 2/n, without the in x in
    matrix (QEFT's global vote, round-to-nearest weak columns)."""
    x = x.float()
    if state is None:
        state = [torch.zeros(x.shape[1], dtype=torch.float32, device=x.device), 0]
    state[0].add_(x.pow(2).sum(0))
    state[1] += x.shape[0]
    return state


@torch.no_grad()
def capture_inputs(
    model: nn.Module, targets: list[str], windows: torch.Tensor, reduce: Callable, device: str, batch_size: int = 1
) -> dict[str, object]:
    """Run `windows` through `model` and return {target: reduce(...) over all its inputs}."""

    def forward(batch):
        return lambda: model(input_ids=batch.to(device))

    was_training = model.training
    model.eval()
    try:
        steps = (forward(windows[i : i + batch_size]) for i in range(0, windows.shape[0], batch_size))
        return capture_with(model, targets, reduce, steps)
    finally:
        model.train(was_training)


@torch.no_grad()
def capture_with(model: nn.Module, targets: list[str], reduce: Callable, steps) -> dict[str, object]:
    """{target: reduce(...) over all its inputs} while the forwards `steps` (callables) run, one after another."""
    states: dict[str, object] = {}
    # id of an input tensor of this forward -> (first target that saw it, the tensor). Holding the tensor keeps
    # its id from being reused by a later, different input within the same forward.
    seen: dict[int, tuple[str, torch.Tensor]] = {}

    def hook(name):
        def fn(module, args):
            x = args[0]
            first, _ = seen.setdefault(id(x), (name, x))
            if first != name:  # the same tensor fed to another layer: share its statistic
                states[name] = states[first]
                return
            states[name] = reduce(states.get(name), x.reshape(-1, x.shape[-1]))

        return fn

    handles = [model.get_submodule(t).register_forward_pre_hook(hook(t)) for t in targets]
    try:
        for step in steps:
            seen.clear()
            step()
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    missing = [t for t in targets if t not in states]
    if missing:
        raise RuntimeError(f"calibration forward never reached {missing[:3]}")
    return states
