"""Data-parallel and fully sharded fine-tuning (issue 11): two processes under torchrun (gloo on the CPU) follow the
loss trajectory of one process with the same global batch; one record and one adapter per job; the layer-by-layer
load FSDP uses gives the model a plain load gives; clear errors for impossible launches; plan mode's per-GPU memory
for DDP and FSDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST

from qpeft_bench import distributed, models, plan, recipe
from qpeft_bench.config import ConfigError
from qpeft_bench.spec import validate

# fp32 adapters and no dropout: then the only difference between the two jobs is where the gradients are summed
EXACT = [*FAST, "train.batch_size=4", "train.device=cpu", "peft.adapter_dtype=float32", "peft.dropout=0"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the interpreter's own, wherever its scripts live
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in root.glob("*/result.json")]


def one_and_two(tmp_path: Path, overrides: list[str], kind: str) -> tuple[dict, dict]:
    """The records of one process with grad_accum 2 (in ./one) and of two `kind` processes with grad_accum 1 (./two):
    the same global batch. One record per job, not per process."""
    one = subprocess.run(
        [sys.executable, "-m", "qpeft_bench.cli", *overrides, "train.grad_accum=2", "output_root=one"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            *TORCHRUN,
            "--nproc-per-node",
            "2",
            "-m",
            "qpeft_bench.cli",
            *overrides,
            "train.grad_accum=1",
            f"train.distributed={kind}",
            "train.gpus=2",
            "output_root=two",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    (a,), (b,) = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert a["status"] == b["status"] == "completed"
    return a, b


def test_two_processes_follow_one_process_with_the_same_global_batch(tmp_path):
    a, b = one_and_two(tmp_path, EXACT, "ddp")
    assert b["train"]["distributed"] == {"kind": "ddp", "world_size": 2, "global_batch": 8}
    assert len(a["train"]["losses"]) == len(b["train"]["losses"]) == 4
    assert b["train"]["losses"] == pytest.approx(a["train"]["losses"], rel=1e-5)
    assert b["eval"]["after"]["ppl_heldout"] == pytest.approx(a["eval"]["after"]["ppl_heldout"], rel=1e-5)
    assert a["run_id"] != b["run_id"]  # train.gpus is part of the run's identity
    (adapter,) = (tmp_path / "two").glob("*/adapter")
    assert (adapter / "adapter_config.json").is_file()


def test_ddp_without_torchrun_is_a_clear_error_and_writes_nothing(compose, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = compose([*FAST, "train.distributed=ddp", "train.gpus=2", "train.device=cpu"])
    assert recipe.run(config, tmp_path, progress=False) == "failed"
    assert "launch with `torchrun --nproc-per-node N" in caplog.text
    assert not list(tmp_path.iterdir())


def test_a_process_count_other_than_train_gpus_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="train.gpus=4 but torchrun started 2 process"):
        distributed.setup("ddp", "cpu", gpus=4)


def test_fsdp_shards_and_follows_one_process_then_saves_and_evaluates_whole(tmp_path):
    """FSDP on an NF4 base: the same trajectory as one process with the same global batch (fp32 weights, so that
    the sharded gradient norm's other summation order stays below the tolerance: in bf16 it flips roundings), the
    adapters gathered to process 0 and evaluated there, and a re-evaluation from the saved adapter agrees."""
    exact = [*EXACT, "model.dtype=float32", "train.compute_dtype=float32", "train.max_grad_norm=0.3"]
    a, b = one_and_two(tmp_path, exact, "fsdp")
    assert b["train"]["distributed"] == {"kind": "fsdp", "world_size": 2, "global_batch": 8}
    assert b["quant"]["layerwise_load"] is True and a["quant"]["layerwise_load"] is False
    assert b["config"]["quant"]["quant_storage"] == "auto"  # made concrete (float32 here) without changing the id
    assert b["train"]["speed"]["fused_lora"] is False and b["train"]["speed"]["chunked_loss"] == 0
    assert b["train"]["losses"] == pytest.approx(a["train"]["losses"], rel=1e-5)
    assert b["eval"]["after"]["ppl_heldout"] == pytest.approx(a["eval"]["after"]["ppl_heldout"], rel=1e-5)
    assert b["quant"]["weight_rel_error"] == pytest.approx(a["quant"]["weight_rel_error"], rel=1e-6)
    (run,) = (tmp_path / "two").glob("*/adapter")
    again = subprocess.run(
        [sys.executable, "-m", "qpeft_bench.cli", "mode=eval", f"run_dir={run.parent}", "eval.max_batches=2"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    (c,) = _records(tmp_path / "two")
    assert c["eval"]["after"]["ppl_heldout"] == pytest.approx(b["eval"]["after"]["ppl_heldout"], rel=1e-5)
    assert len(c["eval"]["reevaluations"]) == 1


def test_fsdp_makes_a_unit_per_block_and_per_adapter_and_trains(compose, tmp_path):
    """The wrap itself, in one gloo process: a unit per decoder block, per adapter factor and per fp32 norm (one dtype
    and one requires_grad per unit), the 4-bit layers linked to their quantization state, and a step that trains."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    from qpeft_bench import accounting, adapters, quant
    from qpeft_bench.train import prepare_for_training

    spec = validate(compose(["train.distributed=fsdp", "train.device=cpu", "peft.dropout=0"]))
    model = models.load_model(spec.model.path, spec.model.dtype, "cpu")
    targets = list(models.find_linears(model, spec.model.linear_names))
    quant.quantize_model("nf4", model, targets, spec.quant, "bfloat16", "cpu")
    assert all(model.get_submodule(t).weight.dtype == torch.bfloat16 for t in targets)  # codes stored as bf16
    model = adapters.get("lora").attach(model, targets, spec.peft)
    prepare_for_training(model, upcast_norms_fp32=True, gradient_checkpointing=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = distributed.wrap(model, distributed.World(0, 1, 0), "cpu", "fsdp", torch.bfloat16)
        units = [m for m in wrapped.modules() if isinstance(m, FullyShardedDataParallel)]
        layers = model.config.num_hidden_layers
        norms = 2 * layers + 1  # fp32 after the upcast: units of their own
        assert len(units) == 1 + layers + 2 * len(targets) + norms  # root, blocks, lora_A and lora_B, norms
        flats = [u._flat_param for u in units if u._flat_param is not None]
        assert sum(f.requires_grad for f in flats) == 2 * len(targets)  # the adapters' units, and only they train
        assert {f.dtype for f in flats if not f.requires_grad} == {torch.bfloat16, torch.float32}  # codes; fp32 norms
        assert all(m.quant_state is not None for m in model.modules() if type(m).__name__ == "Linear4bit")
        ids = torch.randint(0, 100, (2, 16))
        optimizer = torch.optim.AdamW(accounting.trainable_parameters(wrapped), lr=1e-2)
        before = distributed.trainable_state(wrapped, distributed.World(0, 1, 0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        after = distributed.trainable_state(wrapped, distributed.World(0, 1, 0))
        assert set(before) == set(after) and len(after) == 2 * len(targets)
        assert all(name.startswith("base_model.model.") and "_fsdp" not in name for name in after)
        assert any(not torch.equal(before[n], after[n]) for n in after)  # the adapters trained
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_a_sweep_runs_under_one_torchrun_launch(tmp_path, kind):
    """Two grid points on one base under one torchrun (Hydra's -m runs them in-process): the process group lives as
    long as the processes (joining torchrun's rendezvous again after destroying it fails), and under FSDP process 0
    takes the second run's base from its cache while the others load theirs again."""
    run = subprocess.run(
        [
            *TORCHRUN,
            "--nproc-per-node",
            "2",
            "-m",
            "qpeft_bench.cli",
            "-m",
            *FAST,
            "train.device=cpu",
            "train.batch_size=4",
            f"train.distributed={kind}",
            "train.gpus=2",
            "seed=0,1",
            "hydra.sweep.dir=sweep",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    records = sorted(_records(tmp_path / "sweep"), key=lambda r: r["config"]["seed"])
    assert [r["status"] for r in records] == ["completed", "completed"]
    assert "reused" not in records[0]["quant"] and records[1]["quant"]["reused"]["from"] == "process cache"


def test_loftq_with_two_alternations_trains_sharded(tmp_path):
    """LoftQ's re-quantized layers keep FSDP's storage dtype (else the block would not flatten)."""
    run = subprocess.run(
        [
            *TORCHRUN,
            "--nproc-per-node",
            "2",
            "-m",
            "qpeft_bench.cli",
            *FAST,
            "train.device=cpu",
            "train.batch_size=4",
            "peft=loftq",
            "peft.loftq.iters=2",
            "train.distributed=fsdp",
            "train.gpus=2",
            "output_root=loftq",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (rec,) = _records(tmp_path / "loftq")
    assert rec["status"] == "completed" and rec["adapter_init"]["loftq"]


def test_the_layerwise_load_gives_the_model_a_plain_load_gives(compose):
    """empty_model + fill (FSDP's load: one layer in 16 bits at a time) equals from_pretrained, buffers included."""
    import torch

    spec = validate(compose(["mode=plan"]))
    path, dtype = spec.model.path, spec.model.dtype
    plain = models.load_model(path, dtype, "cpu")
    model = models.empty_model(spec.model.arch_dict(), dtype)
    targets = list(models.find_linears(model, spec.model.linear_names))
    assert all(model.get_submodule(t).weight.is_meta for t in targets)
    fill = models.layerwise(model, targets, models.TensorSource(path, dtype), "cpu")
    assert all(model.get_submodule(t).weight.is_meta for t in targets)  # the targets wait for the quantizer
    for target in targets:
        fill(target)
    got, want = model.state_dict(), plain.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert torch.equal(model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)
    tied = plain.config.tie_word_embeddings
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied


def test_a_layerwise_load_needs_safetensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        models.TensorSource(str(tmp_path), "bfloat16")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.gpus=2"], "train.gpus=2 needs train.distributed=ddp"),
        (["train.gpus=0", "train.distributed=ddp"], "train.gpus=0 must be > 0"),
        (["train.distributed=fsdp", "train.gpus=2", "quant=hqq"], "fsdp shards quant in"),
        (["train.distributed=fsdp", "train.gpus=2", "model=opt_1_3b"], "fsdp shards model families"),
        (["train.distributed=fsdp", "train.gpus=2", "peft=qbara"], "trains peft methods"),
        (
            ["train.distributed=fsdp", "train.gpus=2", "train.checkpoint_every=5"],
            "checkpoint_every > 0 is not supported",
        ),
        (
            ["train.distributed=fsdp", "train.gpus=2", "train.fused_lora=true"],
            "do not apply under train.distributed=fsdp",
        ),
        (
            ["train.distributed=fsdp", "train.gpus=2", "quant.quant_storage=uint8"],
            "quant.quant_storage=auto or bfloat16",
        ),
        (
            [
                "train.distributed=fsdp",
                "train.gpus=2",
                "model.dtype=float16",
                "train.compute_dtype=auto",
                "peft.adapter_dtype=float32",
            ],
            "fsdp trains in bfloat16 or float32",
        ),
    ],
)
def test_impossible_distributed_settings(compose, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


def test_fsdp_without_a_local_checkpoint_is_refused_before_loading(compose, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    config = compose([*FAST, "train.distributed=fsdp", "train.gpus=2", "train.device=cpu"])
    config["model"] = {
        **config["model"],
        "path": None,
        "hub_id": "meta-llama/Llama-2-7b-hf",
        "arch": json.loads((Path(config["model"]["path"]) / "config.json").read_text()),
    }
    monkeypatch.setattr(models, "load_tokenizer", lambda source: pytest.fail("loaded before the check"))
    assert recipe.run(config, tmp_path, progress=False) == "failed"
    assert "fsdp reads the checkpoint one block at a time from safetensors files" in caplog.text
    assert "Llama-2-7b-hf has no safetensors weights in the local HF cache" in caplog.text
    assert not list(tmp_path.iterdir())


def test_plan_mode_estimates_memory_per_gpu(compose):
    def estimate(*extra):
        spec = validate(compose(["mode=plan", "model=llama2_70b", "train=qlora", "peft.r=64", *extra]))
        return plan.plan_estimate(spec, plan.plan_accounting(spec))

    one, ddp = estimate(), estimate("train.distributed=ddp", "train.gpus=2")
    fsdp2, fsdp4 = (estimate("train.distributed=fsdp", f"train.gpus={n}") for n in (2, 4))
    acc = plan.plan_accounting(validate(compose(["mode=plan", "model=llama2_70b", "peft.r=64"])))
    adapter_grads = acc["trainable_params"] * 2  # bf16 gradients: DDP keeps a bucket copy of them
    assert ddp["peak_memory_bytes"] - one["peak_memory_bytes"] == adapter_grads
    assert one["peak_memory_bytes"] > fsdp2["peak_memory_bytes"] > fsdp4["peak_memory_bytes"]
    # sharding divides weights, adapters, their gradients and AdamW's two fp32 states: from 2 to 4 GPUs the per-GPU
    # need drops by a quarter of them (the fp32 norms of train=qlora are a rounding error next to these)
    sharded = acc["quantized_model_bytes"] + acc["trainable_params"] * (2 + 2 + 8)
    drop = fsdp2["peak_memory_bytes"] - fsdp4["peak_memory_bytes"]
    assert drop == pytest.approx(sharded / 4, rel=0.01)
    assert fsdp2["gpus"] == 2 and fsdp2["distributed"] == "fsdp"


def test_slurm_task_variables_become_torchrun_ones(monkeypatch):
    from qpeft_bench import distributed

    env = {
        "SLURM_PROCID": "3",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_NODELIST": "gpu07,gpu08",
    }
    got = distributed.slurm_world(env)
    assert {k: got[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
    }
    assert got["MASTER_ADDR"] == "gpu07" and 20000 <= int(got["MASTER_PORT"]) < 40000
    # a batch script's own process (SLURM_NTASKS > 1, but no srun step of several tasks) stays a single process
    for key in ("WORLD_SIZE", "RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert distributed.launched() is distributed.SINGLE


@pytest.mark.gpu
def test_gpu_fsdp_on_two_gpus_follows_one_gpu(tmp_path):
    """The CUDA path (NCCL, bitsandbytes' 4-bit codes stored as bf16 and flattened by FSDP): two GPUs follow one GPU
    with the same global batch, and process 0 saves and evaluates the gathered adapters."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    common = [
        *FAST,
        "train.batch_size=4",
        "train.device=cuda",
        "peft.dropout=0",
        "train.fused_lora=false",
        "train.compile=false",
    ]
    a, b = one_and_two(tmp_path, common, "fsdp")
    assert b["config"]["quant"]["name"] == "nf4" and b["train"]["distributed"]["world_size"] == 2
    for x, y in zip(a["train"]["losses"], b["train"]["losses"], strict=True):
        assert y == pytest.approx(x, rel=2e-2)  # bf16: the sharded gradient norm's summation order flips roundings
    assert b["eval"]["after"]["ppl_heldout"] == pytest.approx(a["eval"]["after"]["ppl_heldout"], rel=2e-2)
