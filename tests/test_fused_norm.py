"""Norms that quantize their output for the projections behind them (diffaccel.nn.fused_norm).

Exactness: the codes a fused norm attaches are the ones each projection computes for that output,
so projections on a fused norm's output are bit-identical (torch.equal) to the same projections on
a copy of that output (which carries no codes), torch and Triton backends. Whole patched models
are compared with the attached codes used and ignored (the norms' outputs are the same either way):
torch.equal. The fused norms' own outputs against the originals': fp32 rtol/atol 1e-5 (they round
once where diffusers rounds per operation).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffaccel
from diffaccel.nn import QuantLinear, _codes
from diffaccel.nn import fused_norm as FN
from diffaccel.ops import gemm as G
from diffaccel.ops import layer_norm_quantize, use_backend

import tiny_models

M = G.FUSED_QUANT_MAX_M + 13  # rows: above the threshold where the GEMM quantizes its own rows


class _Counter:
    """Counts the projections that quantized their input themselves (QuantLinear._gemm runs the
    layer's own quantizer; forward_quantized, used with attached codes, does not)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        orig = QuantLinear._gemm

        def counted(layer, *a, **k):
            self.calls += 1
            return orig(layer, *a, **k)

        monkeypatch.setattr(QuantLinear, "_gemm", counted)


def _projections(spec, K=64, Ns=(32, 48, 40), seed=0):
    torch.manual_seed(seed)
    return [QuantLinear.from_float(nn.Linear(K, n), spec) for n in Ns]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("spec", ["w8a8", "w4a8", "fp8"])
def test_layer_norm_codes_feed_projections_exactly(spec, backend, monkeypatch):
    torch.manual_seed(1)
    norm = nn.LayerNorm(128)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    layers = _projections(spec, K=128)  # (w4a8: groups of 128)
    x = torch.randn(2, M, 128) * 3
    act = layers[0].spec.act_dtype
    FN.fuse_norm(norm, act)
    with torch.no_grad(), use_backend(backend):
        y = norm(x)
        assert _codes.attached(y, act) is not None
        torch.testing.assert_close(y, F.layer_norm(x, (128,), norm.weight, norm.bias, norm.eps), rtol=1e-5, atol=1e-5)
        counter = _Counter(monkeypatch)
        with_codes = [layer(y) for layer in layers]
        assert counter.calls == 0  # every projection used the norm's codes
        without = [layer(y.clone()) for layer in layers]
        assert counter.calls == 3
    for a, b in zip(with_codes, without):
        assert torch.equal(a, b)


def test_codes_dropped_when_the_output_changes(monkeypatch):
    norm = FN.fuse_norm(nn.LayerNorm(64), "int8")
    layer = _projections("w8a8")[0]
    with torch.no_grad():
        y = norm(torch.randn(M, 64))
        y.mul_(2.0)  # in place: the version counter moves, the codes are stale
        counter = _Counter(monkeypatch)
        out = layer(y)
        assert counter.calls == 1
        assert torch.equal(out, layer(y.clone()))
        assert _codes.attached(y, "int8") is None
        assert _codes.attached(norm(torch.randn(M, 64)), "fp8_e4m3") is None  # another quantizer's codes


@pytest.mark.parametrize("case", ["few_rows", "inference_mode", "autograd", "compile"])
def test_no_codes_where_they_do_not_apply(case):
    norm = nn.LayerNorm(64)
    ref = copy.deepcopy(norm)
    FN.fuse_norm(norm, "int8")
    x = torch.randn(M if case != "few_rows" else G.FUSED_QUANT_MAX_M, 64)
    if case == "few_rows":
        with torch.no_grad():
            y = norm(x)
    elif case == "inference_mode":
        with torch.inference_mode():
            y = norm(x)
    elif case == "autograd":
        y = norm(x)
        y.sum().backward()  # the original forward, with its backward
        assert norm.weight.grad is not None
    else:
        with torch.no_grad():
            y = torch.compile(norm, fullgraph=True, backend="eager")(x)
    assert "_diffaccel_codes" not in y.__dict__
    with torch.no_grad():
        if case == "autograd":  # the original forward
            assert torch.equal(y, ref(x))
        else:  # the same op without the codes: the same output as with them
            assert torch.equal(y, layer_norm_quantize(x, ref.weight, ref.bias, ref.eps, act_dtype=None)[0])
            assert torch.equal(y, layer_norm_quantize(x, ref.weight, ref.bias, ref.eps)[0])
            torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)


