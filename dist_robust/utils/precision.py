"""The precisions a forward may run in, as one autocast context for training and attacks alike."""
from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device_type: str) -> torch.autocast:
    """Autocast of ``precision`` on ``device_type``. fp32 switches autocast *off* rather than leaving it
    as it is, so an fp32 attack inside a bf16 training forward does run in fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (fp32, bf16 or fp16)")
    if precision == "fp32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=_DTYPES[precision])
