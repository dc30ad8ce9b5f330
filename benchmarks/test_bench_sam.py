"""SAM image-encoder training step (forward + backward, adapters on every qkv Linear):
no adapter vs plain LoRA vs each Conv-LoRA provider. Groups are ``sam-step/<model>/b<batch>/<dtype>``.
"""

from __future__ import annotations

from convlora_kernels import _bench_core as core


def test_sam_step(benchmark, bench_session: core.Session, sam_case: core.SamCase, record_row) -> None:
    """One training step at the model's resolution (1024 px for vit_b / vit_h)."""
    record_row(benchmark, bench_session.run_sam(sam_case))
