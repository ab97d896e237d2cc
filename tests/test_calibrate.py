"""Scale calibration: weights (absmax, MSE, exact recovery of FP8 grids), activation and KV
observers with their hooks, and QAT fake-quant."""

import pytest
import torch
from helpers import randn

from fp8nemo import fp8
from fp8nemo.quant import calibrate
from fp8nemo.quant.calibrate import (
    CLIP_RATIOS,
    TAIL_SIZE,
    Calibrator,
    Observer,
    calibrate_weight,
    group_sum,
    mse_scale,
    quantize_weight,
)
from fp8nemo.quant.qat import QATLinear, convert_qat, fake_quant_fp8, pow2_scale, prepare_qat

E4M3 = torch.float8_e4m3fn
CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3)
FINITE = CODES[~CODES.float().isnan()]


def on_grid(shape, granularity, dtype, gen, codes=FINITE):
    """Random e4m3 codes times a random scale per group, rounded to `dtype` (as a QAT
    checkpoint stores them)."""
    c = codes[torch.randint(0, len(codes), shape, generator=gen)]
    scale = torch.rand(fp8.scale_shape(shape, granularity), generator=gen) * 0.01 + 1e-4
    return fp8.dequantize(c, scale, granularity).to(dtype)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(300, 260), (16, 16), (129, 1000)])
def test_weights_on_an_fp8_grid_convert_exactly(granularity, dtype, shape, gen):
    w = on_grid(shape, granularity, dtype, gen)
    q = calibrate_weight(w, granularity)
    assert q.on_grid and q.method == "grid" and q.grid_fraction == 1.0
    assert torch.equal(fp8.dequantize(q.w_fp8, q.scale, granularity).to(dtype), w)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_grid_of_small_codes_only(granularity, gen):
    """A grid whose largest code is not 448 (here at most 3.0) is found too."""
    small = FINITE[FINITE.float().abs() <= 3.0]
    w = on_grid((200, 256), granularity, torch.bfloat16, gen, small)
    q = calibrate_weight(w, granularity)
    assert q.on_grid and torch.equal(fp8.dequantize(q.w_fp8, q.scale, granularity).bfloat16(), w)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gaussian_weights_are_not_called_qat(granularity, dtype, gen):
    w = randn(256, 384, gen=gen, dtype=dtype, scale=0.02)
    q = calibrate_weight(w, granularity)
    assert not q.on_grid and q.grid_fraction == 0.0 and q.method == "absmax"
    want, want_scale = fp8.quantize(w, granularity)
    assert torch.equal(q.w_fp8.view(torch.uint8), want.view(torch.uint8)) and torch.equal(
        q.scale, want_scale
    )
    assert q.sqnr_db > 30  # e4m3 on Gaussian data: about 31.6 dB


def test_partly_on_a_grid_per_channel(gen):
    w = randn(64, 256, gen=gen, dtype=torch.bfloat16, scale=0.02)
    w[::2] = on_grid((32, 256), "channel", torch.bfloat16, gen)
    q = calibrate_weight(w, "channel")
    assert not q.on_grid and q.grid_fraction == 0.5
    deq = fp8.dequantize(q.w_fp8, q.scale, "channel").bfloat16()
    assert torch.equal(deq[::2], w[::2])


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_mse_clips_exactly_where_it_lowers_the_error(granularity, gen):
    """Per group, the MSE search picks the clipping ratio with the least error (absmax on
    ties). Rows 0-127 lie on the grid of a scale 10% below their absmax / 448, so clipping
    wins there; the rest are Gaussian."""
    small = FINITE[(FINITE.float().abs() >= 1) & (FINITE.float().abs() <= 416)]
    w = randn(256, 256, gen=gen, scale=0.02)
    w[:128] = small[torch.randint(0, len(small), (128, 256), generator=gen)].float() * 1e-4
    w[:128, 0] = 448e-4 / 0.9
    amax = fp8.amax(w, granularity)
    absmax = fp8.scale_from_amax(amax)
    chosen = mse_scale(w, granularity)

    def group_err(scale):
        q, _ = fp8.quantize(w, granularity, scale)
        err = (fp8.dequantize(q, scale, granularity) - w).pow(2)
        return group_sum(err, granularity)

    tried = torch.stack([group_err(fp8.scale_from_amax(amax * r)) for r in (1.0, *CLIP_RATIOS)])
    assert torch.equal(group_err(chosen), tried.min(0).values)
    clipped = chosen < absmax
    assert (chosen <= absmax).all()
    assert (group_err(chosen)[clipped] < group_err(absmax)[clipped]).all()
    assert torch.equal(chosen[~clipped], absmax[~clipped])
    if granularity != "tensor":
        assert clipped[0].all()  # the groups of rows 0-127 (row 0 of the blocks)
    q_mse, q_abs = calibrate_weight(w, granularity, "mse"), calibrate_weight(w, granularity)
    assert q_mse.sqnr_db >= q_abs.sqnr_db