def _adaln(kind, K=32):
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle

    torch.manual_seed(2)
    if kind == "zero":
        return AdaLayerNormZero(K), dict(emb=torch.randn(2, K))
    if kind == "zero_labels":  # DiT: the embedding inside
        return AdaLayerNormZero(K, num_embeddings=10), dict(timestep=torch.tensor([3, 700]),
                                                            class_labels=torch.tensor([1, 4]),
                                                            hidden_dtype=torch.float32)
    if kind == "single":
        return AdaLayerNormZeroSingle(K), dict(emb=torch.randn(2, K))
    return (AdaLayerNormContinuous(K, 16, elementwise_affine=True),  # affine LayerNorm, then modulation
            dict(conditioning_embedding=torch.randn(2, 16)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["zero", "zero_labels", "single", "continuous"])
def test_adaln_matches_diffusers_and_codes_are_exact(kind, backend, monkeypatch):
    norm, kwargs = _adaln(kind)
    if kind == "continuous":
        with torch.no_grad():
            norm.norm.weight.uniform_(0.5, 1.5)
            norm.norm.bias.normal_()
    original = copy.deepcopy(norm)
    FN.fuse_norm(norm, "int8")
    assert isinstance(norm, type(original))
    x = torch.randn(2, M, 32) * 2
    with torch.no_grad(), use_backend(backend):
        out, ref = norm(x, **kwargs), original(x, **kwargs)
        out, ref = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
        torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(out[1:], ref[1:]):  # the gates and the MLP modulation: untouched
            assert torch.equal(a, b)
        layer = _projections("w8a8", K=32)[0]
        counter = _Counter(monkeypatch)
        used = layer(out[0])
        assert counter.calls == 0
        assert torch.equal(used, layer(out[0].clone()))


def test_fuse_and_unfuse_keep_the_module():
    norm, kwargs = _adaln("zero")
    keys = list(norm.state_dict())
    cls = type(norm)
    assert FN.fuse_norm(norm, "fp8_e4m3") is norm and type(norm) is not cls
    assert list(norm.state_dict()) == keys
    FN.unfuse_norm(norm)
    assert type(norm) is cls and not hasattr(norm, FN.CODE_DTYPE_ATTR)
    FN.unfuse_norm(norm)  # a no-op on an unfused norm
    with pytest.raises(ValueError, match="act_dtype: expected one of"):
        FN.fuse_norm(norm, "int4")
    with pytest.raises(ValueError, match="norm: cannot fuse .* RMSNorm"):
        from diffusers.models.normalization import RMSNorm

        FN.fuse_norm(RMSNorm(32, 1e-6), "int8")
    with pytest.raises(ValueError, match=r"normalizes over \(4, 8\)"):
        FN.fuse_norm(nn.LayerNorm((4, 8)), "int8")


def _bigger(name):
    """Tiny models with more than FUSED_QUANT_MAX_M token rows, so the codes apply."""
    m, inputs = tiny_models.FACTORIES[name]()
    if name == "unet_sdxl":  # its first level has no attention: 2 x 64 tokens at the second
        inputs["sample"] = torch.randn(2, 4, 16, 16)
    elif name == "sd3":
        inputs["hidden_states"] = torch.randn(2, 4, 16, 16)  # 2 x 64 tokens
    elif name == "dit":
        inputs["hidden_states"] = torch.randn(2, 4, 16, 16)
    elif name == "flux":
        n = 80
        inputs["hidden_states"] = torch.randn(1, n, 16)
        inputs["img_ids"] = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(10.0),
                                                       indexing="ij"), -1).reshape(-1, 3)
    return m, inputs


def _sample(out):
    return out[0] if isinstance(out, tuple) else out.sample


# (model, preset, number of fused norms the report lists)
MODELS = [("unet_sd15", "w8a8", None), ("unet_sdxl", "fp8", None), ("sd3", "w8a8", 4), ("flux", "fp8", 3),
          ("dit", "w8a8", 2)]


