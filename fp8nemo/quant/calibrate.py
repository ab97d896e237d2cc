"""FP8 scales from data: weights (absmax, an MSE search over clipping ratios, and exact recovery
for weights that already lie on an FP8 grid), and static activation / KV-cache scales from
calibration batches through forward hooks.

Scales are fp32 dequant multipliers, as everywhere in fp8nemo (`fp8nemo/fp8.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from fp8nemo import fp8
from fp8nemo.utils import progress

WEIGHT_METHODS = ("absmax", "mse")
OBSERVERS = ("absmax", "percentile", "mse")
# Clipping ratios an MSE search tries after absmax (ratio 1), largest first (ties keep the
# larger scale).
CLIP_RATIOS = tuple(round(1.0 - 0.02 * i, 2) for i in range(1, 26))  # 0.98 ... 0.50
# An activation observer measures a scale's error on the TAIL_SIZE largest |x| it saw (exactly:
# they decide what a clip costs) and a random sample of at most SAMPLE_SIZE of the rest.
SAMPLE_SIZE = 1 << 20
TAIL_SIZE = 1 << 14
# The grid search tests every code on the GRID_SAMPLE largest magnitudes of GRID_DRAW random
# elements per scale group before it tries a whole group with a code the sample allows.
GRID_DRAW, GRID_SAMPLE = 1024, 32
# Elements per row chunk of a weight: temporaries stay a few chunks, not a few weights.
CHUNK = 1 << 22


# ---------------------------------------------------------------------------------------------
# weights


@dataclass
class WeightQuant:
    """A quantized weight and how it got there."""

    w_fp8: torch.Tensor
    scale: torch.Tensor
    granularity: str
    method: str  # "grid" when the weight already lay on an FP8 grid, else absmax / mse
    on_grid: bool  # every group was on an FP8 grid: dequantized, it rounds back to w exactly
    grid_fraction: float  # groups found on a grid
    sqnr_db: float  # of the dequantized weight (fp32) against w
    max_abs_err: float


def _quant_error(x, scale, granularity):
    """Per-group squared error of quantizing x with `scale` (dequantized in fp32)."""
    q, _ = fp8.quantize(x, granularity, scale)
    err = (fp8.dequantize(q, scale, granularity) - x.float()).pow(2)
    return group_sum(err, granularity)


def group_sum(t: torch.Tensor, granularity: str) -> torch.Tensor:
    """Sum of `t` over each scale group, shaped like the scales."""
    return fp8.groups(t, granularity).sum(-1)


def mse_scale(x: torch.Tensor, granularity: str, ratios=CLIP_RATIOS) -> torch.Tensor:
    """Per-group scale `r * amax / 448` with the clipping ratio r in 1 or `ratios` that minimizes
    the group's quantization error (the largest ratio on ties)."""
    amax = fp8.amax(x, granularity)
    best_scale = fp8.scale_from_amax(amax)
    best_err = _quant_error(x, best_scale, granularity)
    for r in ratios:
        scale = fp8.scale_from_amax(amax * r)
        err = _quant_error(x, scale, granularity)
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_err = torch.where(better, err, best_err)
    return best_scale


