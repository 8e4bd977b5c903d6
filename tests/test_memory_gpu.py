"""Device-wide memory from NVML beside the allocator's figures (issue 7), on the lent GPU."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST

from qpeft_bench import recipe


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvml_device_use_is_recorded_and_exceeds_the_allocator_peak(compose, tmp_path):
    pytest.importorskip("pynvml", reason="nvidia-ml-py")
    assert recipe.run(compose([*FAST, "train.device=cuda"]), tmp_path, progress=False) == "completed"
    tr = json.loads((tmp_path / "result.json").read_text())["train"]
    # NVML counts the CUDA context and the allocator's cache too: never less than what torch has allocated
    assert tr["device_used_peak_bytes"] > tr["peak_reserved_bytes"] >= tr["peak_memory_bytes"] > 0
