"""QuantSpec, QuantLinear and QuantConv2d: built from real diffusers layers, memory measured,
outputs equal to the ops' integer reference (and the Triton backend bit for bit), per-timestep
activation sets, SmoothQuant folding, safetensors round trip, device/dtype moves, errors."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from diffaccel.nn import QuantConv2d, QuantLinear, quantize_module, quantize_reason
from diffaccel.ops import gemm as G
from diffaccel.ops import use_backend
from diffaccel.quant import QuantSpec, resolve_spec
from diffaccel.quant import formats as fmt


class Step:
    def __init__(self, i):
        self.index = torch.tensor(i, dtype=torch.int64)


# -- QuantSpec -----------------------------------------------------------------------------------

def test_presets_and_round_trip():
    assert QuantSpec.preset("w8a8") == QuantSpec("int8", None, "int8", "dynamic", True)
    assert QuantSpec.preset("fp8") == QuantSpec("fp8_e4m3", None, "fp8_e4m3", "dynamic", True)
    assert QuantSpec.preset("w4a8") == QuantSpec("int4", 128, "int8", "dynamic", True)
    assert QuantSpec.preset("w4a16") == QuantSpec("int4", 128, None)
    for name in ("w8a8", "fp8", "w4a8", "w4a16"):
        s = resolve_spec(name)
        assert QuantSpec.from_dict(s.to_dict()) == s and resolve_spec(s) is s
    assert QuantSpec.preset("w4a8").weight_bits == 4 and QuantSpec.preset("w4a16").act_bits == 16


@pytest.mark.parametrize("kwargs,field", [
    (dict(weight_dtype="int3"), "weight_dtype"), (dict(weight_group_size=48), "weight_group_size"),
    (dict(act_dtype="int4"), "act_dtype"), (dict(act_mode="per_channel"), "act_mode"),
    (dict(act_symmetric=False), "act_symmetric"), (dict(weight_dtype="fp8_e4m3", weight_group_size=64,
                                                        act_dtype="fp8_e4m3"), "weight_group_size"),
    (dict(weight_dtype="fp4_e2m1", weight_group_size=64, act_dtype=None), "weight_group_size"),
    (dict(weight_dtype="int8", act_dtype="fp8_e4m3"), "act_dtype"),
])
def test_spec_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantSpec(**kwargs)


def test_resolve_unknown():
    with pytest.raises(ValueError, match="unknown preset 'w3a8'"):
        resolve_spec("w3a8")
    with pytest.raises(TypeError, match="spec"):
        resolve_spec(8)


# -- real diffusers layers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(128, 256),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=32, norm_num_groups=32).eval()


def _pick_layers(unet):
    named = dict(unet.named_modules())
    picked = {}
    for name, mod in named.items():
        if name.endswith(("resnets.0.conv1", "resnets.0.conv2", "conv_shortcut")) and isinstance(mod, nn.Conv2d):
            picked[name] = mod
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_k", "attn1.to_out.0", "ff.net.0.proj",
                          "ff.net.2", "proj_in", "time_emb_proj")):
            picked[name] = mod
    assert any("conv" in n for n in picked) and any("to_q" in n for n in picked) and any("ff.net" in n for n in picked)
    return picked


def _input_for(mod, g):
    if isinstance(mod, nn.Conv2d):
        return torch.randn(2, mod.in_channels, 8, 8, generator=g)
    return torch.randn(2, 77, mod.in_features, generator=g)


@pytest.mark.parametrize("preset,limit", [("w8a8", 0.55), ("w4a8", 0.33)])
def test_memory_and_accuracy_on_diffusers_layers(tiny_unet, preset, limit):
    layers = _pick_layers(tiny_unet)
    g = torch.Generator().manual_seed(1)
    fp16_bytes = quant_bytes = 0
    for name, mod in layers.items():
        assert quantize_reason(mod, preset) is None, name
        q = quantize_module(mod, preset)
        assert isinstance(q, QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear)
        assert not any(True for _ in q.parameters())  # fp weights freed: only packed buffers
        fp16_bytes += mod.weight.numel() * 2
        quant_bytes += q.weight_bytes()
        x = _input_for(mod, g)
        with torch.no_grad():
            ref = mod(x)
            out = q(x)
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < (0.02 if preset == "w8a8" else 0.2), (name, rel)
    ratio = quant_bytes / fp16_bytes
    print(f"{preset}: {quant_bytes} B vs fp16 {fp16_bytes} B = {ratio:.3f}x over {len(layers)} layers")
    assert ratio <= limit


def test_whole_unet_quantized_runs(tiny_unet):
    import copy

    unet = copy.deepcopy(tiny_unet)
    replaced, skipped = 0, {}
    for name, mod in list(unet.named_modules()):
        for cname, child in list(mod.named_children()):
            why = quantize_reason(child, "w8a8")
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                if why is None:
                    setattr(mod, cname, quantize_module(child, "w8a8"))
                    replaced += 1
                else:
                    skipped[f"{name}.{cname}"] = why
    g = torch.Generator().manual_seed(2)
    sample, ehs = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 128, generator=g)
    with torch.no_grad():
        ref = tiny_unet(sample, 10, encoder_hidden_states=ehs).sample
        out = unet(sample, 10, encoder_hidden_states=ehs).sample
    assert replaced > 20
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


# -- numerics of the layers ------------------------------------------------------------------

def test_linear_forward_is_the_op_reference_and_triton_matches():
    torch.manual_seed(3)
    lin = nn.Linear(96, 45).half()
    q = QuantLinear.from_float(lin, "w8a8")
    x = torch.randn(77, 96).half()
    ref = G.int8_linear_reference(x, q.weight_q, q.weight_scale, None, None, None, None, q.bias, 0, False,
                                  torch.float16)
    assert torch.equal(q(x), ref)
    with use_backend("triton"):
        assert torch.equal(q(x), ref)
    assert q(x).dtype == torch.float16 and q.original_dtype == torch.float16


@pytest.mark.parametrize("spec", [QuantSpec("int8", None, "int8", "static", False),
                                  QuantSpec("int4", 16, "int8", "static", False)])
def test_conv_split_static_per_timestep(spec):
    torch.manual_seed(4)
    conv = nn.Conv2d(32, 24, 3, padding=1)
    scales = torch.tensor([[0.05, 0.02], [0.08, 0.03]])
    zps = torch.tensor([[3, -4], [0, 7]], dtype=torch.int32)
    q = QuantConv2d.from_float(conv, spec, act_scale=scales, act_zero_point=zps, act_split=16)
    x = torch.randn(2, 32, 5, 5)
    with pytest.raises(RuntimeError, match="step_state"):
        q(x)
    outs = []
    for t in (0, 1):
        q.step_state = Step(t)
        y = q(x)
        with use_backend("triton"):
            assert torch.equal(q(x), y)
        # same as quantizing the two channel ranges by hand with this timestep's parameters
        cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 32 * 9)
        w = q.weight_q
        k1 = 16 * 9
        parts = []
        for p, (ks, ws) in enumerate(((slice(0, k1), slice(0, k1 // (2 if spec.weight_dtype == "int4" else 1))),
                                      (slice(k1, None), slice(k1 // (2 if spec.weight_dtype == "int4" else 1), None)))):
            gsz = spec.weight_group_size
            w_scale = q.weight_scale if gsz is None else q.weight_scale[:, (slice(0, k1 // gsz) if p == 0
                                                                            else slice(k1 // gsz, None))]
            codes = fmt.unpack_int4(w) if spec.weight_dtype == "int4" else w
            codes = codes[:, ks]
            w_sum = codes.to(torch.int32).reshape(24, -1, gsz or codes.shape[1]).sum(-1, dtype=torch.int32)
            parts.append(G.int8_linear_reference(
                cols[:, ks], w[:, ws], w_scale.contiguous(), None, scales[t, p].reshape(1), zps[t, p].reshape(1),
                w_sum if gsz else w_sum[:, 0], q.bias if p == 1 else None, gsz or 0,
                spec.weight_dtype == "int4", torch.float32))
        exp = (parts[0] + parts[1]).reshape(2, 25, 24).transpose(1, 2).reshape(2, 24, 5, 5)
        assert torch.equal(y, exp)
        assert ((y - conv(x)).norm() / conv(x).norm()) < 0.15
        outs.append(y)
    assert not torch.equal(outs[0], outs[1])


def test_smooth_folding():
    torch.manual_seed(5)
    lin = nn.Linear(64, 32)
    s = torch.rand(64) * 3 + 0.2
    q = QuantLinear.from_float(lin, "w8a8", smooth=s)
    # weights were multiplied by s before quantization; dequantized_weight undoes it
    wq, ws = fmt.quantize_weight_int(lin.weight.detach() * s, 8)
    assert torch.equal(q.weight_q, wq)
    torch.testing.assert_close(q.dequantized_weight(), lin.weight.detach(), atol=float(ws.max() / s.min()), rtol=0)
    x = torch.randn(9, 64)
    xs_q, xs_s = G.quantize_rows_int8_reference(x, s)  # x / s folded into the quantizer
    exp = (torch._int_mm(xs_q, wq.t()).float() * xs_s * ws + lin.bias.detach())
    assert torch.equal(q(x), exp)
    with use_backend("triton"):
        assert torch.equal(q(x), exp)


def test_weight_override_and_codes():
    lin = nn.Linear(32, 8)
    w2 = torch.randn(8, 32)
    q = QuantLinear.from_float(lin, "w8a8", weight=w2)
    assert torch.equal(q.weight_q, fmt.quantize_weight_int(w2, 8)[0])
    codes = torch.randint(-8, 8, (8, 32), dtype=torch.int8)
    scale = torch.rand(8, 1) + 0.1
    q4 = QuantLinear.from_float(lin, QuantSpec("int4", 32, "int8"), weight_q=codes, weight_scale=scale)
    assert torch.equal(fmt.unpack_int4(q4.weight_q), codes)
    torch.testing.assert_close(q4.dequantized_weight(), codes.float() * scale)


@pytest.mark.parametrize("spec,tol", [("fp8", 0.08), ("w4a16", 0.2), (QuantSpec("fp4_e2m1", 16, None), 0.2),
                                      (QuantSpec("int8", 64, "int8"), 0.02)])
def test_other_formats_run(spec, tol):
    torch.manual_seed(6)
    lin = nn.Linear(128, 40).to(torch.bfloat16)
    q = QuantLinear.from_float(lin, spec)
    x = torch.randn(5, 128).to(torch.bfloat16)
    y, ref = q(x), lin(x)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref.float()).norm() / ref.float().norm()) < tol
    if resolve_spec(spec).weight_dtype != "fp8_e4m3":
        with use_backend("triton"):
            yt = q(x)
        torch.testing.assert_close(yt, y, rtol=1.6e-2, atol=1.6e-2)
    # fp8: the Triton fp8 activation quantizer is GPU-only (interpreter casts differ); reference ran above
    assert q.weight_bytes() < 128 * 40 * 2 * (0.55 if resolve_spec(spec).weight_bits == 8 else 0.4)


# -- module plumbing -------------------------------------------------------------------------

def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(7)
    conv = nn.Conv2d(16, 8, 1)
    spec = QuantSpec("int4", 16, "int8", "static", False)
    params = dict(act_scale=torch.tensor([0.05, 0.04]), act_zero_point=torch.tensor([2, -3], dtype=torch.int32))
    q = QuantConv2d.from_float(conv, spec, **params)
    save_file(q.state_dict(), tmp_path / "q.safetensors")
    other = QuantConv2d.from_float(nn.Conv2d(16, 8, 1), spec, **params)  # different float weights
    other.load_state_dict(load_file(tmp_path / "q.safetensors"))
    x = torch.randn(1, 16, 4, 4)
    q.step_state = other.step_state = Step(1)
    assert torch.equal(q(x), other(x))
    assert {k: v.dtype for k, v in other.state_dict().items()} == {k: v.dtype for k, v in q.state_dict().items()}


def test_to_dtype_keeps_packed_dtypes():
    q = QuantLinear.from_float(nn.Linear(32, 8), "fp8")
    q = q.to(torch.bfloat16)
    assert q.weight_q.dtype == torch.float8_e4m3fn and q.weight_scale.dtype == torch.float32
    assert q.original_dtype == torch.bfloat16 and q(torch.randn(2, 32)).dtype == torch.bfloat16
    q.half()
    assert q.original_dtype == torch.float16 and q.weight_q.dtype == torch.float8_e4m3fn
    q2 = QuantLinear.from_float(nn.Linear(32, 8), "w8a8").to("cpu", torch.float16)
    assert q2.weight_q.dtype == torch.int8 and q2.original_dtype == torch.float16
    assert "w=int8" in repr(q2) and "out=float16" in repr(q2)


def test_compile_fullgraph():
    torch.manual_seed(8)
    q = QuantLinear.from_float(nn.Linear(32, 16), QuantSpec("int8", None, "int8", "static", False),
                               act_scale=torch.tensor([0.05, 0.03]),
                               act_zero_point=torch.tensor([1, -1], dtype=torch.int32))
    q.step_state = Step(1)
    x = torch.randn(3, 32)
    eager = q(x)
    compiled = torch.compile(q, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), eager)
    d = QuantLinear.from_float(nn.Linear(32, 16), "w8a8")
    assert torch.equal(torch.compile(d, fullgraph=True, backend="eager")(x), d(x))


@pytest.mark.parametrize("preset", ["w8a8", "fp8", "w4a8", "w4a16"])
def test_empty_inputs_give_empty_outputs(preset):
    """No rows (an empty batch, a zero-length sequence): an empty output of the right shape, as
    nn.Linear / nn.Conv2d give; the int8 path used to fail reshaping its empty per-row scales."""
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if preset == "w4a16" else torch.float32
    linear = quantize_module(nn.Linear(256, 24).to(dtype), preset)
    for shape in ((0, 256), (2, 0, 256)):
        y = linear(torch.randn(shape, generator=g).to(dtype))
        assert y.shape == shape[:-1] + (24,) and y.dtype == dtype
    conv = nn.Conv2d(32, 16, 1).to(dtype)
    if quantize_reason(conv, preset) is None:
        y = quantize_module(conv, preset)(torch.randn(0, 32, 4, 4, generator=g).to(dtype))
        assert y.shape == (0, 16, 4, 4)
    if preset == "w8a8":
        q = quantize_module(nn.Linear(256, 24), preset)
        y = G.int8_linear(torch.randn(0, 256), q.weight_q, q.weight_scale)
        assert y.shape == (0, 24)


def test_bad_inputs_named():
    lin = nn.Linear(100, 8)
    assert "not divisible by weight_group_size=128" in quantize_reason(lin, "w4a8")
    with pytest.raises(ValueError, match="not divisible"):
        quantize_module(lin, "w4a8")
    assert "unsupported module kind LayerNorm" in quantize_reason(nn.LayerNorm(8), "w8a8")
    with pytest.raises(ValueError, match="LayerNorm"):
        quantize_module(nn.LayerNorm(8), "w8a8")
    assert "grouped conv" in quantize_reason(nn.Conv2d(8, 8, 3, groups=2), "w8a8")
    static = QuantSpec("int8", None, "int8", "static", False)
    lin = nn.Linear(32, 8)
    with pytest.raises(ValueError, match="act_scale: required"):
        QuantLinear.from_float(lin, static)
    for bad in (0.0, float("nan"), -2.0):
        with pytest.raises(ValueError, match="act_scale"):
            QuantLinear.from_float(lin, static, act_scale=torch.tensor([bad]))
        with pytest.raises(ValueError, match="smooth"):
            QuantLinear.from_float(lin, "w8a8", smooth=torch.full((32,), bad))
    with pytest.raises(ValueError, match="act_zero_point"):
        QuantLinear.from_float(lin, static, act_scale=torch.tensor([0.1]),
                               act_zero_point=torch.tensor([300], dtype=torch.int32))
    with pytest.raises(ValueError, match="act_scale: only for static"):
        QuantLinear.from_float(lin, "w8a8", act_scale=torch.tensor([0.1]))
    with pytest.raises(ValueError, match="weight: expected shape"):
        QuantLinear.from_float(lin, "w8a8", weight=torch.randn(8, 31))
    with pytest.raises(ValueError, match="weight_q"):
        QuantLinear.from_float(lin, QuantSpec("int4", 32, "int8"),
                               weight_q=torch.full((8, 32), 9, dtype=torch.int8), weight_scale=torch.ones(8, 1))
    with pytest.raises(ValueError, match="act_split"):
        QuantConv2d.from_float(nn.Conv2d(8, 8, 1), static, act_scale=torch.ones(1, 2), act_split=9)
    q = QuantLinear.from_float(lin, "w8a8")
    with pytest.raises(ValueError, match="x: expected last dimension 32"):
        q(torch.randn(2, 31))
    with pytest.raises(TypeError, match="x: expected dtype"):
        q(torch.randint(0, 3, (2, 32)))
    with pytest.raises(ValueError, match="on meta"):
        q(torch.randn(2, 32, device="meta"))


@pytest.mark.gpu
def test_gpu_layers_match_cpu_reference():
    torch.manual_seed(9)
    lin = nn.Linear(1280, 640).half()
    x = torch.randn(4096, 1280).half()
    for spec in ("w8a8", "w4a8"):
        q = QuantLinear.from_float(lin, spec)
        ref = q(x)
        qc = q.to("cuda")
        assert qc.weight_q.is_cuda and qc.weight_q.dtype == q.weight_q.dtype
        assert torch.equal(qc(x.cuda()).cpu(), ref)


def test_reading_weight_says_what_to_do():
    """Code written for nn.Linear that reads ``layer.weight`` (diffusers reads some layers' dtype
    that way) gets an AttributeError that says why and how to keep the layer in floating point;
    hasattr / getattr with a default behave as for any missing attribute."""
    for layer in (QuantLinear.from_float(nn.Linear(64, 32), "w8a8"),
                  QuantConv2d.from_float(nn.Conv2d(8, 16, 3, padding=1), "w8a8")):
        with pytest.raises(AttributeError, match=r"has no float 'weight'.*exclude="):
            layer.weight
        assert not hasattr(layer, "weight") and getattr(layer, "weight", None) is None
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            layer.nope


@pytest.mark.parametrize("preset", ["w8a8", "fp8", "w4a8", "w4a16"])
def test_conv_takes_unbatched_input_like_nn_conv2d(preset):
    """nn.Conv2d takes [C, H, W]; the quantized conv refused it, so a model that ran in float
    raised once patched."""
    torch.manual_seed(0)
    for conv in (nn.Conv2d(128, 8, 3, padding=1), nn.Conv2d(128, 8, 1)):
        q = QuantConv2d.from_float(conv, preset)
        x = torch.randn(128, 5, 5)
        y = q(x)
        assert y.shape == conv(x).shape == (8, 5, 5)
        assert torch.equal(y, q(x[None])[0])
    with pytest.raises(ValueError, match=r"x: expected \[B, 128, H, W\] or \[128, H, W\], got shape \(64, 5, 5\)"):
        q(torch.randn(64, 5, 5))


def test_empty_layers_stay_float_with_a_reason():
    """A zero-size layer passed quantize_reason, then failed to quantize: patch aborted for the whole
    model, and Linear(128, 0) with w4a8 quantized but failed at its forward."""
    import diffaccel

    for layer in (nn.Linear(0, 8), nn.Linear(128, 0), nn.Conv2d(0, 8, 1), nn.Conv2d(128, 0, 1)):
        for preset in ("w8a8", "fp8", "w4a8", "w4a16"):
            assert "the weight is empty" in quantize_reason(layer, resolve_spec(preset))
            with pytest.raises(ValueError, match="the weight is empty"):
                quantize_module(layer, preset)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 0))
    x = torch.randn(3, 128)
    report = diffaccel.patch(model, quant="w8a8")
    assert isinstance(model[0], QuantLinear) and type(model[1]) is nn.Linear
    assert any(s.name == "1" and "the weight is empty" in s.reason for s in report.skipped)
    assert model(x).shape == (3, 0)


def test_nan_fp8_codes_are_refused():
    lin = nn.Linear(16, 8)
    codes = torch.zeros(8, 16).to(torch.float8_e4m3fn)
    codes[3, 5] = float("nan")
    with pytest.raises(ValueError, match="weight_q: float8_e4m3fn codes must not be NaN"):
        QuantLinear.from_float(lin, "fp8", weight_q=codes, weight_scale=torch.ones(8))


# -- grouped weight scales ---------------------------------------------------------------------

def _weight_with_varying_groups(n, k, group_size, seed):
    """[n, k] fp32 whose groups of ``group_size`` along K have magnitudes 1e-2 .. 1e1, shuffled per row,
    so a row's absmax is one group's and every other group's own absmax is smaller."""
    g = torch.Generator().manual_seed(seed)
    groups = k // group_size
    mags = torch.logspace(-2, 1, groups)
    order = torch.stack([torch.randperm(groups, generator=g) for _ in range(n)])
    return (torch.randn(n, groups, group_size, generator=g) * mags[order][..., None]).reshape(n, k)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_group_scales_are_each_groups_own_absmax(bits, group_size):
    """Per group, scale[n, g] = max(absmax(w[n, g*gs:(g+1)*gs]), 1e-12) / qmax (formats.py); a quantizer
    that stored the row's (per-channel) amax in every group passed every other test, since codes and
    kernels stay consistent and only the accuracy drops (int4 g32: relative weight error 0.11 -> 0.16).
    Exact equality: the absmax is exact and the division one IEEE fp32 division on both sides."""
    N, K = 12, 256
    qmax = 2 ** (bits - 1) - 1
    w = _weight_with_varying_groups(N, K, group_size, seed=group_size + bits)
    wg = w.reshape(N, K // group_size, group_size)
    expected = wg.abs().amax(-1) / torch.tensor(float(qmax))
    q, scale = fmt.quantize_weight_int(w, bits, group_size)
    assert scale.shape == (N, K // group_size) and scale.dtype == torch.float32
    assert torch.equal(scale, expected)
    lo = -8 if bits == 4 else -127
    assert torch.equal(q, torch.round(wg / expected[..., None]).clamp(lo, qmax).to(torch.int8).reshape(N, K))
    # through the layer: the same scales are what it stores and dequantizes with
    lin = nn.Linear(K, N, bias=False)
    spec = QuantSpec("int4" if bits == 4 else "int8", group_size, "int8")
    layer = QuantLinear.from_float(lin, spec, weight=w)
    assert torch.equal(layer.weight_scale, expected)

    def group_err(wq):  # mean over (n, g) of the group's relative L2 error: every group counts alike
        d = (wq - w).reshape(N, -1, group_size).norm(dim=-1) / wg.norm(dim=-1)
        return d.mean().item()

    grouped_err = group_err(layer.dequantized_weight())
    q_pc, s_pc = fmt.quantize_weight_int(w, bits, None)
    per_channel_err = group_err(q_pc.float() * s_pc[:, None])
    # with the row's amax a group 1e-3 of it keeps <= 1 code step (int4: it rounds to 0, error ~1); with its
    # own amax every group keeps the full code range. Measured (mean per-group relative error, grouped vs
    # per channel): int4 0.09-0.12 vs 0.56-0.76, int8 0.005-0.006 vs 0.39-0.50, so a ratio <= 0.21; a
    # quantizer that ignores the groups gives exactly the per-channel codes (ratio 1). Bound: 0.5.
    assert grouped_err < 0.5 * per_channel_err, (grouped_err, per_channel_err)


def test_subclasses_with_their_own_forward_are_refused_everywhere():
    """from_float quantized an nn.Linear / nn.Conv2d subclass that overrides forward (or a conv's
    _conv_forward) without a word, and the replacement dropped what it computed (0.50 / 0.95
    relative error); quantize_reason and patch already refused it. A subclass that keeps the
    base forward is quantized as before."""
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    class ReluConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x).relu()

    class PaddedConv(nn.Conv2d):
        def _conv_forward(self, x, w, b):
            return super()._conv_forward(F.pad(x, (1, 1, 1, 1)), w, b)

    class Plain(nn.Linear):
        pass

    with pytest.raises(TypeError, match="^linear: Scaled overrides nn.Linear.forward, which a quantized layer "
                                        "would not run; leave it in floating point$"):
        QuantLinear.from_float(Scaled(128, 64), "w8a8")
    with pytest.raises(TypeError, match="^conv: ReluConv overrides nn.Conv2d.forward"):
        QuantConv2d.from_float(ReluConv(16, 8, 3), "w8a8")
    with pytest.raises(TypeError, match="^conv: PaddedConv overrides nn.Conv2d._conv_forward"):
        QuantConv2d.from_float(PaddedConv(16, 8, 3), "w8a8")
    assert quantize_reason(PaddedConv(16, 8, 3), "w8a8") == \
        "PaddedConv overrides nn.Conv2d._conv_forward, which a quantized layer would not run"
    assert quantize_reason(Plain(128, 64), "w8a8") is None
    assert isinstance(QuantLinear.from_float(Plain(128, 64), "w8a8"), QuantLinear)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_weight_recomputing_hooks_leave_the_layer_float(norm):
    """patch replaced a weight_norm / spectral_norm layer (its pre-hook recomputes weight every
    call) and every forward then failed in that hook ('QuantLinear' has no attribute 'weight_g')."""
    import diffaccel

    torch.manual_seed(0)
    wrap = getattr(nn.utils, norm)
    m = nn.Sequential(nn.Linear(128, 128), wrap(nn.Linear(128, 128))).eval()
    x = torch.randn(2, 128)
    with torch.no_grad():
        ref = m(x)
    rep = diffaccel.patch(m, quant="w8a8", attention=False, solver=False)
    assert [r.name for r in rep.replaced] == ["0"]
    (skipped,) = [s for s in rep.skipped if s.name == "1"]
    assert f"torch.nn.utils.{norm}" in skipped.reason and "remove_" in skipped.reason
    assert isinstance(m[1], nn.Linear)
    with torch.no_grad():
        y = m(x)
    assert (y - ref).norm() / ref.norm() < 0.02
    assert f"torch.nn.utils.{norm}" in quantize_reason(m[1], "w8a8")


@pytest.mark.parametrize("preset", ["w8a8", "fp8"])
def test_unbatched_conv_input_has_a_gradient(preset):
    """The forward took [C, H, W] but the straight-through backward passed that shape to
    conv2d_input, which raised inside torch."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, stride=2, padding=1)
    q = QuantConv2d.from_float(conv, preset)
    x = torch.randn(16, 7, 7, requires_grad=True)
    q(x).square().sum().backward()
    xb = x.detach()[None].requires_grad_()
    q(xb).square().sum().backward()
    assert x.grad.shape == (16, 7, 7)
    assert torch.equal(x.grad, xb.grad[0])


@pytest.mark.parametrize("other", [dict(weight_dtype="int8"), dict(weight_dtype="int8", act_mode="static"),
                                   dict(weight_dtype="int4", weight_group_size=64)])
def test_a_refused_load_changes_no_buffer(other):
    """A state dict whose codes matched in dtype and shape but whose scales did not (another group
    size) loaded the codes and bias, then raised on the scales: the layer computed with another
    layer's codes (1.34 relative change) and unpatch refused to restore it. Any mismatch in a
    quantized layer's buffers (shape, a buffer it lacks, one missing) now refuses them all."""
    torch.manual_seed(0)
    spec = QuantSpec(weight_dtype=other["weight_dtype"], weight_group_size=128)
    qa = QuantLinear.from_float(nn.Linear(256, 64), spec)
    kw = dict(act_scale=torch.tensor([0.05])) if other.get("act_mode") == "static" else {}
    qb = QuantLinear.from_float(nn.Linear(256, 64), QuantSpec(**other), **kw)
    before = {k: v.clone() for k, v in qa.state_dict().items()}
    with pytest.raises(RuntimeError, match="load it into a layer built with the same spec"):
        qa.load_state_dict(qb.state_dict())
    with pytest.raises(RuntimeError, match="load it into a layer built with the same spec"):
        qa.load_state_dict(qb.state_dict(), strict=False)
    assert qa.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in qa.state_dict().items())