def _groups(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """A 2-D x as [groups, elements]: one row per scale (blocks zero-padded to 128 x 128)."""
    return fp8.groups(x, granularity).flatten(0, -2)


# Positive finite e4m3 values, largest first: the code a group's largest element may carry.
_E4M3_POSITIVE = (
    torch.arange(1, 127, dtype=torch.int32).to(torch.uint8).view(fp8.E4M3).float().flip(0)
)


def _random_indices(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """k of range(n) drawn by a generator seeded with `seed` (same data, same sample), or all
    n shuffled when n <= k. In random order, so every prefix is a random sample too. (A stride
    would alias with the row length and see the same few columns every time.)"""
    gen = torch.Generator().manual_seed(seed)
    if n <= k:
        return torch.randperm(n, generator=gen)
    return torch.randint(n, (k,), generator=gen)


def _row_chunks(w: torch.Tensor, granularity: str):
    """Slices of w's rows, about CHUNK elements each and whole 128-row blocks, with the slice of
    the per-group scales `[groups, 1]` (or `[N/128, K/128]`) that covers them."""
    n, k = w.shape
    rows = max(fp8.BLOCK, CHUNK // max(k, 1) // fp8.BLOCK * fp8.BLOCK)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        if granularity == "tensor":
            groups = slice(0, 1)
        elif granularity == "channel":
            groups = slice(r0, r1)
        else:
            groups = slice(r0 // fp8.BLOCK, math.ceil(r1 / fp8.BLOCK))
        yield slice(r0, r1), groups


def _group_amax(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """fp32 absmax per scale group, shaped like the scales, in row chunks (w's own dtype: a max
    is exact in it)."""
    chunks = _row_chunks(w, granularity)
    parts = [fp8.groups(w[rows].abs(), granularity).amax(-1) for rows, _ in chunks]
    if granularity == "tensor":
        return torch.stack(parts).amax(0).float()
    return torch.cat(parts).float()


def _scale_bounds(x: torch.Tensor, codes: torch.Tensor, work: torch.dtype):
    """Along the last axis, the interval [lo, hi] of scales s with `(codes * s).to(x.dtype) ==
    x`: each element allows s within the reals that round to it (half an ulp each way), and
    together they allow where those meet (lo > hi: nowhere). The bounds are a max and a min
    over the elements, so a subset of them never meets where all of them do not."""
    up = torch.nextafter(x, torch.full_like(x, math.inf)).to(work)
    down = torch.nextafter(x, torch.full_like(x, -math.inf)).to(work)
    xw, c = x.to(work), codes.to(work)
    nonzero = c != 0
    safe_c = torch.where(nonzero, c, 1.0)
    a, b = (xw + down) / 2 / safe_c, (xw + up) / 2 / safe_c
    # A nonzero element on code 0 fits no scale.
    lo = torch.where(nonzero, torch.minimum(a, b), torch.where(xw == 0, -math.inf, math.inf))
    lo = lo.amax(-1)
    hi = torch.where(nonzero, torch.maximum(a, b), math.inf).amin(-1)
    return lo, hi


def _simplest_scale(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Per element, the fp32 in [lo, hi] (positive, float64) with the fewest mantissa bits: a
    power of two where the interval holds one. Where the interval holds no fp32, NaN.
    Positive floats order as their bit patterns do, so this is the number in the integer
    interval [a, b] with the most trailing zero bits: b with every bit below the highest one
    where a and b differ cleared."""
    a, b = lo.float(), hi.float()
    a = torch.where(a.double() < lo, torch.nextafter(a, torch.full_like(a, math.inf)), a)
    b = torch.where(b.double() > hi, torch.nextafter(b, torch.full_like(b, -math.inf)), b)
    ia, ib = a.view(torch.int32).long(), b.view(torch.int32).long()
    diff = (ia ^ ib).double()
    bits = torch.where(diff > 0, diff.log2().floor(), 0).long()
    simplest = (ib >> bits << bits).int().view(torch.float32)
    return torch.where((a <= b) & (a > 0) & torch.isfinite(b), simplest, math.nan)


def _fit_scale(g: torch.Tensor, codes: torch.Tensor):
    """Per row, an fp32 scale s with `(codes * s).to(g.dtype) == g` exactly, if one exists:
    of the scales `_scale_bounds` allows (in fp64, close to exact), the one with the fewest
    mantissa bits (a power-of-two grid comes back as that power of two), else the midpoint;
    verified, as the two roundings (fp32 product, then g.dtype) have the last word.
    Returns (s, ok)."""
    lo, hi = _scale_bounds(g, codes, torch.float64)
    cf = codes.float()
    best = torch.ones(g.shape[0])
    ok = torch.zeros(g.shape[0], dtype=torch.bool)
    for s in (_simplest_scale(lo, hi), ((lo + hi) / 2).float()):
        s = torch.where(torch.isfinite(s) & (s > 0), s, 1.0)
        exact = (lo <= hi) & ~ok & ((cf * s[:, None]).to(g.dtype) == g).all(1)
        best, ok = torch.where(exact, s, best), ok | exact
    return best, ok


def _candidate_codes(sample: torch.Tensor, amax: torch.Tensor, work: torch.dtype):
    """[groups, 126]: whether a grid with the group's amax on code c (each of _E4M3_POSITIVE)
    fits the group's sampled magnitudes `sample` [groups, m], a necessary condition for the
    whole group. The first element or two reject nearly every (group, code) of a weight on no
    grid (each lands within 16-bit rounding of an e4m3 code by chance about 1 time in 16), so
    the rest of the sample is tried on the survivors only."""
    codes = _E4M3_POSITIVE
    alive = torch.ones(sample.shape[0], codes.numel(), dtype=torch.bool)
    lo = torch.zeros(alive.shape, dtype=work)
    hi = torch.full(alive.shape, math.inf, dtype=work)
    x = torch.cat((amax.to(sample.dtype)[:, None], sample), 1)
    start = 0
    for stop in (min(x.shape[1], 2), min(x.shape[1], 6), x.shape[1]):
        if start >= stop:
            break
        gi, ci = alive.nonzero(as_tuple=True)
        part = x[gi, start:stop]  # [pairs, m]
        c = fp8.saturating_cast(part.float() / (amax[gi] / codes[ci])[:, None])
        part_lo, part_hi = _scale_bounds(part, c, work)
        lo[gi, ci] = torch.maximum(lo[gi, ci], part_lo)
        hi[gi, ci] = torch.minimum(hi[gi, ci], part_hi)
        # A little slack: this only filters, and the bounds are rounded in `work`.
        alive &= lo * (1 - 2**-20) <= hi * (1 + 2**-20)
        start = stop
    return alive


def grid_scale(w: torch.Tensor, granularity: str, amax: torch.Tensor | None = None):
    """Recover the FP8 grid a weight lies on, as quantisation-aware training leaves it: per scale
    group, the fp32 scale s with `(codes * s).to(w.dtype) == w` exactly for e4m3 codes.

    Returns (scale, on_grid) shaped like the scales (scale is meaningless off the grid). The
    group's largest element carries the largest code c (448 after QAT with amax scales; any
    code for other grids), so the codes are read off `w / (amax / c)`: 16-bit rounding moves
    the true scale by far less than e4m3's spacing. Every c is tried at once on a random sample
    of each group's nonzero magnitudes (`_candidate_codes`), and the whole group is fitted only
    for the codes its sample allows: a weight on no grid costs a sample, not a pass per code.
    """
    if amax is None:
        amax = _group_amax(w, granularity)
    amax = amax.flatten()
    work = torch.float32 if w.element_size() <= 2 else torch.float64
    # The sample: the GRID_SAMPLE largest magnitudes of GRID_DRAW random elements per group,
    # so that a mostly-zero group still gives nonzero elements to test.
    g = _groups(w, granularity)
    drawn = g[:, _random_indices(g.shape[1], GRID_DRAW)].abs()
    sample = drawn.topk(min(GRID_SAMPLE, drawn.shape[1]), 1, sorted=False).values
    scale = torch.ones(g.shape[0])
    on = amax == 0  # an all-zero group is on every grid: codes 0, any scale
    scale[on] = fp8.scale_from_amax(amax[on])
    live = ~on & (amax > 0)
    alive = torch.zeros(g.shape[0], _E4M3_POSITIVE.numel(), dtype=torch.bool)
    rows = live.nonzero().flatten()
    for part in rows.split(max(1, CHUNK // (GRID_SAMPLE * 32))):
        alive[part] = _candidate_codes(sample[part], amax[part], work)
    for j, c in enumerate(_E4M3_POSITIVE.tolist()):  # largest code first
        rows = (alive[:, j] & ~on).nonzero().flatten()
        if rows.numel() == 0:
            continue
        for part in rows.split(max(1, CHUNK // g.shape[1])):
            sub = g[part]
            codes = fp8.saturating_cast(sub.float() / (amax[part] / c)[:, None])
            s, ok = _fit_scale(sub, codes)
            scale[part[ok]], on[part[ok]] = s[ok], True
    shape = fp8.scale_shape(w.shape, granularity)
    return scale.reshape(shape), on.reshape(shape)


def _check_finite(w: torch.Tensor) -> None:
    finite = torch.isfinite(w)
    first = tuple((~finite).nonzero()[0].tolist())
    raise ValueError(
        f"w holds {int((~finite).sum())} NaN/inf values (an amax over them gives a NaN or "
        f"inf scale); the first is {w[first].item()} at index {first}"
    )


def calibrate_weight(
    w: torch.Tensor, granularity: str = "channel", method: str = "absmax"
) -> WeightQuant:
    """Quantize a 2-D weight `[N, K]` per tensor, output channel or 128x128 block.

    Groups already on an FP8 grid keep their exact scale (the conversion reproduces the
    checkpoint's 16-bit values); the others get `method`'s scale: absmax, or the MSE-optimal
    clipping ratio. Works in row chunks: beside w and its codes, memory holds a few chunks.
    """
    if granularity not in fp8.WEIGHT_GRANULARITIES:
        raise ValueError(
            f"granularity must be one of {fp8.WEIGHT_GRANULARITIES}; got {granularity!r}"
        )
    if method not in WEIGHT_METHODS:
        raise ValueError(f"method must be one of {WEIGHT_METHODS}; got {method!r}")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D float tensor [N, K]; got {getattr(w, 'shape', type(w))}")
    if w.numel() == 0:
        raise ValueError(f"w is empty: shape {list(w.shape)}")
    amax = _group_amax(w, granularity)
    if not torch.isfinite(amax).all():  # NaN propagates through the max, inf is the max
        _check_finite(w)
    grid, on_grid = grid_scale(w, granularity, amax)
    if method == "mse" and not on_grid.all():
        scale = mse_scale(w, granularity)
    else:
        scale = fp8.scale_from_amax(amax)
    scale = torch.where(on_grid, grid, scale)
    # Quantize, and measure the error as the FP8 GEMM sees it (codes times scales in fp32; on a
    # grid that is w's own 16-bit rounding: the dequantized weight rounds back to w exactly).
    w_fp8 = torch.empty(w.shape, dtype=fp8.E4M3)
    noise = signal = max_err = 0.0
    for rows, groups in _row_chunks(w, granularity):
        x = w[rows].float()
        s = fp8.expand_scale(scale[groups], x.shape, granularity)
        q = fp8.saturating_cast(x / s)
        w_fp8[rows] = q
        deq = q.float().mul_(s)
        err = deq.sub_(x)  # exact in fp32 where deq and x are close (Sterbenz)
        lo, hi = err.aminmax()
        max_err = max(max_err, -lo.item(), hi.item())
        noise += err.square_().sum(dtype=torch.float64).item()
        signal += (x * x).sum(dtype=torch.float64).item()  # x may be w itself (fp32)
    sqnr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)
    return WeightQuant(
        w_fp8=w_fp8,
        scale=scale,
        granularity=granularity,
        method="grid" if bool(on_grid.all()) else method,
        on_grid=bool(on_grid.all()),
        grid_fraction=float(on_grid.double().mean()),
        sqnr_db=sqnr,
        max_abs_err=max_err,
    )


def quantize_weight(w: torch.Tensor, granularity: str = "channel", method: str = "absmax"):
    """`(w_fp8, scale)` for a weight `[N, K]`: see `calibrate_weight`."""
    q = calibrate_weight(w, granularity, method)
    return q.w_fp8, q.scale


# ---------------------------------------------------------------------------------------------
# activations and the KV cache


def _sum_error(x: torch.Tensor, scale: torch.Tensor) -> float:
    """Squared error of quantizing `x` with a per-tensor `scale` (saturating), summed."""
    return float(_quant_error(x, scale, "tensor"))


class Observer:
    """What one activation stream looked like over the calibration batches.

    Every observer keeps the running absmax. `scale()` gives absmax / 448 for "absmax";
    "percentile" clips at the largest per-batch percentile and "mse" at the clipping ratio that
    minimizes the quantization error, each only where that lowers the error over all the data
    seen. That error is exact on the TAIL_SIZE largest |x| (which decide what a clip costs) and
    estimated below them from a random sample of |x|: at most SAMPLE_SIZE values, as many from
    each batch, drawn with a fixed seed per batch so that the same data gives the same scales.
    """

    def __init__(
        self, kind: str = "absmax", percentile: float = 99.99, sample_size: int = SAMPLE_SIZE
    ):
        if kind not in OBSERVERS:
            raise ValueError(f"observer must be one of {OBSERVERS}; got {kind!r}")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100]; got {percentile}")
        self.kind, self.percentile, self.sample_size = kind, percentile, sample_size
        self.amax = torch.zeros(())
        self.clip = torch.zeros(())  # the largest per-batch percentile of |x|
        self.tail = torch.zeros(0)  # the TAIL_SIZE largest |x| seen, descending
        self.samples: list[torch.Tensor] = []  # of |x|, one per batch, in random order
        self.seen = 0  # elements
        self.batches = 0

    def update(self, x: torch.Tensor, name: str = "activation") -> None:
        # Reduce on x's device: only scalars, the tail and the sample go to the CPU.
        a = x.detach().flatten().abs()
        if a.numel() == 0:
            return
        amax = a.max().float().cpu()
        if not amax.isfinite():
            raise ValueError(f"calibration saw {'NaN' if amax.isnan() else 'inf'} in {name}")
        self.amax = torch.maximum(self.amax, amax)
        self.batches += 1
        self.seen += a.numel()
        if self.kind == "absmax":
            return
        a = a.float()
        if self.kind == "percentile":
            k = max(1, math.ceil(self.percentile / 100 * a.numel()))
            self.clip = torch.maximum(self.clip, a.kthvalue(k).values.cpu())
        tail = torch.cat((self.tail, a.topk(min(TAIL_SIZE, a.numel())).values.cpu()))
        self.tail = tail.topk(min(TAIL_SIZE, tail.numel())).values
        # Batch b keeps sample_size / 2^ceil(log2 b) elements, and the earlier ones are cut to
        # as many (a prefix of a random order is a random sample): every batch weighs the same.
        quota = max(1, self.sample_size >> (self.batches - 1).bit_length())
        self.samples = [s[:quota].clone() if s.numel() > quota else s for s in self.samples]
        idx = _random_indices(a.numel(), quota, seed=self.batches).to(a.device)
        self.samples.append(a[idx].cpu())

    def scale(self) -> torch.Tensor:
        """fp32 `[1]` dequant scale."""
        if self.batches == 0:
            raise ValueError("the observer saw no data: run calibration batches first")
        full = fp8.scale_from_amax(self.amax).reshape(1)
        if self.kind == "absmax":
            return full
        # The error over all data seen: exact on the tail, estimated from the sample below it.
        body = torch.cat(self.samples)
        body = body[body <= self.tail[-1]]
        weight = (self.seen - self.tail.numel()) / max(1, body.numel())

        def error(scale):
            return _sum_error(self.tail, scale) + weight * _sum_error(body, scale)

        best, best_err = full, error(full)
        if self.kind == "percentile":
            candidates = [fp8.scale_from_amax(self.clip).reshape(1)]
        else:
            candidates = [fp8.scale_from_amax(self.amax * r).reshape(1) for r in CLIP_RATIOS]
        for scale in candidates:
            err = error(scale)
            if err < best_err:
                best, best_err = scale, err
        return best


@dataclass
class Calibrator:
    """Static FP8 scales for a model's linear inputs and its KV cache, from calibration batches.

    Forward pre-hooks observe every `nn.Linear`'s input (names filtered by `linear_filter`)
    and K and V as the cache holds them, so K after RoPE (which can grow an element by up to
    sqrt(2)): in fp8nemo's reference model at each attention's `kv_tap`; in an HF model from
    the outputs of `k_proj` and `v_proj`, rotated with the `position_embeddings=(cos, sin)`
    the attention module is called with:

        calib = Calibrator(model, observer="mse")
        calib.run(batches)
        calib.input_scales()  # {"model.layers.0.self_attn.q_proj": tensor([s]), ...}
        calib.kv_scales()     # {"model.layers.0.self_attn": {"k_scale": ..., "v_scale": ...}}
    """

    model: torch.nn.Module
    observer: str = "absmax"
    percentile: float = 99.99
    linear_filter: Callable[[str, torch.nn.Module], bool] | None = None
    kv: bool = True
    inputs: dict[str, Observer] = field(init=False, default_factory=dict)
    keys: dict[str, Observer] = field(init=False, default_factory=dict)
    values: dict[str, Observer] = field(init=False, default_factory=dict)

    def __post_init__(self):
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {OBSERVERS}; got {self.observer!r}")
        if not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(self.model).__name__}")
        new = lambda: Observer(self.observer, self.percentile)  # noqa: E731
        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.Linear) and (
                self.linear_filter is None or self.linear_filter(name, module)
            ):
                self.inputs[name] = new()
            if self.kv and hasattr(module, "k_proj") and hasattr(module, "v_proj"):
                self.keys[name], self.values[name] = new(), new()
        if not self.inputs and not self.keys:
            raise ValueError(
                "the model has no nn.Linear or attention module (k_proj/v_proj) to observe"
            )

    def _hooks(self):
        handles = []
        modules = dict(self.model.named_modules())
        for name, obs in self.inputs.items():
            hook = lambda mod, args, obs=obs, name=name: obs.update(args[0], name)  # noqa: E731
            handles.append(modules[name].register_forward_pre_hook(hook))
        for name in self.keys:
            handles += self._kv_hooks(name, modules[name])
        return handles

    def _kv_hooks(self, name: str, attn: torch.nn.Module) -> list:
        if hasattr(attn, "kv_tap"):  # fp8nemo's model: K after RoPE and V, as cached

            def observe(mod, args):
                self.keys[name].update(args[0], f"{name}.k_proj")
                self.values[name].update(args[1], f"{name}.v_proj")

            return [attn.kv_tap.register_forward_pre_hook(observe)]
        call = {}  # this forward's (cos, sin), when the module is called with them
        head_dim = getattr(attn, "head_dim", None)

        def remember(mod, args, kwargs):
            call["rope"] = _rope_of(args, kwargs)

        def observe_k(mod, args, out):
            self.keys[name].update(_rotate(out, call.get("rope"), head_dim), f"{name}.k_proj")

        def observe_v(mod, args, out):
            self.values[name].update(out, f"{name}.v_proj")

        return [
            attn.register_forward_pre_hook(remember, with_kwargs=True),
            attn.k_proj.register_forward_hook(observe_k),
            attn.v_proj.register_forward_hook(observe_v),
        ]

    def run(self, batches: Iterable, forward: Callable | None = None) -> Calibrator:
        """Run `forward(model, batch)` (default: `model(**batch)` for a dict, else
        `model(batch)`) over `batches` with the hooks on, in eval mode without gradients."""
        handles = self._hooks()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in progress(batches, "calibrate", "batch"):
                    if forward is not None:
                        forward(self.model, batch)
                    elif isinstance(batch, dict):
                        self.model(**batch)
                    else:
                        self.model(batch)
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        return self

    def input_scales(self) -> dict[str, torch.Tensor]:
        """{linear module name: fp32 [1] static input scale}."""
        return {name: _scale(obs, name) for name, obs in self.inputs.items()}

    def kv_scales(self) -> dict[str, dict[str, torch.Tensor]]:
        """{attention module name: {"k_scale": fp32 [1], "v_scale": fp32 [1]}}."""
        return {
            name: {
                "k_scale": _scale(self.keys[name], f"{name}.k_proj"),
                "v_scale": _scale(self.values[name], f"{name}.v_proj"),
            }
            for name in self.keys
        }


def _scale(obs: Observer, name: str) -> torch.Tensor:
    if obs.batches == 0:
        raise ValueError(f"calibration never reached {name}: no scale for it")
    return obs.scale()


def _rope_of(args: tuple, kwargs: dict):
    """The (cos, sin) an HF attention module is called with, or None."""
    rope = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
    ok = isinstance(rope, tuple) and len(rope) == 2 and all(torch.is_tensor(t) for t in rope)
    return rope if ok else None


def _rotate(k: torch.Tensor, rope, head_dim: int | None) -> torch.Tensor:
    """k_proj's output `[B, S, Hk*D]` rotated as HF applies RoPE (rotate-half on the first
    cos.shape[-1] dims of each head, in k's dtype), so it is the K the cache holds."""
    if rope is None:
        return k
    cos, sin = rope
    rot = cos.shape[-1]
    d = head_dim or rot
    k = k.unflatten(-1, (-1, d))  # [B, S, Hk, D]
    cos, sin = cos.unsqueeze(-2).to(k.dtype), sin.unsqueeze(-2).to(k.dtype)
    x, rest = k[..., :rot], k[..., rot:]
    half = torch.cat((-x[..., rot // 2 :], x[..., : rot // 2]), dim=-1)
    return torch.cat(((x * cos) + (half * sin), rest), dim=-1)