def test_mse_tries_each_ratio_once_and_not_on_a_grid(gen, monkeypatch):
    """26 ratios (1.00 ... 0.50) cost 26 quantization passes; a weight on a grid needs none."""
    passes = []
    quant_error = calibrate._quant_error
    monkeypatch.setattr(calibrate, "_quant_error", lambda *a: passes.append(1) or quant_error(*a))
    calibrate_weight(randn(64, 256, gen=gen, dtype=torch.bfloat16), "channel", "mse")
    assert len(passes) == 26
    passes.clear()
    w = on_grid((64, 256), "channel", torch.bfloat16, gen)
    q = calibrate_weight(w, "channel", "mse")
    assert q.method == "grid" and not passes


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_weights_with_nan_or_inf_are_refused(granularity, bad, gen):
    """One NaN/inf would turn its group's scale (a whole tensor's, per tensor) into NaN/inf."""
    w = randn(130, 200, gen=gen, dtype=torch.bfloat16, scale=0.02)
    i, j = (int(torch.randint(0, n, (1,), generator=gen)) for n in w.shape)
    w[i, j] = bad
    w[i + 1 :, j] = bad  # later ones too: the message names the first
    with pytest.raises(ValueError, match=rf"{130 - i} NaN/inf.* {bad} at index \({i}, {j}\)"):
        calibrate_weight(w, granularity)
    with pytest.raises(ValueError, match=r"w is empty: shape \[0, 16\]"):
        calibrate_weight(torch.zeros(0, 16), granularity)


def _int_dequantized(w, levels, per_row):
    """w rounded to `levels` integer steps per row or per tensor (an int8/int4 checkpoint
    dequantized to bf16): few magnitudes, yet off any FP8 grid."""
    s = (w.abs().amax(1, keepdim=True) if per_row else w.abs().max()) / levels
    return ((w / s).round().clamp(-levels, levels) * s).bfloat16()


@pytest.mark.parametrize(
    "kind, granularity",
    [("int8", "tensor"), ("int8-rows", "channel"), ("int4-rows", "block"), ("dead-row", "tensor")],
)
def test_grid_search_is_cheap_off_the_grid(kind, granularity, gen, monkeypatch):
    """Weights that look like a grid on a few elements (low entropy, or a zero first row) are
    searched on samples: besides one whole pass for code 448 and one to quantize, the 125 other
    codes cost a few elements per group, not a pass each (127 passes before)."""
    w = randn(512, 4096, gen=gen, scale=0.02)
    if kind == "dead-row":
        w[0] = 0
        w = w.bfloat16()
    else:
        w = _int_dequantized(w, 127 if kind.startswith("int8") else 7, kind.endswith("rows"))
    cast = fp8.saturating_cast
    seen = []
    monkeypatch.setattr(fp8, "saturating_cast", lambda x, *a: seen.append(x.numel()) or cast(x, *a))
    q = calibrate_weight(w, granularity)
    assert not q.on_grid and q.method == "absmax"
    assert sum(seen) <= 4 * w.numel()


def _cast_elements(monkeypatch):
    """A list that collects the element count of every saturating cast."""
    cast, seen = fp8.saturating_cast, []
    monkeypatch.setattr(fp8, "saturating_cast", lambda x, *a: seen.append(x.numel()) or cast(x, *a))
    return seen


