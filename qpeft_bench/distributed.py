"""Data-parallel fine-tuning through PyTorch's DistributedDataParallel, one process per GPU (or per CPU slot with
the gloo backend), launched by torchrun:

    torchrun --nproc-per-node 2 -m qpeft_bench.cli train.distributed=ddp ...

Every process loads and quantizes the base on its own device and attaches the same seeded adapters; DDP averages
the adapters' gradients. Batches: `train.batch_size` is per process, so one optimizer step sees
batch_size x grad_accum x world sequences. Every process draws the same seeded micro-batches of a step and keeps
its own slice; the loss of each micro-batch is weighted by its share of the labelled tokens of the whole step (all
processes), so the summed gradient equals the gradient one process would get on all the step's micro-batches:
two processes with grad_accum 1 follow the trajectory of one process with grad_accum 2 (tests/test_distributed.py).

Process 0 writes the record and the adapters and runs the evaluation; the others wait.

Fully sharded (train.distributed=fsdp, PyTorch's FullyShardedDataParallel): every process loads its base layer by
layer and quantizes it (bitsandbytes 4-bit codes stored in the model's dtype, so a block flattens into one tensor),
then FSDP keeps 1/N of each decoder block, of the adapters, their gradients and the optimizer state per process
and gathers a block only while it computes. The data and loss weighting are DDP's. Each adapter and each module
kept in another dtype (fp32 norms) is a unit of its own, since one FSDP unit holds one dtype and either only
trainable or only frozen tensors. After training the adapters are gathered to process 0, which rebuilds the
unsharded quantized base, saves and evaluates.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import functools
import os
import subprocess
import warnings

import torch
import torch.distributed as dist

from qpeft_bench import adapters, families, quant
from qpeft_bench.config import ConfigError, RunSpec

# What FSDP can shard is declared by each quantizer and each method (FSDP_SHARDABLE): bases whose frozen weights are
# parameters (bitsandbytes 4-bit, or unquantized) and adapters that keep their trainable tensors in modules of their
# own (peft's layers). HQQ, RTN/GPTQ and our other formats keep quantized weights in buffers or outside the module,
# which FSDP would copy whole to every GPU; our custom adapters hold trainable and frozen tensors in one module, which
# FSDP cannot flatten.
FSDP_FAMILIES = ("llama",)  # what was run sharded on two GPUs (the others' blocks are found the same way, untested)


def check_fsdp(spec: RunSpec):
    """What FSDP training cannot do, refused before loading; returns the quantizer's config with its storage dtype
    made concrete (bitsandbytes' 4-bit codes stored as the model's dtype, so a block flattens into one tensor)."""
    t = spec.train
    if spec.model.family not in FSDP_FAMILIES:
        raise ConfigError(
            f"train.distributed=fsdp shards model families {FSDP_FAMILIES}; model {spec.model.name!r} "
            f"is {spec.model.family!r}: use train.distributed=ddp"
        )
    if not quant.capability(spec.quant_name, "FSDP_SHARDABLE"):
        raise ConfigError(
            f"train.distributed=fsdp shards quant in {quant.names_where('FSDP_SHARDABLE')}; quant={spec.quant_name} "
            "keeps its "
            "weights where FSDP cannot shard them: use train.distributed=ddp"
        )
    if not adapters.capability(spec.peft_method, "FSDP_SHARDABLE"):
        raise ConfigError(
            f"train.distributed=fsdp trains peft methods {adapters.names_where('FSDP_SHARDABLE')} (peft's layers); "
            f"peft.method={spec.peft_method} keeps trainable and frozen tensors in one module: use "
            "train.distributed=ddp"
        )
    if t.checkpoint_every > 0:
        raise ConfigError(
            "train.checkpoint_every > 0 is not supported with train.distributed=fsdp yet (its "
            "optimizer state is sharded); set train.checkpoint_every=0"
        )
    compute = spec.model.dtype if t.compute_dtype == "auto" else t.compute_dtype
    if compute == "float16":
        raise ConfigError(
            "train.distributed=fsdp trains in bfloat16 or float32 (fp16 loss scaling of sharded "
            "gradients is not implemented); set train.compute_dtype=bfloat16"
        )
    storage = getattr(spec.quant, "quant_storage", None)
    if storage == "auto":
        return dataclasses.replace(spec.quant, quant_storage=spec.model.dtype)
    if storage is not None and storage != spec.model.dtype:
        raise ConfigError(
            f"train.distributed=fsdp needs quant.quant_storage=auto or {spec.model.dtype} (the model's "
            f"dtype: FSDP flattens a block into one dtype), not {storage}"
        )
    return spec.quant


# Evaluation runs on process 0 only while the others wait at a barrier: the default 10-minute collective timeout
# would kill a sweep whose MMLU takes longer.
TIMEOUT = datetime.timedelta(hours=6)


@dataclasses.dataclass(frozen=True)
class World:
    """This process' place in the job (rank 0 of 1 for a plain run)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1 or dist.is_initialized()