def test_buffer_mismatch_messages_name_each_buffer():
    qa = QuantLinear.from_float(nn.Linear(256, 64), QuantSpec(weight_dtype="int8", weight_group_size=64))
    qb = QuantLinear.from_float(nn.Linear(256, 64), "w8a8")
    with pytest.raises(RuntimeError) as e:
        qa.load_state_dict(qb.state_dict())
    assert "weight_scale: stored with shape (64,), this layer holds (64, 4)" in str(e.value)
    static = QuantLinear.from_float(nn.Linear(256, 64), QuantSpec(weight_dtype="int8", act_mode="static"),
                                    act_scale=torch.tensor([0.05]))
    with pytest.raises(RuntimeError) as e:
        static.load_state_dict(qb.state_dict())
    assert "act_scale: missing from the state dict" in str(e.value)
    with pytest.raises(RuntimeError) as e:
        qb.load_state_dict(static.state_dict())
    assert "act_scale: this layer has none" in str(e.value)
    # a load that names none of the layer's buffers (e.g. LoRA weights with strict=False) is not its concern
    qb.load_state_dict({}, strict=False)


@pytest.mark.parametrize("preset", ["w8a8", "fp8", "w4a16"])
def test_meta_device_forward_gives_shapes(preset):
    """nn.Linear runs on meta (shape inference); the quantized layer's kernels did too, then asking
    autocast about the meta device raised 'unknown device type for autocast'."""
    q = QuantLinear.from_float(nn.Linear(256, 64), preset).to("meta")
    assert q(torch.empty(4, 256, device="meta")).shape == (4, 64)
    c = QuantConv2d.from_float(nn.Conv2d(128, 8, 3, padding=1), preset).to("meta")
    assert c(torch.empty(1, 128, 7, 7, device="meta")).shape == (1, 8, 7, 7)


