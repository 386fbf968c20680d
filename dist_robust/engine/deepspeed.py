"""DeepSpeed as the second training engine (``dist.engine: deepspeed``), behind the loop's DDP interface.

The loop needs three things from an engine: a training forward that synchronises gradients, an
optimizer step, and the optimizer's state in the project's checkpoint format. Here:

- The model is wrapped by ``deepspeed.initialize`` with our own torch SGD as the client optimizer
  (ZeRO stage ``dist.zero_stage``). train.precision=bf16 goes through DeepSpeed's ``torch_autocast``
  section, not its ``bf16`` one (which casts the weights and BN statistics, and fails with BatchNorm on
  its CPU accelerator); fp16 is refused (config.py). Attacks keep running on the unwrapped module
  (``engine.module``), as under DDP.
- DDP copies rank 0's buffers (BN running statistics) to every rank at each training forward
  (broadcast_buffers); DeepSpeed does not. A forward pre-hook does the same here, so the attacks,
  which read the running statistics, see what they see under DDP and both engines train alike.
- Checkpoints stay plain safetensors + sidecar: ZeRO 1/2 keep SGD's momentum as flat slices of a
  per-rank partition; ``ZeroSGDState`` assembles one full buffer per parameter (a collective) and
  writes them back, in torch SGD's state_dict layout. A checkpoint written under either engine
  resumes under the other, at any stage.

ZeRO-3 partitions the parameters themselves and is refused by config validation: tried, a PGD-AT epoch
trained with DDP's loss (the attack's forwards on the unwrapped module gather the weights through
DeepSpeed's hooks), but the first checkpoint failed, because the module's ``state_dict()`` then holds
only this rank's partition; checkpoints, export and evaluation would all need the weights gathered.
"""
from __future__ import annotations

import os

import torch

from .. import dist


def ds_config(cfg, per_rank_batch: int) -> dict:
    """The DeepSpeed config of a run: everything DeepSpeed needs is set here, nothing is read from the user."""
    return {
        "train_micro_batch_size_per_gpu": per_rank_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.dist.zero_stage},
        # DeepSpeed only vouches for its own optimizers under ZeRO; ours is torch's SGD, passed as the
        # client optimizer (so no "optimizer" section, and "torch_adam", which only steers DeepSpeed's own
        # Adam away from its CPU extension, has nothing to apply to).
        "zero_allow_untested_optimizer": True,
        # train.precision: torch autocast inside DeepSpeed's forward (its own "bf16"/"fp16" sections would
        # cast the weights and BN statistics too, and fail with BN on its CPU accelerator). Gradients are
        # still reduced in fp32 (no module is declared safe to communicate in the lower precision).
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "torch_autocast": {"enabled": cfg.train.precision != "fp32",
                           "dtype": "bfloat16" if cfg.train.precision == "bf16" else "float16",
                           "lower_precision_safe_modules": []},
        "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,  # the loop logs; DeepSpeed's own step lines would repeat it
        "wall_clock_breakdown": False,
    }


def _broadcast_buffers_hook(module, args):
    if torch.is_grad_enabled():  # training forwards, as DDP (attacks run on the unwrapped module)
        for buf in module.module.buffers():
            torch.distributed.broadcast(buf, src=0)


class ZeroSGDState:
    """torch.optim.SGD's ``param_groups`` / ``state_dict`` / ``load_state_dict`` over ZeRO 1/2's
    partitioned momentum. ``state_dict`` is a collective (every rank holds a slice)."""

    def __init__(self, zero_optimizer, params: list):
        from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state
        self._get, self._set = safe_get_full_optimizer_state, safe_set_full_optimizer_state
        self.zero, self.params = zero_optimizer, params
        # SGD creates momentum at its first step, and DeepSpeed links each parameter to its slice only
        # then; a zero buffer now gives the same first step (buf = grad) and lets a resume restore it.
        for flat in zero_optimizer.single_partition_of_fp32_groups:
            zero_optimizer.optimizer.state[flat].setdefault("momentum_buffer", torch.zeros_like(flat))
        zero_optimizer._lazy_init_hp_params_optimizer_state()

    @property
    def param_groups(self):
        return self.zero.param_groups

    def state_dict(self) -> dict:
        state = {i: {"momentum_buffer": self._get(p, "momentum_buffer").view_as(p).clone()}
                 for i, p in enumerate(self.params)}
        (group,) = self.zero.optimizer.param_groups
        hyper = {k: v for k, v in group.items() if k != "params"}
        return {"state": state, "param_groups": [dict(hyper, params=list(range(len(self.params))))]}

    def load_state_dict(self, sd: dict) -> None:
        (saved,) = sd["param_groups"]
        if len(saved["params"]) != len(self.params):
            raise ValueError(f"the checkpoint's optimizer has {len(saved['params'])} parameters, this run "
                             f"trains {len(self.params)}")
        for i, p in enumerate(self.params):
            buf = sd["state"].get(i, {}).get("momentum_buffer")
            self._set(p, torch.zeros_like(p) if buf is None else buf.to(p.device, p.dtype), "momentum_buffer")
        for group in self.zero.optimizer.param_groups:
            group.update({k: v for k, v in saved.items() if k != "params"})


class DeepSpeedTrainer:
    """``model`` (forward with gradient sync), ``optimizer`` (param_groups, state_dict, load_state_dict)
    and ``step(loss)`` for the training loop."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.SGD, cfg, per_rank_batch: int):
        # the accelerator of this run's device, named: DeepSpeed's own probe warns on every CPU rank
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if next(model.parameters()).is_cuda else "cpu")
        import deepspeed
        dist.init_alone(next(model.parameters()).device)  # one process: ours, not DeepSpeed's own group
        os.environ.setdefault("LOCAL_RANK", str(dist.read_env().local_rank))  # DeepSpeed asserts it (a bare srun)
        params = [p for group in opt.param_groups for p in group["params"]]
        self.model, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                                        config=ds_config(cfg, per_rank_batch))
        if dist.world_size() > 1:
            self.model.register_forward_pre_hook(_broadcast_buffers_hook)
        self.optimizer = opt if cfg.dist.zero_stage == 0 else ZeroSGDState(ds_opt, params)
        self.scaler = None  # fp16 is refused with DeepSpeed (config.py): its loss scale is not checkpointed

    def step(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        self.model.step()  # also zeroes the gradients
