"""The guard's torch parts: snapshots of the trainable state, lr scaling, and the step's signals across ranks.

Split from :mod:`gradience.integrations.guard` (which re-exports these names). Under DDP every rank holds the
same trainable tensors; under FSDP each rank holds its own shards of them (and of their optimizer state), so
capture/restore work on whatever the rank's optimizer holds, and :func:`step_signals` sums the squared norms
of the shards instead of averaging identical ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if inner is not None and hasattr(inner, "param_groups") else optimizer


@dataclass
class _Snapshot:
    params: list[Any]                                   # CPU copies, in TrainableState.params order
    state: list[dict[str, Any]] = field(default_factory=list)  # per param: key -> CPU tensor or plain value


class TrainableState:
    """The parameters an optimizer trains and their per-parameter optimizer state, copied to and from CPU.

    Copies reuse the buffers of an evicted snapshot when shapes match (no allocation in steady state).
    Restoring writes in place into the live tensors (so fused/foreach optimizers and DDP buckets keep their
    references) and re-creates state entries the snapshot has but the optimizer lost (or drops ones it gained).
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = _unwrap_optimizer(optimizer)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def numel(self) -> int:
        return sum(int(p.numel()) for p in self.params)

    def capture(self, reuse: _Snapshot | None = None) -> _Snapshot:
        import torch

        def copy(src: Any, buf: Any) -> Any:
            src = src.detach()
            if isinstance(buf, torch.Tensor) and buf.shape == src.shape and buf.dtype == src.dtype:
                buf.copy_(src)
                return buf
            return src.to("cpu", copy=True)

        old_params = reuse.params if reuse is not None else [None] * len(self.params)
        old_state = reuse.state if reuse is not None else [{} for _ in self.params]
        params = [copy(p, b) for p, b in zip(self.params, old_params, strict=True)]
        states: list[dict[str, Any]] = []
        opt_state = self.optimizer.state
        for p, old in zip(self.params, old_state, strict=True):
            entry: dict[str, Any] = {}
            for key, value in (opt_state[p].items() if p in opt_state else ()):
                entry[key] = copy(value, old.get(key)) if isinstance(value, torch.Tensor) else value
            states.append(entry)
        return _Snapshot(params, states)

    def restore(self, snap: _Snapshot) -> None:
        import torch

        with torch.no_grad():
            for p, saved in zip(self.params, snap.params, strict=True):
                p.copy_(saved)
            opt_state = self.optimizer.state
            for p, saved_state in zip(self.params, snap.state, strict=True):
                if not saved_state:
                    if p in opt_state:
                        del opt_state[p]
                    continue
                live = opt_state.setdefault(p, {})
                for key in [k for k in live if k not in saved_state]:
                    del live[key]
                for key, value in saved_state.items():
                    current = live.get(key)
                    if not isinstance(value, torch.Tensor):
                        live[key] = value
                    elif isinstance(current, torch.Tensor) and current.shape == value.shape \
                            and current.dtype == value.dtype:
                        current.copy_(value)
                    else:
                        device = "cpu" if key == "step" and not p.is_cuda else p.device
                        live[key] = value.to(device, copy=True)

    def drop_grads(self) -> None:
        """Make the coming ``optimizer.step()`` a no-op for every trained parameter."""
        for p in self.params:
            p.grad = None


def _schedulers(scheduler: Any) -> Iterable[Any]:
    """The scheduler, its accelerate-wrapped inner one, and the children of Sequential/Chained schedulers."""
    seen: set[int] = set()
    stack = [scheduler]
    while stack:
        s = stack.pop()
        if s is None or id(s) in seen:
            continue
        seen.add(id(s))
        yield s
        stack.append(getattr(s, "scheduler", None))
        stack.extend(getattr(s, "_schedulers", None) or [])


def scale_lr(optimizer: Any, scheduler: Any, factor: float) -> list[float]:
    """Multiply the learning rate by ``factor`` so that it stays lowered: each param group's ``lr`` (and
    ``initial_lr``), and the ``base_lrs`` from which LambdaLR-style schedulers (all of HF's) recompute the lr
    at every step — otherwise the next ``scheduler.step()`` would undo the change. Returns the new group lrs."""
    opt = _unwrap_optimizer(optimizer)
    for group in opt.param_groups:
        group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor
    for s in _schedulers(scheduler):
        base = getattr(s, "base_lrs", None)
        if isinstance(base, list):
            s.base_lrs = [b * factor for b in base]
        last = getattr(s, "_last_lr", None)
        if isinstance(last, list):
            s._last_lr = [x * factor for x in last]
    return [float(group["lr"]) for group in opt.param_groups]


def _dist_world() -> int:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return 1
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def step_signals(params: list[Any], loss: Any, *, check_grads: bool = True,
                 sharded: bool = False) -> tuple[float | None, float | None]:
    """(mean loss over ranks, total grad norm) of the current step, one host sync and, under DDP/FSDP, one small
    all_reduce so that every rank sees the same numbers (a NaN on any rank is a NaN everywhere).

    ``sharded`` (FSDP): each rank holds different shards of the gradients, so the total norm is the square root
    of the *sum* of the ranks' squared norms; under DDP the ranks' gradients are equal and it is their mean."""
    import torch

    grads = [p.grad for p in params if p.grad is not None] if check_grads else []
    device = grads[0].device if grads else (loss.device if isinstance(loss, torch.Tensor) else
                                           torch.device("cpu"))
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)
    loss_t = loss.detach().double().reshape(()).to(device) if isinstance(loss, torch.Tensor) else nan
    if grads:
        norm_t = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
        norm_t = norm_t.double().to(device)
    else:  # an FSDP rank whose shards hold no trained element adds nothing to the sum
        norm_t = torch.zeros((), dtype=torch.float64, device=device) if sharded else nan
    flags = [float(isinstance(loss, torch.Tensor)), float(bool(grads))]
    vec = torch.stack([loss_t, norm_t * norm_t, *torch.tensor(flags, dtype=torch.float64, device=device)])
    world = _dist_world()
    if world > 1:
        import torch.distributed as dist

        backend = dist.get_backend()
        if backend == "nccl" and vec.device.type != "cuda":
            vec = vec.to("cuda")
        elif backend == "gloo" and vec.device.type != "cpu":
            vec = vec.cpu()
        dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    loss_sum, sq_sum, n_loss, n_grad = (float(x) for x in vec.tolist())
    mean_loss = loss_sum / n_loss if n_loss > 0 else None
    # DDP gradients are identical on every rank after the all-reduce, so the mean of the squared norms is the
    # square of the common norm; a NaN/Inf on any rank propagates to all.
    grad_norm: float | None = None
    if n_grad > 0:
        grad_norm = math.sqrt(sq_sum if sharded else sq_sum / n_grad) if math.isfinite(sq_sum) else (
            sq_sum if math.isnan(sq_sum) else math.inf)
    return mean_loss, grad_norm



def torch_isfinite(t: Any) -> bool:
    import torch

    return bool(torch.isfinite(t).all())
