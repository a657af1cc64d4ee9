"""Gradients through patched models: LoRA training over quantized layers, gradient guidance.

- ``diffaccel.ops.attention`` has a backward: exact attention's gradient recomputed from q, k, v
  (torch SDPA's backward; the fp32 reference's when the LSE output is used). For ``quant="int8"``
  it is the straight-through gradient (the quantization of Q, K, V taken as the identity).
- QuantLinear / QuantConv2d run their low-bit forward unchanged and return the input gradient of
  the float layer their codes stand for (``dequantized_weight()``): straight through the activation
  quantization, as QLoRA does. Codes and scales are buffers and get no gradient.
- The fused paths that pass int8 codes between ops (shared q/k/v quantization, the fused
  feed-forward and ResNet block, the fused norms) step aside while autograd records, since codes
  cut the graph; under no_grad they run as before.

Tolerances: the backward ops against the same math in torch autograd, fp32 on CPU: 1e-5 relative
(measured about 1e-6). Whole models with attention patched only (float path): 1e-5 relative to the
unpatched model's gradients. Quantized presets change the forward by their quantization error, so
their gradients are compared by direction: cosine similarity above 0.95 with the float model's
(measured 0.98 to 1.0 on these tiny models).
"""
import importlib

import pytest
import torch
from torch import nn

import diffaccel
import tiny_models
from diffaccel.nn import QuantConv2d, QuantLinear
from diffaccel.ops import conv as CV
from diffaccel.ops import ffn as FF
from diffaccel.ops import norm as NORM
from diffaccel.quant import QuantSpec

FP32_REL = 1e-5
QUANT_COS = 0.95
A = importlib.import_module("diffaccel.ops.attention")  # (diffaccel.ops.attention is also the function)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


# -- attention ---------------------------------------------------------------------------------------

def _mask(kind, B, Lq, Lk):
    g = torch.Generator().manual_seed(3)
    if kind == "bool":
        m = torch.rand(B, 1, Lq, Lk, generator=g) > 0.3
        m[0, 0, 3] = False  # a query row that sees no key: output 0, gradient 0
        return m
    if kind == "additive":
        return torch.randn(B, 1, 1, Lk, generator=g).requires_grad_(True)
    return None


@pytest.mark.parametrize("quant", [None, "int8"])
@pytest.mark.parametrize("mask", [None, "bool", "additive", "causal"])
@pytest.mark.parametrize("with_lse", [False, True])
def test_attention_backward_matches_the_reference(quant, mask, with_lse):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, L, 40, requires_grad=True) for L in (37, 50, 50))
    m = None if mask == "causal" else _mask(mask, 2, 37, 50)
    causal = mask == "causal"
    if with_lse:
        out, lse = A.attention_with_lse(q, k, v, m, causal, quant=quant)
        ref, ref_lse = A.attention_with_lse_reference(q, k, v, m, causal)
        g_lse = torch.randn_like(lse).masked_fill(torch.isinf(lse), 0)
        outputs, refs, grads = (out, lse), (ref, ref_lse), (torch.randn_like(out), g_lse)
    else:
        out = A.attention(q, k, v, m, causal, quant=quant)
        ref = A.attention_reference(q, k, v, m, causal)
        outputs, refs, grads = (out,), (ref,), (torch.randn_like(out),)
    inputs = (q, k, v) + ((m,) if m is not None and m.requires_grad else ())
    got = torch.autograd.grad(outputs, inputs, grads)
    want = torch.autograd.grad(refs, inputs, grads)
    for name, a, b in zip("qkvm", got, want):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < FP32_REL, (name, _rel(a, b))


def test_attention_opcheck_with_gradients():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, L, 32, requires_grad=True) for L in (6, 9, 9))
    op = torch.ops.diffaccel.attention.default
    torch.library.opcheck(op, (q, k, v, None, False, 0.2, None, False))
    torch.library.opcheck(op, (q, k, v, None, True, 0.2, "int8", True))