SINGLE = World()


def launched() -> World:
    """The world torchrun describes in the environment, or the tasks of a SLURM job step (srun, or submitit with
    tasks_per_node > 1: hydra/launcher=slurm_ddp), or SINGLE."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        os.environ.update(slurm_world())
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def slurm_world(env: dict[str, str] | None = None) -> dict[str, str]:
    """torchrun's variables for a task of a SLURM job step. SLURM_STEP_NUM_TASKS is set by srun only, so a batch
    script's single process (SLURM_NTASKS may still be > 1 there) is not mistaken for one of several. Rank 0 runs on
    the step's first node, which hosts the rendezvous; the port follows the job id, so concurrent jobs on one node
    do not collide."""
    env = os.environ if env is None else env
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
    try:  # "node[1-4]" -> node1 (scontrol expands SLURM's host list syntax)
        first = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        first = nodes.split(",")[0]
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": first,
        "MASTER_PORT": str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }


def setup(kind: str, device: str, gpus: int = 1) -> tuple[World, str]:
    """Join the process group for train.distributed=`kind` with `gpus` processes (train.gpus); returns (world,
    this process' device)."""
    if kind == "none":
        return SINGLE, device
    if kind not in ("ddp", "fsdp"):
        raise ConfigError(f"train.distributed={kind!r} is not implemented; use ddp, fsdp (or none)")
    world = launched()
    if world is SINGLE:
        raise ConfigError(
            f"train.distributed={kind} needs one process per GPU: launch with "
            f"`torchrun --nproc-per-node N -m qpeft_bench.cli train.distributed={kind} ...`"
        )
    if world.size != gpus:
        raise ConfigError(
            f"train.gpus={gpus} but torchrun started {world.size} process(es); set "
            f"train.gpus={world.size} (the global batch, hence the run, depends on it)"
        )
    cuda = device.startswith("cuda")
    if cuda:
        if torch.cuda.device_count() < world.size:
            raise ConfigError(
                f"train.distributed={kind} with {world.size} processes but only "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # one process group for the process' lifetime: the runs of a sweep (-m under torchrun) share it, since
        # joining torchrun's rendezvous a second time after destroying the group fails
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        atexit.register(_destroy)
    return world, device


def wrap(model, world: World, device: str, kind: str = "ddp", storage_dtype: torch.dtype | None = None):
    """The model under DDP (adapters' gradients averaged) or FSDP (sharded; `storage_dtype`: the dtype of the frozen
    base's tensors), or the model itself for a single process."""
    if not world.active:
        return model
    if kind == "fsdp":
        return shard(model, device, storage_dtype)
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    # frozen quantized weights are identical on every process already; broadcasting buffers each step is waste
    # (torch 2.13 renames the switch; the old name keeps the no-sync-at-init behaviour we want)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*deprecated", category=FutureWarning)
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def _own_unit(module, storage_dtype: torch.dtype) -> bool:
    """A module whose own tensors cannot share its block's FSDP unit: trainable ones (adapters), or another dtype."""
    own = list(module.parameters(recurse=False))
    return bool(own) and any(p.requires_grad or p.dtype != storage_dtype for p in own)


def block_classes(model) -> set[type]:
    """The decoder block class(es), where the model's family declares its blocks (families.py): FSDP's unit of
    sharding and gathering. `model` may be wrapped (peft): the first module with a known family's config is it."""
    for module in model.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if model_type not in families.FAMILIES:
            continue
        try:
            layers = module.get_submodule(families.get(model_type).blocks)
        except AttributeError:
            continue
        return {type(layer) for layer in layers}
    raise ConfigError("train.distributed=fsdp: no decoder blocks where the model's family declares them")


def check_shardable(model) -> None:
    """One FSDP unit flattens only tensors that are all trainable or all frozen."""
    for name, module in model.named_modules():
        grads = {p.requires_grad for p in module.parameters(recurse=False)}
        if len(grads) > 1:
            raise ConfigError(
                f"train.distributed=fsdp: module {name} holds trainable and frozen tensors together, "
                "which FSDP cannot shard; use train.distributed=ddp for this method"
            )


def shard(model, device: str, storage_dtype: torch.dtype):
    """FullyShardedDataParallel over decoder blocks, with every adapter (and every module in another dtype) a unit
    of its own. The original parameters are not kept (use_orig_params=False): the frozen base has no gradients."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    check_shardable(model)
    for module in model.modules():  # FSDP's flattening drops a 4-bit weight's quantization state; bitsandbytes takes
        if hasattr(module, "quant_state") and hasattr(module.weight, "quant_state"):  # it back from the layer's own
            module.quant_state = module.weight.quant_state  # link, set here so it is this model's, on this device
    policy = functools.partial(
        _or_policy,
        policies=[
            functools.partial(
                lambda_auto_wrap_policy, lambda_fn=functools.partial(_own_unit, storage_dtype=storage_dtype)
            ),
            functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=block_classes(model)),
        ],
    )
    # FSDP1's flat parameters, not FSDP2's per-tensor DTensors: a 4-bit weight gathered as a plain tensor gets its
    # quantization state back from its layer (bitsandbytes' fix_4bit_weight_quant_state_from_module); a DTensor
    # would not be a Params4bit at all
    return FullyShardedDataParallel(
        model,
        auto_wrap_policy=policy,
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        use_orig_params=False,
        device_id=torch.device(device),
        limit_all_gathers=True,
    )


FSDP_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def trainable_state(model, world: World) -> dict[str, torch.Tensor]:
    """The trainable tensors by their unwrapped names, whole, on the CPU of process 0 ({} elsewhere): gathered from
    the shards under FSDP, taken as they are otherwise. A collective under FSDP: every process calls it."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    def own(named) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in named:
            if p.requires_grad:
                for prefix in FSDP_PREFIXES:
                    name = name.replace(prefix, "")
                out[name] = p.detach().to("cpu", copy=True)
        return out

    if not isinstance(model, FullyShardedDataParallel):
        return own(model.named_parameters()) if world.main else {}
    with FullyShardedDataParallel.summon_full_params(
        model, writeback=False, rank0_only=True, offload_to_cpu=next(model.parameters()).is_cuda
    ):
        return own(model.named_parameters()) if world.main else {}


def sum_all(value: float, device: str, world: World) -> float:
    """The sum of `value` over all processes (itself for one process)."""
    if not world.active:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device if device.startswith("cuda") else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def max_all(value: int, device: str, world: World) -> int:
    if not world.active:
        return value
    t = torch.tensor([int(value)], dtype=torch.int64, device=device if device.startswith("cuda") else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
