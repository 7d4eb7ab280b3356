"""A cheap random initialisation for `weights=random` real-size builds (`model.random_init: tiled`).

transformers builds a model and then runs every module's `_init_weights`; for a 7B model on CPU nearly all of that
is drawing ~7e9 normal numbers (about 11 ns each on one core: 80 s). Latency work needs weights of the right scale,
not fresh draws, so inside `tiled_init` each random initialiser of `torch.nn.init` (the ones transformers' guarded
initialisers call) keeps its distribution and its parameters — mean and std, bounds, fans and gain — but reads
its values from one pool of `POOL` draws of that distribution, starting at a random offset and repeated along the
tensor. Everything that is not random (ones for norms, zeros for biases, constants, buffers) is exactly as
transformers sets it. The pool length is a prime, so no row of a matrix repeats another (rows are shifted
windows of the pool). The same seed builds the same weights on any device.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.nn import init as torch_init

POOL = 1_000_003  # a prime: shifted windows, no repeating rows


class _Pools:
    """The seeded draws, and each scaled copy an initialiser asked for (kept twice over, in the tensor's dtype and
    on its device, so any window of `POOL` values is a view)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.normals = torch.randn(POOL, generator=self.generator)
        self.uniforms = torch.rand(POOL, generator=self.generator)
        self._scaled: dict[tuple, torch.Tensor] = {}

    def fill(self, tensor: torch.Tensor, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Write the pool `make()` gives (cached under `key`), from a random offset and repeated, into `tensor`."""
        n = tensor.numel()
        if n == 0:
            return tensor
        cache = (*key, tensor.dtype, tensor.device)
        doubled = self._scaled.get(cache)
        if doubled is None:
            pool = make()
            doubled = self._scaled[cache] = torch.cat([pool, pool]).to(device=tensor.device, dtype=tensor.dtype)
        start = int(torch.randint(POOL, (1,), generator=self.generator))
        window = doubled[start: start + POOL]
        with torch.no_grad():
            if not tensor.is_contiguous():  # not one block of memory: fill a contiguous copy and write it back
                return tensor.copy_(self.fill(torch.empty_like(tensor, memory_format=torch.contiguous_format),
                                              key, make))
            flat = tensor.detach().view(-1)
            whole = n // POOL
            if whole:
                flat[: whole * POOL].view(whole, POOL).copy_(window.expand(whole, POOL))
            if n > whole * POOL:
                flat[whole * POOL:].copy_(window[: n - whole * POOL])
        return tensor

    def normal(self, tensor: torch.Tensor, mean: float, std: float) -> torch.Tensor:
        return self.fill(tensor, ("normal", mean, std), lambda: self.normals * std + mean)

    def uniform(self, tensor: torch.Tensor, a: float, b: float) -> torch.Tensor:
        return self.fill(tensor, ("uniform", a, b), lambda: self.uniforms * (b - a) + a)


def _initialisers(p: _Pools) -> dict[str, Callable[..., torch.Tensor]]:
    """Tiled stand-ins for torch.nn.init's random initialisers, with their signatures and formulas."""
    fans = torch_init._calculate_fan_in_and_fan_out

    def uniform_(tensor, a=0.0, b=1.0, generator=None):
        return p.uniform(tensor, a, b)

    def normal_(tensor, mean=0.0, std=1.0, generator=None):
        return p.normal(tensor, mean, std)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        return p.fill(tensor, ("trunc_normal", mean, std, a, b), lambda: _ORIGINAL["trunc_normal_"](
            torch.empty(POOL), mean=mean, std=std, a=a, b=b, generator=p.generator))

    def xavier_uniform_(tensor, gain=1.0, generator=None):
        fan_in, fan_out = fans(tensor)
        bound = math.sqrt(3.0) * gain * math.sqrt(2.0 / float(fan_in + fan_out))
        return p.uniform(tensor, -bound, bound)

    def xavier_normal_(tensor, gain=1.0, generator=None):
        fan_in, fan_out = fans(tensor)
        return p.normal(tensor, 0.0, gain * math.sqrt(2.0 / float(fan_in + fan_out)))

    def _kaiming_std(tensor, a, mode, nonlinearity):
        return torch_init.calculate_gain(nonlinearity, a) / math.sqrt(torch_init._calculate_correct_fan(tensor, mode))

    def kaiming_uniform_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu", generator=None):
        if 0 in tensor.shape:
            return tensor
        bound = math.sqrt(3.0) * _kaiming_std(tensor, a, mode, nonlinearity)
        return p.uniform(tensor, -bound, bound)

    def kaiming_normal_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu", generator=None):
        if 0 in tensor.shape:
            return tensor
        return p.normal(tensor, 0.0, _kaiming_std(tensor, a, mode, nonlinearity))

    return {"uniform_": uniform_, "normal_": normal_, "trunc_normal_": trunc_normal_,
            "xavier_uniform_": xavier_uniform_, "xavier_normal_": xavier_normal_,
            "kaiming_uniform_": kaiming_uniform_, "kaiming_normal_": kaiming_normal_}


_ORIGINAL = {name: getattr(torch_init, name) for name in
             ("uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_",
              "kaiming_uniform_", "kaiming_normal_")}


@contextmanager
def tiled_init(seed: int) -> Iterator[None]:
    """Inside the block, torch.nn.init's random initialisers (and transformers' record of them) draw from tiled
    pools seeded by `seed`; everything is put back on exit."""
    from transformers import initialization as hf_init

    stand_ins = _initialisers(_Pools(seed))
    modules = [sys.modules[name] for name in hf_init.TORCH_MODULES_TO_PATCH if name in sys.modules]
    saved: list[tuple[object, str, object]] = []
    try:
        for module in modules:
            for name, fn in stand_ins.items():
                if hasattr(module, name):
                    saved.append((module, name, getattr(module, name)))
                    setattr(module, name, fn)
        for name, fn in stand_ins.items():
            saved.append((hf_init.TORCH_INIT_FUNCTIONS, name, hf_init.TORCH_INIT_FUNCTIONS[name]))
            hf_init.TORCH_INIT_FUNCTIONS[name] = fn
        yield
    finally:
        for target, name, original in reversed(saved):
            if isinstance(target, dict):
                target[name] = original
            else:
                setattr(target, name, original)