def test_attention_without_grad_records_nothing():
    q, k, v = (torch.randn(1, 2, 8, 32, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        assert A.attention(q, k, v).grad_fn is None


# -- quantized layers: straight-through gradients --------------------------------------------------

STATIC = QuantSpec("int8", None, "int8", "static", False)
LINEAR_CASES = {
    "w8a8": dict(spec="w8a8"),
    "w4a8": dict(spec="w4a8"),
    "fp8": dict(spec="fp8"),
    "w4a16": dict(spec="w4a16"),
    "smoothquant": dict(spec="w8a8", smooth=torch.linspace(0.5, 2.0, 256)),
    "static+zp": dict(spec=STATIC, act_scale=torch.tensor([0.05]), act_zero_point=torch.tensor([3], dtype=torch.int32)),
}


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
@pytest.mark.parametrize("rows", [1, 77])
def test_quant_linear_gradient_is_the_float_layers(case, rows):
    torch.manual_seed(2)
    kw = dict(LINEAR_CASES[case])
    spec = kw.pop("spec")
    layer = QuantLinear.from_float(nn.Linear(256, 96), spec, **kw)
    x = torch.randn(2, rows, 256, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y, layer(x))  # the forward is the inference forward, unchanged
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    w = layer.dequantized_weight()
    (want,) = torch.autograd.grad(torch.nn.functional.linear(x, w, layer.bias), x, g)
    assert gx.dtype == x.dtype and _rel(gx, want) < FP32_REL
    assert not any(b.requires_grad for b in layer.buffers())


@pytest.mark.parametrize("spec", ["w8a8", "fp8", "w4a16", STATIC])
@pytest.mark.parametrize("kernel", [1, 3])
def test_quant_conv_gradient_is_the_float_convs(spec, kernel):
    torch.manual_seed(3)
    conv = nn.Conv2d(128, 24, kernel, stride=2 if kernel == 3 else 1, padding=kernel // 2)  # K: groups of 128
    kw = dict(act_scale=torch.tensor([0.05]), act_zero_point=torch.tensor([-2], dtype=torch.int32)) \
        if spec is STATIC else {}
    layer = QuantConv2d.from_float(conv, spec, **kw)
    x = torch.randn(2, 128, 9, 9, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y, layer(x))
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    ref = torch.nn.functional.conv2d(x, layer.dequantized_weight(), layer.bias, conv.stride, conv.padding)
    (want,) = torch.autograd.grad(ref, x, g)
    assert gx.shape == x.shape and _rel(gx, want) < FP32_REL


def test_shared_quantization_steps_aside_for_gradients():
    """q/k/v on one shared quantization pass int8 codes, which cut the graph: with x requiring grad
    each projection runs on its own (straight-through), so x gets all three contributions."""
    from diffaccel.nn.shared_input import can_share_input, project_shared

    torch.manual_seed(4)
    layers = [QuantLinear.from_float(nn.Linear(64, 64), "w8a8") for _ in range(3)]
    x = torch.randn(2, 100, 64, requires_grad=True)  # above FUSED_QUANT_MAX_M rows
    with torch.no_grad():
        assert can_share_input(x, layers)
    assert not can_share_input(x, layers)
    outs = project_shared(x, *layers)
    (gx,) = torch.autograd.grad(sum(o.square().sum() for o in outs), x)
    want = sum(torch.autograd.grad(layer(x).square().sum(), x)[0] for layer in layers)
    assert _rel(gx, want) < FP32_REL


# -- whole backbones -------------------------------------------------------------------------------

def _add_lora(model):
    peft = pytest.importorskip("peft")
    torch.manual_seed(11)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                      init_lora_weights=False))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def _gradients(model, inputs):
    """d loss / d latent and d loss / d LoRA parameters, loss = mean(output^2)."""
    key = "sample" if "sample" in inputs else "hidden_states"
    x = inputs[key].clone().requires_grad_(True)
    out = model(**{**inputs, key: x}, return_dict=False)[0]
    out.square().mean().backward()
    lora = torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])
    return x.grad, lora


@pytest.mark.parametrize("backbone", ["unet_sd15", "flux"])
@pytest.mark.parametrize("quant", [None, "w8a8", "fp8", "w4a16"])
def test_lora_gradients_through_a_patched_backbone(backbone, quant):
    """LoRA training over a patched backbone, and gradient guidance (d loss / d latent): the
    backward runs through diffaccel attention, the quantized layers and the fused modules' unfused
    paths (the fused ResNet block and feed-forward would raise: their ops have no backward)."""
    base, inputs = tiny_models.FACTORIES[backbone]()
    _add_lora(base)
    gx0, gl0 = _gradients(base, inputs)
    model, inputs = tiny_models.FACTORIES[backbone]()
    report = diffaccel.patch(model, quant=quant, solver=False)
    assert report.by_part("attention")
    _add_lora(model)
    gx, gl = _gradients(model, inputs)
    if quant is None:
        assert _rel(gx, gx0) < FP32_REL and _rel(gl, gl0) < FP32_REL
    else:
        assert _cos(gx, gx0) > QUANT_COS and _cos(gl, gl0) > QUANT_COS, (_cos(gx, gx0), _cos(gl, gl0))


