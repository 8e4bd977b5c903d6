"""Build the embedded default model and data of qpeft-bench from scratch, offline, on a CPU.

    python scripts/build_tiny_model.py --seed 0 --steps 2000

Generates the synthetic-world corpus (scripts/tiny_world.py), trains a byte-level BPE tokenizer on it,
pretrains a tiny LLaMA, and writes qpeft_bench/assets/tiny_llama/ (model, tokenizer, README.md model card)
plus qpeft_bench/assets/data/{tiny_alpaca.json,tiny_text.txt}. Deterministic for a given seed, thread count
and torch build.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# On a shared CPU, libgomp's default spin-waiting (300k spins) makes a 2-thread run ~15-30x slower as soon as
# another process holds a core. Measured per step, idle / with one busy core: default 0.34 s / 5.6 s,
# GOMP_SPINCOUNT=10000 0.37 s / ~1 s, OMP_WAIT_POLICY=PASSIVE 0.41-0.49 s / 0.61 s. Set before torch loads.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_world

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, LLaMA-like order (unk, bos, eos) + pad


def train_tokenizer(docs, vocab_size):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Digits split one by one (as in LLaMA) so numbers don't eat the small vocab and arithmetic stays regular.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    # LLaMA-like: tokenizer(text) prepends <s>; no </s> is appended.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def pack(docs, tok, seq_len):
    """Each document becomes <s> ... </s>; the stream is cut into non-overlapping windows of seq_len.
    The same packing is used for the held-out loss, so the two numbers are comparable."""
    stream = []
    for ids in tok(docs, add_special_tokens=False)["input_ids"]:
        stream += [tok.bos_token_id] + ids + [tok.eos_token_id]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len), len(stream)


@torch.no_grad()
def mean_nll(model, windows, bs=32):
    model.eval()
    tot, cnt = 0.0, 0
    for i in range(0, len(windows), bs):
        x = windows[i : i + bs]
        tot += model(input_ids=x, labels=x).loss.float().item() * x.numel()
        cnt += x.numel()
    return tot / cnt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=ROOT / "qpeft_bench/assets/tiny_llama")
    ap.add_argument("--data-out", type=Path, default=ROOT / "qpeft_bench/assets/data")
    ap.add_argument("--docs", type=int, default=60000, help="pretraining corpus size in documents")
    ap.add_argument("--heldout-kb", type=int, default=80)
    ap.add_argument("--alpaca", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--no-bf16-autocast",
        action="store_true",
        help="train in fp32 (autocast is ~2.5x faster on CPUs with AVX512-BF16/AMX, slower on others)",
    )
    args = ap.parse_args()
    t_start = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    # Data: the held-out text and the instruction set use seeds derived from --seed but disjoint from it.
    docs = tiny_world.corpus(args.seed, args.docs)
    train_set = set(docs)
    held, held_seed, size = [], args.seed + 1_000_003, 0
    for d in tiny_world.corpus(held_seed, 10 * args.heldout_kb):  # more than enough; stop at the size target
        if d not in train_set:  # never trained on, not even by accidental duplication
            held.append(d)
            size += len(d) + 2
            if size >= args.heldout_kb * 1000:
                break
    alpaca = tiny_world.alpaca(args.seed + 2_000_003, args.alpaca)
    print(f"corpus: {len(docs)} docs, {sum(map(len, docs)) / 1e6:.2f} MB; held-out {len(held)} docs", flush=True)

    tok = train_tokenizer(docs, vocab_size=2048)
    train_w, n_train_tok = pack(docs, tok, args.seq)
    held_w, n_held_tok = pack(held, tok, args.seq)
    print(
        f"tokenizer: vocab {len(tok)}; corpus {n_train_tok} tokens -> {len(train_w)} windows of {args.seq}; "
        f"held-out {n_held_tok} tokens",
        flush=True,
    )

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    # AdamW, no weight decay on norms (1-D); linear warm-up then cosine decay to 10% of the peak LR.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    gen = torch.Generator().manual_seed(args.seed)
    order, pos, losses = torch.randperm(len(train_w), generator=gen), 0, []
    use_amp = not args.no_bf16_autocast
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        if pos + args.batch > len(order):  # new epoch: reshuffle windows
            order, pos = torch.randperm(len(train_w), generator=gen), 0
        x = train_w[order[pos : pos + args.batch]]
        pos += args.batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_amp):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t0
            print(
                f"step {step:5d}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}  lr {lr_at(step):.2e}  "
                f"{el:6.0f}s  {(step + 1) * x.numel() / el:.0f} tok/s",
                flush=True,
            )
    train_time = time.time() - t0
    epochs = args.steps * args.batch / len(train_w)

    # Save in bf16, then measure everything on the model as reloaded from disk.
    args.out.mkdir(parents=True, exist_ok=True)
    args.data_out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    (args.data_out / "tiny_text.txt").write_text("\n\n".join(held) + "\n")
    (args.data_out / "tiny_alpaca.json").write_text(json.dumps(alpaca, indent=1, ensure_ascii=False) + "\n")

    # from_pretrained gives bf16 parameters by default here (config dtype); also measure with fp32 compute.
    m = AutoModelForCausalLM.from_pretrained(args.out)
    t2 = AutoTokenizer.from_pretrained(args.out)
    assert t2("Mira lives in Olden.")["input_ids"] == tok("Mira lives in Olden.")["input_ids"]
    sample = train_w[torch.randperm(len(train_w), generator=torch.Generator().manual_seed(1))[:128]]
    train_nll, held_nll = mean_nll(m, sample), mean_nll(m, held_w)
    held_nll_fp32 = mean_nll(AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32), held_w)
    size_mb = os.path.getsize(args.out / "model.safetensors") / 1e6
    print(
        f"reloaded ({next(m.parameters()).dtype}): train NLL {train_nll:.4f}, held-out NLL {held_nll:.4f} "
        f"(fp32 compute {held_nll_fp32:.4f}); model.safetensors {size_mb:.2f} MB; training {train_time:.0f}s",
        flush=True,
    )

    cmd = "python scripts/build_tiny_model.py " + " ".join(sys.argv[1:])
    (args.out / "README.md").write_text(
        CARD.format(
            cmd=cmd.strip(),
            seed=args.seed,
            held_seed=held_seed,
            alpaca_seed=args.seed + 2_000_003,
            docs=len(docs),
            mb=sum(map(len, docs)) / 1e6,
            ntok=n_train_tok,
            held_docs=len(held),
            held_kb=size / 1000,
            held_tok=n_held_tok,
            n_alpaca=len(alpaca),
            vocab=len(tok),
            n_params=n_params,
            steps=args.steps,
            batch=args.batch,
            seq=args.seq,
            lr=args.lr,
            warmup=args.warmup,
            epochs=epochs,
            amp="bf16 autocast (fp32 master weights)" if use_amp else "fp32",
            threads=args.threads,
            train_time=train_time,
            total_time=time.time() - t_start,
            last_loss=sum(losses[-50:]) / 50,
            train_nll=train_nll,
            held_nll=held_nll,
            held_ppl=math.exp(held_nll),
            held_nll_fp32=held_nll_fp32,
            ln_v=math.log(len(tok)),
            size_mb=size_mb,
            torch=torch.__version__,
            tf=__import__("transformers").__version__,
            n_people=len(tiny_world.NAMES),
            n_towns=len(tiny_world.TOWNS),
            n_rivers=len(tiny_world.RIVERS),
            n_animals=len(tiny_world.ANIMALS),
        )
    )
    print(f"done in {time.time() - t_start:.0f}s", flush=True)


CARD = """# tiny_llama — qpeft-bench's embedded default model