@pytest.mark.parametrize("name,preset,n_fused", MODELS)
def test_patched_models_use_the_codes_bit_exactly(name, preset, n_fused, monkeypatch):
    m, inputs = _bigger(name)
    report = diffaccel.patch(m, quant=preset)
    fused = [r for r in report.replaced if "layer_norm_quantize" in r.after]
    assert fused and all("codes for" in r.after for r in fused)
    if n_fused is not None:
        assert len(fused) == n_fused
    else:  # a UNet: norm1, norm2 and norm3 of every transformer block
        blocks = [n for n, mod in m.named_modules() if type(mod).__name__ == "BasicTransformerBlock"]
        assert len(fused) == 3 * len(blocks)
    hits = []
    real = _codes.attached

    def counting(x, act_dtype):
        got = real(x, act_dtype)
        hits.append(got is not None)
        return got

    with torch.no_grad():
        monkeypatch.setattr(_codes, "attached", counting)
        used = _sample(m(**inputs))
        monkeypatch.setattr(_codes, "attached", lambda x, act_dtype: None)
        ignored = _sample(m(**inputs))
    assert sum(hits) > 0
    assert torch.equal(used, ignored)
    diffaccel.unpatch(m)
    assert not any(isinstance(mod, (FN.FusedLayerNorm, *FN._ADALN.values())) for mod in m.modules())
    assert not any(hasattr(mod, FN.CODE_DTYPE_ATTR) for mod in m.modules())


def test_report_says_why_a_norm_is_not_fused():
    m, _ = tiny_models.unet_sd15()
    report = diffaccel.patch(m, quant="w8a8", exclude=["*attn1.to_k"])
    reasons = {s.name: s.reason for s in report.skipped if "norm not fused" in s.reason}
    assert reasons and all(n.endswith("norm1") for n in reasons)
    assert all("not every projection behind it is a QuantLinear" in r for r in reasons.values())


class _Wrap(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, *a, **k):
        return self.m(*a, **k)


@pytest.mark.parametrize("case,expected", [
    ("chunked", {"norm1": None, "norm2": None, "norm3": "the feed-forward is chunked"}),
    ("ada_norm_single", {"norm1": "norm_type='ada_norm_single'", "norm2": "norm_type='ada_norm_single'"}),
    ("sinusoidal", {"norm1": "positional embeddings are added", "norm2": "positional embeddings are added",
                    "norm3": None}),
])
def test_every_norm_with_quantized_layers_behind_it_is_reported(case, expected):
    """A BasicTransformerBlock's norms that patch left alone by design (chunked feed-forward,
    ada_norm_single, sinusoidal positions) had no entry in the report, replaced or skipped; and
    with sinusoidal positions norm3, whose output goes straight to the feed-forward, was not fused."""
    from diffusers.models.attention import BasicTransformerBlock

    kw = {"ada_norm_single": dict(norm_type="ada_norm_single"),
          "sinusoidal": dict(positional_embeddings="sinusoidal", num_positional_embeddings=128)}.get(case, {})
    torch.manual_seed(0)
    block = BasicTransformerBlock(64, 2, 32, cross_attention_dim=32, **kw).eval()
    if case == "chunked":
        block.set_chunk_feed_forward(16, 1)
    model, plain = _Wrap(block), _Wrap(copy.deepcopy(block))
    report = diffaccel.patch(model, quant="w8a8", solver=False)
    said = {r.name[2:]: None for r in report.replaced if r.name.startswith("m.norm")}
    said.update({s.name[2:]: s.reason for s in report.skipped if s.name.startswith("m.norm")})
    assert set(said) == set(expected)
    for norm, why in expected.items():
        assert (said[norm] is None) if why is None else (why in said[norm]), (norm, said[norm])
    if case == "sinusoidal":  # the norm3 fusion computes what the unfused norm's layers do
        diffaccel.patch(plain, quant="w8a8", solver=False, exclude=("m.norm3",))
        x, c = torch.randn(2, 100, 64), torch.randn(2, 7, 32)
        with torch.no_grad():
            got, want = model(x, encoder_hidden_states=c), plain(x, encoder_hidden_states=c)
        assert float((got - want).norm() / want.norm()) < 1e-6  # (the fused norm is a few ulps off F.layer_norm)
