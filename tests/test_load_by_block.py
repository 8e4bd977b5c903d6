"""calib.load_by_block: the base read in from its safetensors checkpoint one block at a time, as the run uses it
(quantized_base.load_base), and refused at compose time where it cannot be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qpeft_bench import models, quantized_base
from qpeft_bench.config import ConfigError
from qpeft_bench.spec import validate

GPTQ = ["quant=gptq", "quant.bits=4", "quant.group_size=32", "calib.samples=4", "calib.seq_len=32"]


def _base(compose, overrides):
    spec = validate(compose(GPTQ + overrides))
    record: dict = {}
    base = quantized_base.load_base(spec, "cpu", record, save=lambda: None, progress=False, keep=False)
    return base, record


def test_a_calibrated_base_is_read_block_by_block_by_default_into_the_same_quantized_model(compose):
    by_block, rec_a = _base(compose, [])
    whole, rec_b = _base(compose, ["calib.load_by_block=false"])
    assert rec_a["quant"]["layerwise_load"] is True and rec_b["quant"]["layerwise_load"] is False
    assert rec_a["quant"]["sequential"] and rec_b["quant"]["sequential"]
    for t in by_block.targets:
        assert torch.equal(by_block.model.get_submodule(t).qweight, whole.model.get_submodule(t).qweight), t
    # the probe ran block by block in both, on the same quantized blocks' outputs
    assert rec_a["quant"]["output_rel_error"] == rec_b["quant"]["output_rel_error"] is not None
    a, b = by_block.model.state_dict(), whole.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)


def test_one_pass_calibration_reads_the_whole_model(compose):
    _, record = _base(compose, ["calib.sequential=false"])
    assert record["quant"]["layerwise_load"] is False and record["quant"]["sequential"] is False


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["calib.load_by_block=maybe"], "calib.load_by_block='maybe'; choose true, false or auto"),
        (["calib.load_by_block=true", "calib.sequential=false"], "need calib.sequential=true"),
        (["calib.load_by_block=true", "quant=smoothquant"], "calibrates in one pass of the whole model"),
        # found by a hostile trial: read by block, nf4's record lost its output errors under the same run id
        (["calib.load_by_block=true", "quant=nf4"], "quant=nf4 is quantized layer by layer after a whole load"),
    ],
)
def test_a_by_block_load_that_cannot_be_is_refused_at_compose_time(compose, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose(overrides if any(o.startswith("quant=") for o in overrides) else GPTQ + overrides))


def test_a_by_block_load_needs_safetensors(compose, tmp_path):
    spec = validate(compose(["mode=plan"]))
    for src in Path(spec.model.path).iterdir():  # the same model as a pytorch_model.bin checkpoint
        if src.is_file() and src.suffix != ".safetensors":
            (tmp_path / src.name).write_bytes(src.read_bytes())
    state = models.load_model(spec.model.path, spec.model.dtype, "cpu").state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(
        ConfigError, match="has no model.safetensors.*save it as safetensors or set calib.load_by_block=false"
    ):
        validate(compose(GPTQ + ["calib.load_by_block=true", f"model.path={tmp_path}"]))
    # auto reads a .bin checkpoint whole, as before
    assert not quantized_base.loads_by_block(validate(compose(GPTQ + [f"model.path={tmp_path}"])))


def test_fsdp_from_a_hub_id_not_in_the_cache_is_refused_not_loaded_with_random_weights(compose):
    # before, the by-block source of a hub id was the random one benchmarks use
    with pytest.raises(ConfigError, match="nobody/uncached has no safetensors weights in the local HF cache"):
        validate(compose(["train.distributed=fsdp", "train.gpus=2", "model.path=null", "model.hub_id=nobody/uncached"]))