@pytest.mark.parametrize("top", [448.0, 240.0, 26.0, 7.0, 0.5, 2**-6])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_grids_with_any_top_code_convert_exactly(top, granularity, dtype, gen):
    """The largest code of a group is whatever the grid's scale made it, not only 448."""
    codes = FINITE[FINITE.float().abs() <= top]
    c = codes[torch.randint(0, len(codes), (200, 300), generator=gen)]
    c[:, ::128] = torch.tensor(top).to(E4M3)  # every row and block holds the top code
    scale = torch.rand(fp8.scale_shape(c.shape, granularity), generator=gen) * 0.01 + 1e-4
    w = fp8.dequantize(c, scale, granularity).to(dtype)
    q = calibrate_weight(w, granularity)
    assert q.on_grid and q.method == "grid"
    assert torch.equal(fp8.dequantize(q.w_fp8, q.scale, granularity).to(dtype), w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_blocks_off_the_grid_leave_the_others_exact(dtype, gen):
    w = on_grid((384, 512), "block", dtype, gen)
    off = [(0, 1), (2, 3), (1, 0)]
    for i, j in off:
        w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = randn(128, 128, gen=gen, dtype=dtype)
    q = calibrate_weight(w, "block")
    want = torch.ones(3, 4, dtype=torch.bool)
    for i, j in off:
        want[i, j] = False
    assert not q.on_grid and q.grid_fraction == 9 / 12
    deq = fp8.dequantize(q.w_fp8, q.scale, "block").to(dtype)
    exact = fp8.groups(deq == w, "block").all(-1)
    assert torch.equal(exact, want)
    absmax = fp8.scale_from_amax(fp8.amax(w, "block"))
    assert torch.equal(q.scale[~want], absmax[~want])


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_a_power_of_two_grid_gives_its_scale_exactly(granularity, dtype, gen):
    """Codes times 2^-7 are exact in 16 bits: the scale is 2^-7 itself, not the midpoint of the
    scales that round to the same weights, and the conversion has no error at all."""
    c = FINITE[torch.randint(0, len(FINITE), (256, 384), generator=gen)]
    c[:, ::128] = torch.tensor(448.0).to(E4M3)
    w = (c.float() * 2**-7).to(dtype)
    q = calibrate_weight(w, granularity)
    assert q.on_grid and torch.all(q.scale == 2**-7)
    assert q.max_abs_err == 0.0 and q.sqnr_db == float("inf")


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weights_of_99_percent_zeros_are_cheap_and_right(granularity, dtype, gen, monkeypatch):
    """A few nonzero elements per group: on no grid they get absmax scales after about one
    pass; on a grid they convert exactly."""
    keep = torch.rand(512, 2048, generator=gen) < 0.01
    gauss = randn(512, 2048, gen=gen, dtype=dtype, scale=0.02) * keep
    seen = _cast_elements(monkeypatch)
    q = calibrate_weight(gauss, granularity)
    assert sum(seen) <= 2 * gauss.numel()
    assert not q.on_grid and q.method == "absmax"
    want, want_scale = fp8.quantize(gauss, granularity)
    assert torch.equal(q.w_fp8.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(q.scale, want_scale)
    keep[:, ::128] = True  # no all-zero group
    c = FINITE[torch.randint(0, len(FINITE), keep.shape, generator=gen)].float() * keep
    scale = torch.rand(fp8.scale_shape(keep.shape, granularity), generator=gen) * 0.01 + 1e-4
    grid = fp8.dequantize(c.to(E4M3), scale, granularity).to(dtype)
    q = calibrate_weight(grid, granularity)
    assert q.on_grid
    assert torch.equal(fp8.dequantize(q.w_fp8, q.scale, granularity).to(dtype), grid)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gaussian_weights_cost_about_one_pass(granularity, dtype, gen, monkeypatch):
    """The reject test rejects trained-like weights on a sample: one cast to quantize, a few
    sampled elements per group for the grid search."""
    w = randn(512, 4096, gen=gen, dtype=dtype, scale=0.02)
    seen = _cast_elements(monkeypatch)
    assert not calibrate_weight(w, granularity).on_grid
    assert sum(seen) <= 1.2 * w.numel()


def test_quantize_weight_returns_codes_and_scales(gen):
    w = randn(48, 64, gen=gen, dtype=torch.bfloat16)
    w_fp8, scale = quantize_weight(w, "channel")
    assert w_fp8.dtype == E4M3 and w_fp8.shape == w.shape and scale.shape == (48, 1)
    with pytest.raises(ValueError, match="granularity must be one of"):
        quantize_weight(w, "token")
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_weight(w, "channel", "max")
    with pytest.raises(ValueError, match="2-D float tensor"):
        quantize_weight(w[0], "channel")


# ---- activations and the KV cache ------------------------------------------------------------


def test_absmax_observer_is_amax_over_batches(gen):
    obs = Observer("absmax")
    xs = [randn(8, 32, gen=gen) for _ in range(3)]
    for x in xs:
        obs.update(x)
    amax = torch.stack([x.abs().max() for x in xs]).max()
    assert torch.equal(obs.scale(), fp8.scale_from_amax(amax).reshape(1))


@pytest.mark.parametrize("kind", ["percentile", "mse"])
def test_clipping_observers_clip_only_when_it_lowers_the_error(kind, gen):
    # e4m3's relative precision does not depend on the scale, so clipping pays only when it
    # moves many values onto better codes: here the bulk lies on the grid of a scale 10% below
    # absmax / 448, and one outlier sets the absmax.
    small = FINITE[(FINITE.float().abs() >= 1) & (FINITE.float().abs() <= 416)]
    s_small = 0.009
    x = small[torch.randint(0, len(small), (64, 1024), generator=gen)].float() * s_small
    x[0, 0] = 448 * s_small / 0.9
    obs = Observer(kind, percentile=99.9)
    obs.update(x)
    absmax = fp8.scale_from_amax(x.abs().max()).reshape(1)
    chosen = obs.scale()

    def mse(scale):
        q, _ = fp8.quantize(x, "tensor", scale)
        return (fp8.dequantize(q, scale, "tensor") - x).pow(2).mean()

    assert chosen < absmax and mse(chosen) < mse(absmax)
    # Gaussian data with an outlier: clipping the outlier costs more than it gains, so no clip.
    x = randn(64, 1024, gen=gen)
    x[5, 5] = 40.0
    obs = Observer(kind, percentile=99.0)
    obs.update(x)
    assert torch.equal(obs.scale(), fp8.scale_from_amax(x.abs().max()).reshape(1))
    # Values of one magnitude: absmax is exact, any clip saturates.
    flat = torch.ones(64, 64) * torch.where(randn(64, 64, gen=gen) > 0, 1.0, -1.0)
    obs = Observer(kind, percentile=50.0)
    obs.update(flat)
    assert torch.equal(obs.scale(), fp8.scale_from_amax(torch.tensor(1.0)).reshape(1))


def test_observer_errors():
    with pytest.raises(ValueError, match="observer must be one of"):
        Observer("max")
    with pytest.raises(ValueError, match="saw no data"):
        Observer().scale()
    with pytest.raises(ValueError, match="NaN in layer"):
        Observer().update(torch.tensor([1.0, float("nan")]), "layer")
    for x in (torch.tensor([1.0, float("inf")]), torch.tensor([-float("inf"), 1.0]).half()):
        with pytest.raises(ValueError, match="inf in layer"):
            Observer().update(x, "layer")


@pytest.mark.parametrize("kind", ["percentile", "mse"])
def test_clipping_observers_see_an_outlier_channel(kind, gen):
    """Activations [tokens, 5120] with one outlier channel (x60) at an odd index, in 4 batches:
    a strided sample (step 10 here) never saw it and clipped it. The chosen scale's error on all
    the data is at most absmax's."""
    channel = 7 + 2 * int(torch.randint(0, 2500, (1,), generator=gen))
    batches = [randn(256, 5120, gen=gen) for _ in range(4)]
    for x in batches:
        x[:, channel] *= 60
    obs = Observer(kind)
    for x in batches:
        obs.update(x)
    x = torch.cat(batches)
    absmax = fp8.scale_from_amax(x.abs().max()).reshape(1)

    def error(scale):
        q, _ = fp8.quantize(x, "tensor", scale)
        return (fp8.dequantize(q, scale, "tensor") - x).pow(2).sum()

    assert error(obs.scale()) <= error(absmax)


def test_observer_weighs_every_batch_equally(gen):
    """Each batch keeps as many sampled elements as any other, and the same data gives the
    same sample."""
    batches = [randn(300 + 7 * b, 50, gen=gen).abs() + 10 * b for b in range(11)]
    samples = []
    for _ in range(2):
        obs = Observer("mse", sample_size=4096)
        for x in batches:
            obs.update(x)
        samples.append(torch.cat(obs.samples))
    assert torch.equal(samples[0], samples[1])
    counts = torch.bincount((samples[0] // 10).long())
    assert counts.tolist() == [4096 // 16] * 11


def test_observer_moves_only_small_results_to_the_cpu(gen, monkeypatch):
    """The observers reduce on x's device: nothing the size of x is copied to the host."""
    moved = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: moved.append(t.numel()) or cpu(t))
    x = randn(64, 4096, gen=gen)
    for kind in ("absmax", "percentile", "mse"):
        Observer(kind, sample_size=4096).update(x)
    assert moved and max(moved) <= max(TAIL_SIZE, 4096) < x.numel()


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (
            torch.nn.Linear(16, 8, bias=False) for _ in range(3)
        )
        self.o_proj = torch.nn.Linear(8, 16, bias=False)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.mlp = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.mlp(x + self.attn(x))


@pytest.mark.parametrize("observer", ["absmax", "percentile", "mse"])
def test_calibrator_hooks_linears_and_kv_and_is_deterministic(observer, gen):
    torch.manual_seed(0)
    model = TinyModel()
    batches = [randn(2, 5, 16, gen=gen) for _ in range(4)]
    scales = []
    for _ in range(2):
        calib = Calibrator(model, observer).run(batches)
        scales.append((calib.input_scales(), calib.kv_scales()))
    inputs, kv = scales[0]
    assert set(inputs) == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp"}
    assert set(kv) == {"attn"}
    for name in inputs:
        assert torch.equal(inputs[name], scales[1][0][name])  # same data, same scales
    assert torch.equal(kv["attn"]["k_scale"], scales[1][1]["attn"]["k_scale"])
    if observer == "absmax":
        x_amax = torch.stack([b.abs().max() for b in batches]).max()
        assert torch.equal(inputs["attn.q_proj"], fp8.scale_from_amax(x_amax).reshape(1))
        with torch.no_grad():
            k_amax = torch.stack([model.attn.k_proj(b).abs().max() for b in batches]).max()
        assert torch.equal(kv["attn"]["k_scale"], fp8.scale_from_amax(k_amax).reshape(1))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # hooks gone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kv_scales_are_those_of_the_cache_after_rope(dtype, gen):
    """k_scale covers K as the cache holds it (after RoPE), not k_proj's output."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=50, rope_theta=10000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).to(dtype).eval()
    ids = torch.randint(0, 50, (2, 200), generator=gen)
    kv = Calibrator(model).run([{"input_ids": ids}]).kv_scales()
    k_proj_out = []
    hook = model.model.layers[0].self_attn.k_proj.register_forward_hook(
        lambda mod, args, out: k_proj_out.append(out)
    )
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    hook.remove()
    for i, layer in enumerate(cache.layers):
        scales = kv[f"model.layers.{i}.self_attn"]
        k_amax, v_amax = layer.keys.abs().max().float(), layer.values.abs().max().float()
        assert torch.equal(scales["k_scale"], fp8.scale_from_amax(k_amax).reshape(1))
        assert torch.equal(scales["v_scale"], fp8.scale_from_amax(v_amax).reshape(1))
    pre_rope = fp8.scale_from_amax(k_proj_out[0].abs().max().float()).reshape(1)
    assert not torch.equal(kv["model.layers.0.self_attn"]["k_scale"], pre_rope)


def test_calibrator_filter_and_errors(gen):
    model = TinyModel()
    calib = Calibrator(model, linear_filter=lambda name, _: name.startswith("attn."), kv=False)
    calib.run([randn(1, 3, 16, gen=gen)])
    assert set(calib.input_scales()) == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"}
    assert calib.kv_scales() == {}
    with pytest.raises(ValueError, match="no nn.Linear"):
        Calibrator(torch.nn.ReLU())
    with pytest.raises(ValueError, match="observer must be one of"):
        Calibrator(model, "max")
    with pytest.raises(ValueError, match="never reached attn.q_proj"):
        Calibrator(model).input_scales()


# ---- QAT -------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fake_quant_is_quantize_then_dequantize(granularity, dtype, gen):
    x = randn(7, 33, gen=gen, dtype=dtype, scale=3.0)
    g = "token" if granularity == "row" else "tensor"
    q, s = fp8.quantize(x, g)
    out = fake_quant_fp8(x, granularity)
    assert out.dtype == dtype and torch.equal(out, fp8.dequantize(q, s, g).to(dtype))


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_gradient_is_identity_inside_the_range(granularity, gen):
    x = randn(5, 40, gen=gen).requires_grad_()
    g = randn(5, 40, gen=gen)
    fake_quant_fp8(x, granularity).backward(g)
    assert torch.equal(x.grad, g)


def test_gradient_stops_where_a_static_scale_saturates(gen):
    x = randn(4, 50, gen=gen, scale=3.0).requires_grad_()
    scale = torch.tensor([0.004])  # range +-1.792: some values saturate
    g = randn(4, 50, gen=gen)
    fake_quant_fp8(x, "tensor", scale).backward(g)
    inside = (
        x.detach() / 0.004
    ).abs() <= 464  # up to 464 the cast rounds to 448, beyond it saturates
    assert 0 < inside.sum() < inside.numel()
    assert torch.equal(x.grad, torch.where(inside, g, 0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_prepare_train_convert(dtype, gen):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    model.to(dtype)
    keys = set(model.state_dict())
    prepare_qat(model, input_granularity="row")
    assert all(isinstance(model[i], QATLinear) for i in (0, 2)) and set(model.state_dict()) == keys
    x = randn(16, 32, gen=gen, dtype=dtype)
    want = torch.nn.functional.linear(
        fake_quant_fp8(x, "row"), fake_quant_fp8(model[0].weight, "row"), model[0].bias
    )
    assert torch.equal(model[0](x), want)
    before = model[0].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(model[0].weight, before)
    fake = {i: fake_quant_fp8(model[i].weight.detach(), "row") for i in (0, 2)}
    converted = convert_qat(model)
    assert set(converted) == {"0", "2"}
    for i in (0, 2):
        w_fp8, scale = converted[str(i)]
        assert w_fp8.dtype == E4M3 and scale.shape == (model[i].out_features, 1)
        # What QAT trained: bit for bit in fp32; a 16-bit forward rounded codes * scale to dtype.
        assert torch.equal(fp8.dequantize(w_fp8, scale, "channel").to(dtype), fake[i])
        assert type(model[i]) is torch.nn.Linear


def test_qat_errors():
    with pytest.raises(ValueError, match="found no nn.Linear"):
        prepare_qat(torch.nn.ReLU())
    with pytest.raises(ValueError, match="found no layer prepared"):
        convert_qat(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="granularity must be one of"):
        prepare_qat(torch.nn.Linear(2, 2), weight_granularity="block")


def test_pow2_weight_scales_make_the_fp8_weights_exact_in_16_bits(gen):
    model = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(randn(48, 64, gen=gen, scale=0.05))
    prepare_qat(model, weight_scales="pow2")
    w = model[0].weight.detach().clone()
    amax = w.abs().amax(1, keepdim=True)
    w_fp8, scale = convert_qat(model)["0"]
    # The smallest power of two with amax / scale <= 448: every row's largest code in (224, 448].
    assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))
    top = amax / scale
    assert bool(((top > 224) & (top <= 448)).all())
    values = fp8.dequantize(w_fp8, scale, "channel")
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(values.to(dtype).float(), values)  # exact in 16 bits
    # Rounded to the nearest code: half of e4m3's relative spacing, or of its subnormal step.
    assert bool(((values - w).abs() <= w.abs() * 2.0**-4 + scale * 2.0**-10).all())
    # The edges: an exact power of two stays, the next fp32 value up doubles, NaN stays NaN.
    amax = torch.tensor([448.0, 448.0 * 2**-10, torch.nextafter(torch.tensor(448.0),
                         torch.tensor(1e9)).item(), 0.0, float("nan")])  # fmt: skip
    got = pow2_scale(amax)
    assert got[:3].tolist() == [1.0, 2.0**-10, 2.0] and got[3] > 0 and got[4].isnan()
    with pytest.raises(ValueError, match="weight_scales must be one of"):
        prepare_qat(torch.nn.Linear(2, 2), weight_scales="e8m0")