def test_compiled_backward_through_a_patched_backbone():
    """torch.compile(fullgraph=True) traces the straight-through layers and the attention op's
    backward (AOTAutograd, backend aot_eager): the same latent gradient as eager."""
    model, inputs = tiny_models.flux()
    diffaccel.patch(model, quant="w8a8", solver=False)
    model.requires_grad_(False)
    x = inputs["hidden_states"].clone().requires_grad_(True)

    def grad_of(fn):
        return torch.autograd.grad(fn(**{**inputs, "hidden_states": x}, return_dict=False)[0].square().mean(), x)[0]

    eager = grad_of(model)
    compiled = grad_of(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert _rel(compiled, eager) < FP32_REL


def test_fused_ops_run_under_no_grad_and_step_aside_for_gradients(monkeypatch):
    model, inputs = tiny_models.unet_sd15()
    diffaccel.patch(model, quant="w8a8", solver=False)
    calls = {"group_norm_affine": 0, "int8_ffn_up": 0, "int8_conv2d": 0}

    def counting(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    counting(NORM, "group_norm_affine")
    counting(FF, "int8_ffn_up")
    counting(CV, "int8_conv2d")
    with torch.no_grad():
        model(**inputs)
    assert calls["group_norm_affine"] > 0 and calls["int8_ffn_up"] > 0
    calls.update(dict.fromkeys(calls, 0))
    x = inputs["sample"].clone().requires_grad_(True)
    model(**{**inputs, "sample": x}).sample.sum().backward()
    assert calls["group_norm_affine"] == 0 and calls["int8_ffn_up"] == 0
    assert calls["int8_conv2d"] > 0  # the convs themselves still run their int8 kernel, straight-through
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# -- the fused solver step ------------------------------------------------------------------------

@pytest.mark.parametrize("n_hist,cond,noise,rescale,last", [(0, False, False, 0.0, False), (2, True, True, 0.7, False),
                                                            (3, True, False, 0.0, True)])
def test_solver_step_backward_matches_the_reference(n_hist, cond, noise, rescale, last):
    """The step op's backward is the reference math's (recomputed through it), for every tensor that
    needs a gradient, the three outputs weighted at once."""
    from diffaccel.ops.solver import NUM_COEFFS, fused_solver_step, fused_solver_step_reference

    g = torch.Generator().manual_seed(6)

    def r():
        return torch.randn(2, 4, 6, 5, generator=g).requires_grad_(True)

    coeffs = torch.randn(NUM_COEFFS, generator=g)
    coeffs[3] = 1.5  # the clip of the x0 prediction is active somewhere
    x, u = r(), r()
    c = r() if cond else None
    hist = [r() for _ in range(n_hist)]
    nz = r() if noise else None
    ls = r() if last else None
    kw = dict(guidance_scale=4.0 if cond else 1.0, guidance_rescale=rescale)
    outs = fused_solver_step(x, u, coeffs, model_output_cond=c, history=hist, noise=nz, last_sample=ls, **kw)
    h = hist + [None] * (3 - n_hist)
    refs = fused_solver_step_reference(x, u, coeffs, None, c, *h, nz, ls, kw["guidance_scale"], rescale,
                                       torch.float32, torch.float32)
    grads = [torch.randn(o.shape, generator=g) for o in outs]
    inputs = [t for t in (x, u, c, *hist, nz, ls) if t is not None]
    used = [(o, r_, gr) for o, r_, gr in zip(outs, refs, grads) if o.numel()]
    got = torch.autograd.grad([o for o, _, _ in used], inputs, [gr for _, _, gr in used])
    want = torch.autograd.grad([r_ for _, r_, _ in used], inputs, [gr for _, _, gr in used])
    for i, (a, b) in enumerate(zip(got, want)):
        assert _rel(a, b) < FP32_REL, (i, _rel(a, b))


def test_solver_opcheck_with_gradients():
    from diffaccel.ops.solver import NUM_COEFFS

    g = torch.Generator().manual_seed(7)
    x, u, c, h0 = (torch.randn(2, 4, 4, 4, generator=g).requires_grad_(True) for _ in range(4))
    args = (x, u, torch.randn(NUM_COEFFS, generator=g), None, c, h0, None, None, None, None, 3.0, 0.5,
            torch.float32, torch.float32, True)
    torch.library.opcheck(torch.ops.diffaccel.fused_solver_step.default, args)


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                  "UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_gradient_through_a_patched_sampling_loop(name):
    """Backpropagating through a whole sampling loop (DRaFT-style reward fine-tuning, DOODL-style
    guidance): the patched schedulers' steps, history and UniPC's corrector included, give
    diffusers' gradient with respect to the starting latent."""
    import diffusers

    def run(scheduler):
        scheduler.set_timesteps(6)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        cur = x
        for t in scheduler.timesteps:
            eps = torch.tanh(cur) * 0.5 + 0.1 * cur  # a differentiable stand-in for the model
            cur = scheduler.step(eps, t, cur).prev_sample
        (gx,) = torch.autograd.grad(cur.square().sum(), x)
        return cur.detach(), gx

    cls = getattr(diffusers, name)
    out0, g0 = run(cls())
    patched = cls()
    assert diffaccel.patch_scheduler(patched).patched
    out, g = run(patched)
    assert _rel(out, out0) < FP32_REL and _rel(g, g0) < FP32_REL


@pytest.mark.gpu
def test_attention_backward_bf16_on_cuda():
    """bf16 on a GPU: SDPA's backward kernels; against the fp32 reference's gradients within 2e-2
    relative (bf16 keeps 8 bits of mantissa)."""
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 4, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for L in (333, 400, 400))
    for quant in (None, "int8"):
        out = A.attention(q, k, v, quant=quant)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), g)
        qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
        want = torch.autograd.grad(A.attention_reference(qf, kf, vf), (qf, kf, vf), g.float())
        for a, b in zip(got, want):
            assert _rel(a.float(), b) < 2e-2


