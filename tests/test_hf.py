"""fp8nemo as a backend for HF transformers models: `quantize_` / `unquantize_` on small random
Mistral and Llama models, and the "fp8nemo" attention against transformers' "sdpa"."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import assert_codes_equal, fp8_floor_db, sqnr_db
from models import CONFIGS, hf_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

import fp8nemo
from fp8nemo import hf
from fp8nemo.model import FP8Linear

LAYERS = 3


@pytest.fixture(scope="module")
def models():
    return {name: hf_model(name) for name in CONFIGS}


def ids_for(gen, batch=2, seq=40, vocab=320, device="cpu"):
    return torch.randint(0, vocab, (batch, seq), generator=gen).to(device)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits.float()


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, FP8Linear))}


# ---------------------------------------------------------------------------------------------
# quantize_


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("weights", ["channel", "block"])
def test_quantize_logits_within_the_fp8_floor(name, weights, models, gen, device):
    model = copy.deepcopy(models[name]).to(device)
    ids = ids_for(gen, device=device)
    ref = logits(model, ids)
    report = hf.quantize_(model, hf.FP8Config(weights=weights))
    assert set(report.skipped) == {"lm_head"}
    assert len(report.quantized) == 7 * LAYERS
    for n in report.quantized:
        m = model.get_submodule(n)
        assert isinstance(m, FP8Linear) and m.scheme.weights == weights
        assert m.out_dtype == torch.float32  # the model's own dtype
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    assert sqnr_db(out, ref) > fp8_floor_db(LAYERS), f"{sqnr_db(out, ref):.1f} dB"


class Odd(nn.Linear):
    pass


class Toy(nn.Module):
    """Linears the kernels take and ones they do not."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 48, bias=True)
        self.narrow = nn.Linear(48, 20)  # K = 48 is fine, N = 20 too
        self.odd_k = nn.Linear(20, 32)  # K = 20: not a multiple of 16
        self.sub = Odd(32, 32)
        self.kept = nn.Linear(32, 32)
        self.fp16 = nn.Linear(32, 32).to(torch.float16)
        self.emb = nn.Embedding(10, 32)
        self.lm_head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.odd_k(self.narrow(self.up(x)))
        x = self.kept(self.sub(x)) + self.fp16(x.half()).float()
        return self.lm_head(x)


def test_skip_report_names_each_layer_kept_and_why(gen):
    model = Toy()
    report = hf.quantize_(model, filter_fn=lambda module, name: name != "kept")
    assert sorted(report.quantized) == ["fp16", "narrow", "up"]
    assert set(report.skipped) == {"odd_k", "sub", "kept", "lm_head"}
    assert "no multiple of 16" in report.skipped["odd_k"] and "20" in report.skipped["odd_k"]
    assert "Odd subclasses nn.Linear" in report.skipped["sub"]
    assert "filter_fn" in report.skipped["kept"]
    assert "output head" in report.skipped["lm_head"]
    assert "kept odd_k" in str(report)
    assert model.fp16.out_dtype == torch.float16 and model.up.bias is not None
    x = torch.randn(5, 7, 32, generator=gen)
    assert model(x).shape == (5, 7, 10)  # [..., K] inputs keep their leading dims


def test_quantize_refuses_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        hf.quantize_("model")
    with pytest.raises(TypeError, match="config must be a fp8nemo.hf.FP8Config"):
        hf.quantize_(Toy(), {"weights": "channel"})
    with pytest.raises(ValueError, match="weights must be one of"):
        hf.FP8Config(weights="row")
    with pytest.raises(ValueError, match="method must be one of"):
        hf.FP8Config(method="gptq")
    with pytest.raises(ValueError, match="block weights take dynamic"):
        hf.FP8Config(weights="block", activations="static")
    with pytest.raises(ValueError, match="static activations need calibration"):
        hf.quantize_(Toy(), hf.FP8Config(activations="static"))
    with pytest.raises(ValueError, match="calibration batches are for static"):
        hf.quantize_(Toy(), calibration=[torch.zeros(1, 32)])
    with torch.device("meta"):
        meta = Toy()
    report = hf.quantize_(meta)
    assert not report.quantized and "meta device" in report.skipped["up"]