A {n_params:,}-parameter LLaMA pretrained from scratch on a synthetic world, so that the benchmark's
fine-tuning and quantization paths run offline in seconds and still show real effects. It knows nothing
outside its world; do not use it for anything but testing.

## How it was made
```
{cmd}
```
- Seed {seed} (`torch.manual_seed`, `torch.use_deterministic_algorithms(True)`, {threads} CPU threads);
  torch {torch}, transformers {tf}.
- **Data**: `scripts/tiny_world.py`, `corpus(seed={seed}, n_docs={docs})`: {docs} short documents,
  {mb:.2f} MB, {ntok:,} tokens (with one `<s>` and `</s>` per document): encyclopedic sentences about
  {n_people} made-up people, {n_towns} towns, {n_rivers} rivers and {n_animals} animals; short stories;
  arithmetic facts on numbers up to 99.
  The world's facts are fixed; the seed only chooses which sentences are sampled.
- **Tokenizer**: byte-level BPE (`tokenizers`), vocab {vocab} including `<unk>`=0, `<s>`=1, `</s>`=2,
  `<pad>`=3; digits are split one per token. `tokenizer(text)` prepends `<s>` (LLaMA-like) and adds
  no `</s>`; append `eos_token` yourself for fine-tuning targets.
- **Architecture**: `LlamaForCausalLM`, hidden 256, intermediate 768, 4 layers, 4 attention heads,
  2 key/value heads (grouped-query, so `k_proj`/`v_proj` are 256→128), max positions 512,
  untied embeddings, RMSNorm eps 1e-5, default RoPE. {n_params:,} parameters; stored in bf16
  (`model.safetensors`, {size_mb:.2f} MB).
- **Training**: AdamW (β = 0.9/0.95, weight decay 0.1 on matrices), peak LR {lr:g}, {warmup} linear
  warm-up steps then cosine decay to 10 % of the peak, gradient clipping 1.0; {steps} steps of
  {batch} × {seq} tokens (packed windows, ≈{epochs:.1f} epochs), {amp}.
  Training took {train_time:.0f} s of wall time ({total_time:.0f} s for the whole script) on a shared
  2-core AMD EPYC (AVX512-BF16) with `GOMP_SPINCOUNT=10000`.

## Results (the saved bf16 weights, reloaded from disk)
- Final training loss (mean of the last 50 steps): {last_loss:.4f}; NLL on 128 training windows: {train_nll:.4f}.
- Held-out NLL on `qpeft_bench/assets/data/tiny_text.txt`: **{held_nll:.4f}** (perplexity {held_ppl:.2f})
  as loaded by plain `from_pretrained` (bf16 parameters and compute); {held_nll_fp32:.4f} when loaded
  with `dtype=torch.float32`. An untrained model would score about ln(vocab) = {ln_v:.2f}.
  The held-out text ({held_docs} documents, {held_kb:.0f} KB, {held_tok:,} tokens) is `corpus(seed={held_seed})`
  minus any document that also occurs in the training corpus. It is new text about the *same* facts, so
  this loss measures how well the world was learned, not generalization to new facts. The number above
  packs each blank-line-separated document as `<s> doc </s>` into windows of {seq} tokens, as in training.

## Companion data
- `qpeft_bench/assets/data/tiny_alpaca.json`: {n_alpaca} instruction examples in Stanford Alpaca's schema
  (`instruction`, `input`, `output`), `tiny_world.alpaca(seed={alpaca_seed})`: arithmetic, word-list
  reversal and sorting, word counting, questions on the world's facts, classification, plural rewriting.
  The pretraining corpus never shows this Q&A format.
"""

if __name__ == "__main__":
    main()