def test_other_differentiation_transforms_are_refused_by_name():
    """Forward-mode AD dropped the tangents (torch.func.jvp through attention gave exactly 0, forward_ad
    through a QuantLinear 1.06 off); torch.func.grad raised torch's internal setup_context error."""
    import torch.autograd.forward_ad as fwAD

    import diffaccel
    from diffaccel.nn import QuantLinear

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    with pytest.raises(NotImplementedError, match=r"^diffaccel.ops.attention: forward-mode AD"):
        torch.func.jvp(lambda q: diffaccel.ops.attention(q, k, v), (q,), (torch.randn_like(q),))
    with pytest.raises(NotImplementedError, match=r"torch.func.grad / vjp / jacrev is not supported"):
        torch.func.grad(lambda q: diffaccel.ops.attention(q, k, v).sum())(q)
    layer = QuantLinear.from_float(torch.nn.Linear(32, 16), "w8a8")
    x = torch.randn(4, 32)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=r"forward-mode AD \(torch.autograd.forward_ad\)"):
        layer(fwAD.make_dual(x, torch.randn_like(x)))
    qs = torch.stack([q, q])  # (vmap is no differentiation: it still runs)
    assert torch.func.vmap(lambda t: diffaccel.ops.attention(t, k, v))(qs).shape == qs.shape


def test_quantized_layers_follow_autocast_like_the_float_layers():
    """Under torch.autocast a QuantLinear / QuantConv2d returned the model's storage dtype (fp32)
    where nn.Linear / nn.Conv2d return the autocast dtype: a w8a8 DiT's output was fp32 there."""
    from diffaccel.nn import QuantConv2d, QuantLinear

    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(128, 16), torch.nn.Conv2d(8, 8, 3, padding=1)
    x, xc = torch.randn(4, 128), torch.randn(1, 8, 5, 5)
    for preset in ("w8a8", "fp8", "w4a16"):
        ql = QuantLinear.from_float(lin, preset)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ql(x).dtype == lin(x).dtype == torch.bfloat16
        assert ql(x).dtype == torch.float32
    for preset in ("w8a8", "fp8"):
        qc = QuantConv2d.from_float(conv, preset)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert qc(xc).dtype == conv(xc).dtype == torch.bfloat16
        assert qc(xc).dtype == torch.float32


def test_dit_keeps_its_output_layers_float():
    """DiT's final adaLN modulation and output projection (proj_out_1 / proj_out_2) were quantized by
    the presets, which keep each backbone's input / output layers in floating point."""
    import diffaccel
    import tiny_models

    model, _ = tiny_models.FACTORIES["dit"]()
    report = diffaccel.patch(model, quant="w8a8", solver=False)
    assert type(model.proj_out_1) is torch.nn.Linear and type(model.proj_out_2) is torch.nn.Linear
    assert {s.name for s in report.skipped} >= {"proj_out_1", "proj_out_2"}