def test_unquantize_round_trip_is_exact(models, gen, device):
    model = copy.deepcopy(models["nemo"]).to(device)
    hf.quantize_(model)
    codes = {n: (m.weight.clone(), m.weight_scale.clone(), m.dequantize())
             for n, m in linears(model).items() if isinstance(m, FP8Linear)}  # fmt: skip
    ids = ids_for(gen, device=device)
    fp8_logits = logits(model, ids)
    assert sorted(hf.unquantize_(model)) == sorted(codes)
    for n, m in linears(model).items():
        assert type(m) is nn.Linear and m.weight.dtype == torch.float32
        if n in codes:
            assert torch.equal(m.weight, codes[n][2]), n
    # The dequantized weights lie on the FP8 grid: quantizing them again gives the same codes.
    hf.quantize_(model)
    for n, (w, s, _) in codes.items():
        assert_codes_equal(model.get_submodule(n).weight, w, n)
        assert torch.equal(model.get_submodule(n).weight_scale, s), n
    assert torch.equal(logits(model, ids), fp8_logits)
    with pytest.raises(TypeError, match="fp8nemo's own model"):
        from fp8nemo.model import build_model, preset

        hf.unquantize_(build_model(preset("tiny"), "reference", device="meta"))


def test_state_dict_round_trip(models, gen, device):
    model = copy.deepcopy(models["llama"]).to(device)
    hf.quantize_(model, hf.FP8Config(weights="tensor"))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    other = hf_model("llama", seed=1).to(
        device
    )  # other weights: everything must come from the file
    hf.quantize_(other, hf.FP8Config(weights="tensor"))
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    ids = ids_for(gen, device=device)
    assert torch.equal(logits(other, ids), logits(model, ids))


def test_static_activations_calibrate_each_linear(models, gen, device):
    model = copy.deepcopy(models["nemo"]).to(device)
    ids = ids_for(gen, device=device)
    ref = logits(model, ids)
    calib = [ids_for(gen, batch=2, seq=24, device=device) for _ in range(2)]
    seen = {}
    handles = [m.register_forward_pre_hook(
        lambda mod, args, n=n: seen.__setitem__(n, max(seen.get(n, 0.0), args[0].abs().max().item()))
    ) for n, m in linears(model).items()]  # fmt: skip
    with torch.no_grad():
        for batch in calib:
            model(batch)
    for h in handles:
        h.remove()
    report = hf.quantize_(model, hf.FP8Config(activations="static"), calibration=calib)
    for n in report.quantized:
        scale = model.get_submodule(n).input_scale
        torch.testing.assert_close(scale.cpu(), torch.tensor([seen[n] / 448]), rtol=1e-6, atol=0)
    assert sqnr_db(logits(model, ids), ref) > fp8_floor_db(LAYERS)


def test_generate_on_a_quantized_model_follows_its_own_greedy_argmax(models, gen, device):
    """HF's cached generate on FP8 linears picks, at every step, the argmax of a full forward
    of the sequence so far: the cached path computes what the uncached one does."""
    model = copy.deepcopy(models["nemo"]).to(device, torch.bfloat16)
    model.set_attn_implementation("fp8nemo")
    hf.quantize_(model)
    prompt = ids_for(gen, batch=1, seq=8, device=device)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert out.shape == (1, 11)
    full = logits(model, out[:, :-1])
    for t in range(8, 11):
        step = full[0, t - 1]
        top2 = step.topk(2).values
        # a near tie may flip between the cached and the full forward; anything else may not
        assert out[0, t] == step.argmax() or top2[0] - top2[1] < 0.05 * top2[0].abs(), t


