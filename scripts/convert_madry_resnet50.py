"""Convert a MadryLab robustness-library ResNet-50 checkpoint (e.g. robust-models-transfer's
``resnet50_linf_eps4.0.ckpt``, now at huggingface.co/madrylab/robust-imagenet-models) into a
dist_robust source checkpoint that ``model.init_from`` accepts.

    .venv/bin/python scripts/convert_madry_resnet50.py resnet50_linf_eps4.0.ckpt \
        [--out checkpoints/resnet50_linf_eps4.0.safetensors]

The library stores ``{"model": state_dict, ...}`` with keys ``module.model.*`` (the torchvision
ResNet-50), ``module.attacker.model.*`` (the same weights again) and ``module.normalizer.new_mean /
new_std``. They map to ``features.*``, ``head.*`` (the 1000-class fc, replaced at fine-tuning) and
``normalize.mean / std``. Loading uses ``weights_only=True``: nothing in the file is executed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_robust.checkpoint import save_checkpoint  # noqa: E402
from dist_robust.models import model_from_state  # noqa: E402


def convert(madry_state: dict) -> dict:
    state = madry_state.get("model", madry_state.get("state_dict", madry_state))
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("model.fc."):
            out["head." + key[len("model.fc."):]] = value
        elif key.startswith("model."):
            out["features." + key[len("model."):]] = value
        elif key in ("normalizer.new_mean", "normalizer.new_std"):
            out["normalize." + key.split("new_")[1]] = value.reshape(1, -1, 1, 1)  # Normalize's buffer shape
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    src = Path(args.ckpt)
    try:
        raw = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (one line for any unreadable file)
        sys.exit(f"error: cannot read {src} as a weights-only torch checkpoint: {str(e).splitlines()[0]}")
    state = convert(raw)
    try:
        model_from_state("resnet50", state)  # strict: every key present with the right shape
    except ValueError as e:
        sys.exit(f"error: {src} is not a robustness-library ResNet-50: {e}")
    out = Path(args.out) if args.out else Path("checkpoints") / (src.stem + ".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out.parent, out.name[: -len(".safetensors")], state,
                    dict(config={"model": {"name": "resnet50"}, "data": {"name": "imagenet"}}, source=str(src)))
    print(f"wrote {out} ({len(state)} tensors)")


if __name__ == "__main__":
    main()
