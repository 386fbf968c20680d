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
- Checkpoints stay plain safetensors + sidecar: ZeRO 1/2 keep the optimizer's state (SGD's momentum)
  as flat slices of a per-rank partition; ``ZeroOptimizerState`` assembles one full tensor per parameter
  and state key through DeepSpeed's public ``safe_get_full_optimizer_state`` (a collective) and writes
  them back with ``safe_set_full_optimizer_state``, in torch's state_dict layout, for any torch
  optimizer. A checkpoint written under either engine resumes under the other, at any stage.

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


class ZeroOptimizerState:
    """A torch optimizer's ``param_groups`` / ``state_dict`` / ``load_state_dict`` over ZeRO 1/2's
    partitioned state, for any torch optimizer, through DeepSpeed's public full-state API
    (``safe_get_full_optimizer_state`` / ``safe_set_full_optimizer_state``). ``state_dict`` is a
    collective (each rank holds a slice of every state tensor), ``load_state_dict`` is not.

    ZeRO gives the client optimizer one flat fp32 partition per parameter group, so that optimizer's
    state holds two kinds of entries: tensors shaped like the partition (SGD's ``momentum_buffer``,
    Adam's ``exp_avg`` / ``exp_avg_sq``), which the public API assembles and scatters per parameter; and
    the rest (Adam's ``step``), one per group, which ``state_dict`` gives every parameter of the group (a
    torch optimizer that steps them all together holds the same) and ``load_state_dict`` takes only when
    the group's parameters agree on it.
    """

    def __init__(self, zero_optimizer, groups: list[list[torch.nn.Parameter]]):
        self.zero = zero_optimizer
        self.groups = [[p for p in g if p.requires_grad] for g in groups]  # ZeRO's rule for a partition
        # the inner (torch) optimizer's parameters are the flat partitions, one per group, in order
        self.flats = [(g, flat) for g in zero_optimizer.optimizer.param_groups for flat in g["params"]]
        if len(self.flats) != len(self.groups):
            raise RuntimeError(f"DeepSpeed's optimizer holds {len(self.flats)} partitions for "
                               f"{len(self.groups)} parameter groups")

    @property
    def param_groups(self):
        return self.zero.param_groups

    def _link(self, flat, params) -> None:
        """Point each parameter's fragment at the partition's current state (DeepSpeed's exported
        ``lazy_init_hp_params_optimizer_state``). DeepSpeed links them itself after its first step only;
        before it, a restored state would have no fragments to be written through."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state
        lazy_init_hp_params_optimizer_state(params, flat, self.zero.optimizer.state)

    def state_dict(self) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state
        state, groups, first = {}, [], 0
        for (group, flat), params in zip(self.flats, self.groups):
            flat_state = self.zero.optimizer.state.get(flat, {})  # empty before the first step, as torch's
            if flat_state:
                self._link(flat, params)
            for i, p in enumerate(params, first):
                for key in sorted(flat_state):  # one order on every rank (a restored state's follows its file's)
                    value = flat_state[key]
                    if torch.is_tensor(value) and value.shape == flat.shape:  # partitioned: assembled
                        state.setdefault(i, {})[key] = safe_get_full_optimizer_state(p, key).view_as(p)
                    else:  # one per group
                        state.setdefault(i, {})[key] = value.clone() if torch.is_tensor(value) else value
            hyper = {k: v for k, v in group.items() if k != "params"}
            groups.append(dict(hyper, params=list(range(first, first + len(params)))))
            first += len(params)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        """Replace the state by ``sd`` (torch's layout, one entry per parameter, from either engine), also
        in an engine that has not stepped yet. A parameter without a partitioned entry that others of its
        group have (no gradient yet when it was saved) gets zeros."""
        from deepspeed.utils import safe_set_full_optimizer_state
        saved_groups = sd["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g) for g in self.groups]:
            raise ValueError(f"the checkpoint's optimizer has {sum(len(g['params']) for g in saved_groups)} "
                             f"parameters, this run trains {sum(len(g) for g in self.groups)}")
        for saved, (group, flat), params in zip(saved_groups, self.flats, self.groups):
            per_param = [sd["state"].get(i, {}) for i in saved["params"]]
            keys = list(dict.fromkeys(k for s in per_param for k in s))
            partitioned = [k for k in keys if all(torch.is_tensor(s[k]) and s[k].dim() > 0 and s[k].shape == p.shape
                                                  for s, p in zip(per_param, params) if k in s)]
            flat_state = {}
            for key in keys:
                if key in partitioned:
                    flat_state[key] = torch.zeros_like(flat)  # filled below, through the fragments
                    continue
                values = [s[key] for s in per_param if key in s]
                if any(not _same(values[0], v) for v in values[1:]):
                    raise ValueError(f"the checkpoint's optimizer state {key!r} differs between the parameters "
                                     "of one group; ZeRO keeps one per group")
                flat_state[key] = _placed(key, values[0], flat, group)
            self.zero.optimizer.state[flat] = flat_state
            if flat_state:
                self._link(flat, params)
            for p, s in zip(params, per_param):
                for key in partitioned:
                    value = s.get(key)
                    safe_set_full_optimizer_state(p, torch.zeros_like(p) if value is None else value, key)
            group.update({k: v for k, v in saved.items() if k != "params"})


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _placed(key: str, value, flat: torch.Tensor, group: dict):
    """A per-group state value where torch's ``Optimizer.load_state_dict`` would put it: ``step`` stays
    as saved unless the optimizer is capturable or fused (then float32 on the parameters' device); other
    tensors take the parameters' dtype and device."""
    if not torch.is_tensor(value):
        return value
    if key == "step":
        return value.to(torch.float32, flat.device).clone() if group.get("capturable") or group.get("fused") \
            else value.clone()
    return value.to(flat.dtype if value.is_floating_point() else value.dtype, flat.device).clone()


class DeepSpeedTrainer:
    """``model`` (forward with gradient sync), ``optimizer`` (param_groups, state_dict, load_state_dict)
    and ``step(loss)`` for the training loop."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.SGD, cfg, per_rank_batch: int):
        # the accelerator of this run's device, named: DeepSpeed's own probe warns on every CPU rank
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if next(model.parameters()).is_cuda else "cpu")
        import deepspeed
        dist.init_alone(next(model.parameters()).device)  # one process: ours, not DeepSpeed's own group
        os.environ.setdefault("LOCAL_RANK", str(dist.read_env().local_rank))  # DeepSpeed asserts it (a bare srun)
        groups = [list(group["params"]) for group in opt.param_groups]  # ZeRO replaces them by its partitions
        self.model, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                                        config=ds_config(cfg, per_rank_batch))
        if dist.world_size() > 1:
            self.model.register_forward_pre_hook(_broadcast_buffers_hook)
        self.optimizer = opt if cfg.dist.zero_stage == 0 else ZeroOptimizerState(ds_opt, groups)
        self.scaler = None  # fp16 is refused with DeepSpeed (config.py): its loss scale is not checkpointed

    def step(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        self.model.step()  # also zeroes the gradients