def test_compiled_quantized_block_matches_eager_and_opcheck_passes(models, gen, device):
    model = copy.deepcopy(models["mistral"]).to(device, torch.bfloat16)
    model.set_attn_implementation("fp8nemo")
    hf.quantize_(model)
    layer = model.model.layers[0]
    x = torch.randn(1, 24, 128, generator=gen).to(device, torch.bfloat16)
    pos = torch.arange(24, device=device)[None]
    rope = model.model.rotary_emb(x, pos)

    class Record(TorchDispatchMode):
        calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "fp8nemo":
                self.calls.append((func, args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        eager = layer(x, attention_mask=None, position_embeddings=rope)
    ops = {func.__name__ for func, _, _ in Record.calls}
    assert {"quantize_fp8.default", "fp8_gemm.default", "flash_attention.default"} <= ops
    # test_schema compares inputs with torch.allclose, which CPU float8 lacks (see test_ops).
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for func, args, kwargs in {c[0]: c for c in Record.calls}.values():
        torch.library.opcheck(func, args, kwargs, test_utils=utils)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(x, attention_mask=None, position_embeddings=rope)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# the "fp8nemo" attention


def attention_models(models, name, device):
    """The fp32 sdpa model (the reference) and bf16 copies on sdpa and on fp8nemo."""
    ref = copy.deepcopy(models[name]).to(device)
    ref.set_attn_implementation("sdpa")
    sdpa = copy.deepcopy(ref).to(torch.bfloat16)
    ours = copy.deepcopy(sdpa)
    ours.set_attn_implementation("fp8nemo")
    return ref, sdpa, ours


def cached_run(model, ids, prefill, mask=None):
    """Logits of ids [B, S] as a cached generation makes them: a prefill of `prefill` tokens,
    one appended chunk of 4, then single-token decode steps."""
    out = []
    cache = None
    cuts = [0, prefill, prefill + 4, *range(prefill + 5, ids.shape[1] + 1)]
    with torch.no_grad():
        for a, b in zip(cuts[:-1], cuts[1:], strict=False):
            kwargs = {} if mask is None else {"attention_mask": mask[:, :b]}
            step = model(ids[:, a:b], cache=cache, use_cache=True, **kwargs)
            cache = step.past_key_values
            out.append(step.logits.float())
    return torch.cat(out, dim=1)


def assert_flash_rule(ours, sdpa, ref, what, valid=None):
    """flash-attn's rule: our error against the fp32 reference at most twice the error of
    transformers' sdpa in the same precision, plus twice the reference's own round-off."""
    if valid is not None:
        ours, sdpa, ref = ours[valid], sdpa[valid], ref[valid]
    ours_err = (ours - ref).abs().max().item()
    sdpa_err = (sdpa - ref).abs().max().item()
    roundoff = 2 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    assert ours_err <= 2 * sdpa_err + roundoff, f"{what}: {ours_err:.3g} > 2 x {sdpa_err:.3g}"


@pytest.mark.parametrize("name", ["nemo", "mistral"])  # mistral: window 40 < 56 tokens
def test_attention_matches_sdpa_on_prefill_and_cached_decode(name, models, gen, device):
    ref, sdpa, ours = attention_models(models, name, device)
    ids = ids_for(gen, batch=2, seq=56, device=device)
    args = (ids, 44)
    assert_flash_rule(logits(ours, ids), logits(sdpa, ids), logits(ref, ids), f"{name} prefill")
    assert_flash_rule(cached_run(ours, *args), cached_run(sdpa, *args), cached_run(ref, *args),
                      f"{name} cached")  # fmt: skip


def test_attention_with_left_padding(models, gen, device):
    """A left-padded batch, as generate pads it: prefill packed over the valid tokens, then
    decode with the valid keys gathered; compared where the tokens are real."""
    ref, sdpa, ours = attention_models(models, "nemo", device)
    ids = ids_for(gen, batch=3, seq=30, device=device)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[2, :1] = 0
    runs = [cached_run(m, ids, 20, mask) for m in (ours, sdpa, ref)]
    assert_flash_rule(*runs, "left-padded", valid=mask.bool())


def test_attention_refuses_what_it_does_not_implement(models, gen):
    model = copy.deepcopy(models["nemo"])
    model.set_attn_implementation("fp8nemo")
    ids = ids_for(gen, batch=1, seq=8)
    with pytest.raises(TypeError, match="runs float16/bfloat16.*float32"):
        logits(model, ids)
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 8, 4, 32).to(torch.bfloat16)
    k = torch.randn(1, 2, 4, 32).to(torch.bfloat16)
    with pytest.raises(ValueError, match="2-D padding mask"):
        hf.attention(attn, q, k, k, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout must be 0"):
        hf.attention(attn, q, k, k, None, dropout=0.1)
    with pytest.raises(ValueError, match="softcap"):
        hf.attention(attn, q, k, k, None, softcap=30.0)
    with pytest.raises(ValueError, match="S <= Skv"):
        hf.attention(attn, q, k[:, :, :2], k[:, :, :2], None)


def test_top_level_names_are_the_hf_ones():
    assert fp8nemo.quantize_ is hf.quantize_ and fp8nemo.unquantize_ is hf.unquantize_
    assert fp8nemo.FP8Config is hf.FP8Config
    with pytest.raises(AttributeError, match="no_such_name"):
        fp8nemo.no_such_name  # noqa: B018
