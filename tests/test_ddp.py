"""DDP without find_unused_parameters: experts no sample chose must still get a gradient."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from convlora_kernels import backends, collect_moe_loss

from .conftest import make_layer


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["eager", "triton", "cuda"])
def test_ddp_with_unchosen_experts(process_group, backend):
    x = torch.randn(2, 5, 5, 12)
    why = backends.unavailable_reason(backend, x)
    if why is not None:
        pytest.skip(f"{backend} backend unavailable here: {why}")
    layer = make_layer(r=3, num_experts=8, dtype=torch.float32, backend=backend).train()
    model = DistributedDataParallel(layer, find_unused_parameters=False)
    for _ in range(3):  # DDP reports unreduced parameters at the next iteration
        out = model(x)
        assert len(set(layer.last_expert_index.tolist())) <= 2  # at most 2 of 8 experts used
        (out.square().mean() + collect_moe_loss(layer)).backward()
        assert layer.expert_weight.grad is not None
        model.zero_grad(set_to_none=True)