@pytest.mark.parametrize("preset", ["w8a8", "fp8", "w4a16"])
def test_pointwise_conv_keeps_channels_last_like_nn_conv2d(preset):
    """A 1x1 QuantConv2d computes in [B*H*W, C] rows, i.e. channels_last, then copied its output to
    NCHW even for a channels_last input, where nn.Conv2d returns channels_last: a full extra write
    and read per layer in a model moved to channels_last. Values are unchanged."""
    torch.manual_seed(0)
    conv = nn.Conv2d(128, 32, 1)
    q = QuantConv2d.from_float(conv, preset)
    x = torch.randn(2, 128, 5, 6)
    xc = x.to(memory_format=torch.channels_last)
    y, yc = q(x), q(xc)
    assert y.stride() == conv(x).stride() and y.is_contiguous()
    assert yc.stride() == conv(xc).stride() and yc.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, yc)


def test_a_non_persistent_buffer_is_not_asked_of_the_state_dict():
    """The all-or-nothing load looks at the buffers a state dict holds: a non-persistent one (a user's
    cache, say) is never saved, so it must not read as missing."""
    qa = QuantLinear.from_float(nn.Linear(64, 32), "w8a8")
    qb = QuantLinear.from_float(nn.Linear(64, 32), "w8a8")
    qa.register_buffer("cache", torch.zeros(3), persistent=False)
    qa.load_state_dict(qb.state_dict())
    assert torch.equal(qa.weight_q, qb.weight_q)
