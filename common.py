"""
What the methods and the benchmark share, and a reader of the method can skip.

  - argument checks: every error names the argument and says what was expected;
  - task batches: padded [T, N, dx] / [T, N, dy] tensors with a boolean mask [T, N], their
    validation (make_batch), and context subsets (first_n, random_subset);
  - model files: save / load with the config, written whole or not at all;
  - the training loop: Adam with gradient clipping, a cosine learning-rate decay, and NaN
    detection, and minibatches of meta-training tasks.

ldvi_meta.py re-exports the names its users call (make_batch, Batch, first_n, ...), so
`import ldvi_meta as lm; lm.make_batch(...)` works; to copy the method into another project,
copy ldvi_meta.py and this file.
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Callable, NamedTuple

import torch

DEVICE_TYPES = ("cpu", "cuda")  # where data may live

# -----------------------------------------------------------------------------
# argument checks: every error names the argument and says what was expected

def _require(ok: bool, name: str, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {got!r}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


# (predicate, what it expects) pairs for _require_fields
INT_GE0 = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
INT_GE1 = (lambda v: _is_int(v) and v >= 1, "an integer >= 1")
POSITIVE = (lambda v: _is_real(v) and v > 0, "a finite number > 0")
BOOL = (lambda v: isinstance(v, bool), "True or False")
WIDTHS = (lambda v: isinstance(v, (tuple, list)) and all(_is_int(w) and w >= 1 for w in v),
          "a tuple of integer widths >= 1, e.g. (40, 40)")


def check_generator(gen, like: torch.Tensor | None = None, name: str = "gen") -> torch.Generator:
    """gen itself, or ValueError unless it is a torch.Generator (on like's device type, if given)."""
    if not isinstance(gen, torch.Generator):
        raise ValueError(f"{name}: expected a torch.Generator, e.g. torch.Generator().manual_seed(0), "
                         f"got {type(gen).__name__}")
    if like is not None and gen.device.type != like.device.type:
        raise ValueError(f"{name}: expected a generator on {like.device.type}, got one on {gen.device}")
    return gen


def _require_fields(obj, names, ok, expected: str) -> None:
    """_require for several fields of a config that share one rule."""
    for name in names:
        _require(ok(getattr(obj, name)), name, expected, getattr(obj, name))


# -----------------------------------------------------------------------------
# task batches: padded [T, N, .] tensors with a boolean mask [T, N]

class Batch(NamedTuple):
    x: torch.Tensor     # [T, N, dx]
    y: torch.Tensor     # [T, N, dy]
    mask: torch.Tensor  # [T, N] bool, True marks a real point

    @property
    def counts(self) -> torch.Tensor:
        return self.mask.sum(-1)  # [T]


def make_batch(x, y, mask=None, name: str = "context") -> Batch:
    """Validate a padded task batch; padded entries are zeroed so they can never leak.

    Raises ValueError naming the argument for wrong ranks or shapes, a non-bool mask,
    or NaN / inf in the real (unmasked) points. Every public function that takes a
    Batch passes it through here, so a Batch(...) built by hand is checked too."""
    for arg, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}.{arg}: expected a tensor of shape [T, N, d{arg}], got {shape}")
        if t.device.type not in DEVICE_TYPES:
            raise ValueError(f"{name}.{arg}: expected a tensor on one of {', '.join(DEVICE_TYPES)}, got one on "
                             f"{t.device} (other devices are not supported)")
    if x.shape[:2] != y.shape[:2]:
        raise ValueError(f"{name}: x is [T, N] = {tuple(x.shape[:2])} but y is {tuple(y.shape[:2])}")
    if x.dtype != y.dtype or not x.is_floating_point():
        raise ValueError(f"{name}: x and y must share one floating dtype, got {x.dtype} and {y.dtype}")
    T, N, _ = x.shape
    if mask is None:
        mask = torch.ones(T, N, dtype=torch.bool, device=x.device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (T, N):
        got = (mask.dtype, tuple(mask.shape)) if isinstance(mask, torch.Tensor) else mask
        raise ValueError(f"{name}.mask: expected a bool tensor of shape [T, N] = {(T, N)}, got {got}")
    if x.device != y.device or mask.device != x.device:
        raise ValueError(f"{name}: x, y and mask must be on one device, got {x.device}, {y.device}, {mask.device}")
    for arg, t in (("x", x), ("y", y)):
        if not torch.isfinite(t[mask]).all():
            raise ValueError(f"{name}.{arg}: NaN or inf in real (unmasked) points")
    keep = mask.unsqueeze(-1)  # [T, N, 1]
    return Batch(torch.where(keep, x, 0.0), torch.where(keep, y, 0.0), mask)


def check_batch(batch, name: str) -> Batch:
    """make_batch(*batch) for anything passed where a Batch belongs; ValueError naming the argument
    if it is not a Batch(x, y, mask) at all (a bare tensor, say)."""
    if isinstance(batch, torch.Tensor) or not isinstance(batch, tuple) or len(batch) != 3:
        raise ValueError(f"{name}: expected a Batch(x, y, mask) (see make_batch), got {type(batch).__name__}")
    return make_batch(*batch, name=name)


def check_compatible(batch, dx: int, dy: int, like: torch.Tensor, name: str = "context") -> Batch:
    """make_batch's checks plus the model's dx, dy, dtype and device (those of `like`)."""
    batch = check_batch(batch, name)
    if batch.x.shape[-1] != dx or batch.y.shape[-1] != dy:
        raise ValueError(f"{name}: expected dx = {dx}, dy = {dy}, got x {tuple(batch.x.shape)}, y {tuple(batch.y.shape)}")
    if batch.x.dtype != like.dtype or batch.x.device != like.device:
        raise ValueError(f"{name}: data are {batch.x.dtype} on {batch.x.device}, the model is {like.dtype} on {like.device}")
    return batch


def check_inputs(x_target, ctx: Batch, dx: int, name: str = "x_target") -> torch.Tensor:
    """Raise ValueError unless x_target is a finite [T, M, dx] tensor matching the context."""
    T = ctx.x.shape[0]
    if not isinstance(x_target, torch.Tensor) or x_target.dim() != 3 or x_target.shape[0] != T \
            or x_target.shape[-1] != dx:
        got = tuple(x_target.shape) if isinstance(x_target, torch.Tensor) else type(x_target).__name__
        raise ValueError(f"{name}: expected a tensor of shape [T, M, dx] = [{T}, M, {dx}], got {got}")
    if x_target.dtype != ctx.x.dtype or x_target.device != ctx.x.device:
        raise ValueError(f"{name}: expected {ctx.x.dtype} on {ctx.x.device} like the context, "
                         f"got {x_target.dtype} on {x_target.device}")
    if not torch.isfinite(x_target).all():
        raise ValueError(f"{name}: NaN or inf in the target inputs")
    return x_target


def check_samples(S, name: str = "S") -> int:
    _require(_is_int(S) and S >= 1, name, "an integer >= 1", S)
    return int(S)


def first_n(batch: Batch, n) -> Batch:
    """Context made of the first n[t] points of each task (n an int or an integer [T] tensor)."""
    batch = check_batch(batch, "batch")
    T, N = batch.mask.shape
    if isinstance(n, torch.Tensor):
        _require(not n.is_floating_point() and n.dtype != torch.bool and n.dim() <= 1, "n",
                 "an integer or an integer tensor of shape [T]", n)
        _require(n.dim() == 0 or n.shape[0] == T, "n", f"an integer or an integer tensor of shape [T] = [{T}]",
                 f"a tensor of shape {list(n.shape)}")
    else:
        _require(_is_int(n), "n", "an integer or an integer tensor of shape [T]", n)
    n = torch.as_tensor(n, device=batch.mask.device).expand(T)  # [T]
    if (n < 0).any() or (n > batch.counts).any():
        raise ValueError(f"n: expected context sizes in [0, points per task], got {n.tolist()} "
                         f"for tasks with {batch.counts.tolist()} points")
    keep = torch.arange(N, device=n.device) < n.unsqueeze(-1)  # [T, N]
    L = max(int(n.max()), 1) if T else 0  # trim the padding: the BNN never sees points past L
    return Batch(batch.x[:, :L], batch.y[:, :L], (batch.mask & keep)[:, :L])


def random_subset(batch: Batch, gen: torch.Generator, min_size: int = 0) -> Batch:
    """A random context subset per task, size uniform in [min_size, #points]."""
    T, N = batch.mask.shape
    counts = batch.counts  # [T]
    if (counts < min_size).any():
        raise ValueError(f"min_size: tasks have only {counts.min().item()} points, need >= {min_size}")
    dev = batch.mask.device
    size = min_size + (torch.rand(T, generator=gen, device=dev) * (counts - min_size + 1)).floor()  # [T]
    keys = torch.rand(T, N, generator=gen, device=dev).masked_fill(~batch.mask, 2.0)  # padding ranks last
    rank = keys.argsort(-1).argsort(-1)  # [T, N], random rank of each real point
    return Batch(batch.x, batch.y, batch.mask & (rank < size.unsqueeze(-1)))


# -----------------------------------------------------------------------------
# saving and loading: one file per model with its config (torch.load(weights_only=True))

def write_atomic(path: str, write: Callable, mode: str = "w") -> None:
    """write(file handle) into a temporary file in path's folder (same suffix), then rename:
    the file is written whole or not at all, and an interruption (Ctrl-C included) removes
    the temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class SaveLoad:
    """save(path) / cls.load(path) for a module with a dataclass `cfg` and a Config class."""

    def save(self, path: str, **meta: float) -> None:
        """Write {method, config, state_dict, meta} whole or not at all (meta: e.g. train_s=...)."""
        plain = lambda v: (int(v) if _is_int(v) else float(v) if isinstance(v, numbers.Real) and  # noqa: E731
                           not isinstance(v, bool) else v)   # numpy scalars -> Python: weights_only can read them
        config = {k: type(v)(plain(x) for x in v) if isinstance(v, (tuple, list)) else plain(v)
                  for k, v in asdict(self.cfg).items()}
        obj = dict(method=type(self).__name__, config=config, meta={k: plain(v) for k, v in meta.items()},
                   state_dict={k: v.detach().cpu() for k, v in self.state_dict().items()})
        write_atomic(path, lambda fh: torch.save(obj, fh), mode="wb")

    @staticmethod
    def read(path: str) -> dict:
        """The saved {method, config, state_dict, meta} of path, or ValueError naming the file."""
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- truncated, not a torch file, unreadable: all say the same
            raise ValueError(f"path: {path} is not a readable model file ({type(e).__name__}: {e})") from None
        if not isinstance(obj, dict) or not {"method", "config", "state_dict"} <= obj.keys():
            raise ValueError(f"path: {path} is not a model file written by save()")
        return obj

    @classmethod
    def load(cls, path: str, device="cpu"):
        obj = cls.read(path)
        if obj["method"] != cls.__name__:
            raise ValueError(f"path: expected a saved {cls.__name__}, {path} holds {obj['method']!r}")
        try:
            model = cls(cls.Config(**obj["config"]), torch.Generator().manual_seed(0))
            model.load_state_dict(obj["state_dict"])
        except (TypeError, RuntimeError) as e:
            raise ValueError(f"path: {path} was saved by another version of this code, whose {cls.__name__} "
                             f"format differs ({str(e).splitlines()[0]}); retrain, or load it with that "
                             "version") from None
        model.saved_meta = obj.get("meta", {})  # what save(path, **meta) recorded
        return model.to(device)


# -----------------------------------------------------------------------------
# numerical health

def finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """t itself, or FloatingPointError naming what produced NaN / inf from finite inputs."""
    if not torch.isfinite(t).all():
        raise FloatingPointError(f"{what}: NaN or inf in the output (the model has diverged)")
    return t


# -----------------------------------------------------------------------------
# the training loop, shared by every method

def train_loop(params, loss_fn: Callable[[int], torch.Tensor], iters: int, lr: float, clip: float,
               log_every: int = 100, name: str = "train", lr_final: float = 1.0, skipped: list | None = None) -> list:
    """Adam on loss_fn(iteration) with gradient-norm clipping and an optional cosine decay of the
    learning rate to lr * lr_final; returns the loss history.

    A step whose loss is finite but whose gradient norm is not (an overflow in one minibatch)
    is skipped, reported on stderr and appended to `skipped`, up to max(10, iters // 100)
    times. Raises FloatingPointError naming the method and the iteration when the loss turns
    NaN/inf, or when more gradients than that do; prints a one-line progress report on
    stderr every log_every iterations."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    history, t0, skipped, allowed = [], time.perf_counter(), [] if skipped is None else skipped, max(10, iters // 100)
    for it in range(iters):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(it, iters, lr, lr_final)
        loss = loss_fn(it)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss is {loss.item()} at iteration {it} (lower lr or check the data)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
        if not torch.isfinite(gnorm):
            skipped.append(it)
            if len(skipped) > allowed:
                raise FloatingPointError(f"{name}: gradient norm is {gnorm.item()} at iteration {it}, non-finite "
                                         f"{len(skipped)} times (at most {allowed} updates are skipped)")
            print(f"[{name}] iteration {it}: gradient norm {gnorm.item()}, update skipped ({len(skipped)} so far)",
                  file=sys.stderr, flush=True)
            opt.zero_grad(set_to_none=True)
        else:
            opt.step()
        history.append(loss.detach())
        if log_every and ((it + 1) % log_every == 0 or it + 1 == iters):
            el = time.perf_counter() - t0
            recent = torch.stack(history[-log_every:]).mean().item()
            print(f"[{name}] it {it + 1}/{iters}  loss {recent:.3f}  {el / (it + 1) * 1e3:.1f} ms/it  "
                  f"eta {el / (it + 1) * (iters - it - 1):.0f}s", file=sys.stderr, flush=True)
    return [h.item() for h in history]


def cosine_lr(it: int, iters: int, lr: float, lr_final: float) -> float:
    """Learning rate at iteration it: lr at 0, decaying along a half cosine to lr * lr_final."""
    return lr * (lr_final + (1 - lr_final) * 0.5 * (1 + math.cos(math.pi * it / max(iters - 1, 1))))


def check_training_data(data, dx: int, dy: int, like: torch.Tensor, min_points: int) -> Batch:
    """Meta-training tasks: a valid Batch with >= 1 task and >= max(1, min_points) points each."""
    data = check_compatible(data, dx, dy, like, "data")
    if data.x.requires_grad or data.y.requires_grad:
        raise ValueError("data: x or y requires grad; meta-training data must be constants (pass x.detach(), "
                         "y.detach())")
    need = max(1, min_points)
    if data.x.shape[0] == 0 or (data.counts < need).any():
        raise ValueError(f"data: expected at least one task and >= {need} real points per task, got "
                         f"{data.x.shape[0]} tasks with counts {data.counts.tolist()[:8]}")
    return data


def task_minibatch(data: Batch, T: int, gen: torch.Generator) -> Batch:
    """T meta-training tasks drawn without replacement (all of them if there are fewer)."""
    idx = torch.randperm(data.x.shape[0], generator=gen, device=data.x.device)[:T]
    return Batch(data.x[idx], data.y[idx], data.mask[idx])
