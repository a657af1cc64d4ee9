"""FusedFeedForward (diffaccel.nn.feed_forward) and its place in diffaccel.patch.

Equalities and tolerances:
- fp32 models, torch backend: the fused forward equals the loop over ``net`` bit for bit. There the
  loop's GELU also acts on the fp32 GEMM result, and the down projection quantizes the same fp32
  value the fused epilogue does (dynamic: it quantizes itself; static: int8_ffn_up writes its codes).
- Triton (interpreter) against the torch backend: rel L2 <= 1e-3 of the output (the epilogue's GELU is
  a few ulps off torch's, which can move a code by one step; tests/test_ffn_ops.py bounds that).
"""
import copy

import pytest
import torch
from torch import nn

import diffaccel
from diffaccel.nn import FusedFeedForward, QuantLinear
from diffaccel.nn import feed_forward as dff
from diffaccel.ops import use_backend

import tiny_models

ACTIVATION_FNS = {"geglu": "geglu", "gelu": "gelu", "gelu-approximate": "gelu_tanh"}


def _ff(activation_fn, dim=64, mult=2, seed=0, final_dropout=False):
    from diffusers.models.attention import FeedForward

    torch.manual_seed(seed)
    return FeedForward(dim, mult=mult, activation_fn=activation_fn, final_dropout=final_dropout).eval()


def _quantize(ff, spec="w8a8", static=None):
    """Quantize proj and net.2 in place; ``static`` = (up scales [T], down scales [T]) makes them static."""
    from diffaccel.quant import QuantSpec

    if static is not None:
        spec = QuantSpec(weight_dtype="int8", act_dtype="int8", act_mode="static", act_symmetric=False)
        up_scale, down_scale = static
        zp = torch.tensor([3] * len(up_scale), dtype=torch.int32)
        ff.net[0].proj = QuantLinear.from_float(ff.net[0].proj, spec, act_scale=up_scale, act_zero_point=zp)
        ff.net[2] = QuantLinear.from_float(ff.net[2], spec, act_scale=down_scale, act_zero_point=-zp)
    else:
        ff.net[0].proj = QuantLinear.from_float(ff.net[0].proj, spec)
        ff.net[2] = QuantLinear.from_float(ff.net[2], spec)
    return ff


def _loop(ff, x):
    for m in ff.net:
        x = m(x)
    return x


def _rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("activation_fn", list(ACTIVATION_FNS))
@pytest.mark.parametrize("mode", ["dynamic", "static", "w4a8-g32"])
def test_fused_equals_the_loop_in_fp32(activation_fn, mode):
    from diffaccel.quant import QuantSpec

    if mode == "w4a8-g32":
        ff = _quantize(_ff(activation_fn), spec=QuantSpec(weight_dtype="int4", weight_group_size=32, act_dtype="int8"))
    else:
        ff = _quantize(_ff(activation_fn), static=(torch.tensor([0.03]), torch.tensor([0.02])) if mode == "static"
                       else None)
    fused = FusedFeedForward(ff)
    assert fused.net is ff.net and fused.activation == ACTIVATION_FNS[activation_fn]
    assert fused.writes_codes == (mode == "static")
    x = torch.randn(2, 77, 64) * 2
    with use_backend("torch"):
        out = fused(x)
        assert torch.equal(out, _loop(ff, x))
    with use_backend("triton"):
        tri = fused(x)
    assert tri.shape == (2, 77, 64)
    assert _rel_l2(tri, out) <= 1e-3


@pytest.mark.parametrize("activation_fn", list(ACTIVATION_FNS))
@pytest.mark.parametrize("down", ["fp8", "float"])
def test_fp8_up_projection(activation_fn, down):
    """The fp8 preset: the fp8 GEMM's epilogue applies the activation; net.2 (fp8, or left in float) runs
    on the float result. fp32, torch backend: equal to the loop."""
    ff = _ff(activation_fn)
    ff.net[0].proj = QuantLinear.from_float(ff.net[0].proj, "fp8")
    if down == "fp8":
        ff.net[2] = QuantLinear.from_float(ff.net[2], "fp8")
    fused = FusedFeedForward(ff)
    assert fused.op_name == "fp8_ffn_up" and not fused.writes_codes
    x = torch.randn(77, 64) * 2
    with use_backend("torch"):
        out = fused(x)
        assert torch.equal(out, _loop(ff, x))
    with use_backend("triton"):
        assert _rel_l2(fused(x), out) <= 1e-3


def test_static_codes_follow_the_timestep_set():
    """TFMQ-style per-timestep activation parameters: the set the step state selects is the one used,
    for the up projection's quantizer and for the codes written for the down projection."""
    ff = _quantize(_ff("gelu-approximate"), static=(torch.tensor([0.03, 0.08]), torch.tensor([0.02, 0.05])))

    class Step:
        index = torch.tensor(0)

    state = Step()
    ff.net[0].proj.step_state = state
    ff.net[2].step_state = state
    fused = FusedFeedForward(ff)
    x = torch.randn(33, 64) * 2
    outs = []
    for i in (0, 1):
        state.index = torch.tensor(i)
        with use_backend("torch"):
            outs.append(fused(x))
            assert torch.equal(outs[-1], _loop(ff, x))
    assert not torch.equal(outs[0], outs[1])


def test_half_precision_close_to_the_loop():
    """fp16: the loop rounds the projection to fp16 before GELU, the fused epilogue does not."""
    ff = _quantize(_ff("geglu")).to(torch.float16)
    fused = FusedFeedForward(ff)
    x = (torch.randn(77, 64) * 2).half()
    with use_backend("torch"):
        out, loop = fused(x), _loop(ff, x)
    assert out.dtype == torch.float16
    assert _rel_l2(out, loop) <= 1e-2


def test_falls_back_to_the_loop_and_says_why():
    ff = _quantize(_ff("geglu"))
    fused = FusedFeedForward(ff)
    x = torch.randn(9, 64)
    calls = []
    handle = ff.net[2].register_forward_hook(lambda m, i, o: calls.append(1))
    assert dff.unfused_reason(fused) == "hooks on its layers would be bypassed"
    with use_backend("torch"):
        assert torch.equal(fused(x), _loop(ff, x))
    assert calls  # the hook ran: the loop did
    handle.remove()
    assert dff.unfused_reason(fused) is None
    fused.train()
    assert dff.unfused_reason(fused) is None  # dropout p = 0: training changes nothing
    ff.net[1].p = 0.1
    assert dff.unfused_reason(fused) == "dropout is active (training mode)"
    fused.eval()
    ff.net[0].proj = nn.Identity()
    assert dff.unfused_reason(fused) == "net.0.proj is Identity, not a QuantLinear"


def test_weight_only_has_no_epilogue_and_is_refused():
    from diffaccel.quant import QuantSpec

    ff = _quantize(_ff("gelu"), spec=QuantSpec(weight_dtype="int4", weight_group_size=32, act_dtype=None))
    assert dff.fuse_reason(ff) == ("net.0.proj has float (weight-only) activations; the fused epilogue needs int8 "
                                   "or fp8 ones")
    with pytest.raises(ValueError, match="ff: cannot fuse this feed-forward"):
        FusedFeedForward(ff)
    assert dff.fuse_reason(nn.Linear(2, 2)) == "not a diffusers FeedForward"
    with pytest.raises(TypeError, match="ff: expected a diffusers FeedForward"):
        FusedFeedForward(nn.Linear(2, 2))


def test_unsupported_activation_module():
    ff = _quantize(_ff("gelu"))
    from diffusers.models.activations import ApproximateGELU

    ff.net[0] = ApproximateGELU(64, 256)
    ff.net[0].proj = QuantLinear.from_float(ff.net[0].proj, "w8a8")
    assert dff.fuse_reason(ff) == "activation ApproximateGELU has no fused epilogue (GELU, GELU tanh and GEGLU do)"


def test_final_dropout_layout_and_bad_input():
    ff = _quantize(_ff("gelu", final_dropout=True))
    fused = FusedFeedForward(ff)
    x = torch.randn(5, 64)
    with use_backend("torch"):
        assert torch.equal(fused(x), _loop(ff, x))
    with pytest.raises(ValueError, match="hidden_states: expected last dimension 64"):
        fused(torch.randn(5, 63))


# -- through diffaccel.patch ----------------------------------------------------------------------

def test_patch_fuses_unet_feed_forwards_and_unpatch_restores():
    model, inputs = tiny_models.unet_sd15()
    ref = tiny_models.output_of(model, inputs)
    plain = copy.deepcopy(model)
    report = diffaccel.patch(model, attention=False, quant="w8a8", solver=False)
    rows = [r for r in report.replaced if r.after.startswith("FusedFeedForward")]
    ffs = [n for n, m in plain.named_modules() if type(m).__name__ == "FeedForward"]
    assert sorted(r.name for r in rows) == sorted(ffs) and ffs
    assert all(r.after == "FusedFeedForward(geglu epilogue, writes the activation) via int8_ffn_up" for r in rows)
    assert "FusedFeedForward(geglu epilogue" in str(report)
    # the feed-forward containers are not held as float originals (they share the live net)
    assert not any(type(m).__name__ == "FeedForward" for m in model._diffaccel_patch.undo.originals)
    # same parameter and buffer names as quantizing without fusing ("*.ff" excluded)
    unfused = copy.deepcopy(plain)
    r2 = diffaccel.patch(unfused, attention=False, quant="w8a8", solver=False, exclude=("*.ff",))
    assert any(s.reason == "feed-forward not fused: excluded by filter" for s in r2.skipped)
    assert list(model.state_dict()) == list(unfused.state_dict())
    with use_backend("torch"):
        assert torch.equal(tiny_models.output_of(model, inputs), tiny_models.output_of(unfused, inputs))
    diffaccel.unpatch(model)
    assert all(type(m).__name__ != "FusedFeedForward" for m in model.modules())
    assert torch.equal(tiny_models.output_of(model, inputs), ref)


@pytest.mark.parametrize("name", ["flux", "sd3", "pixart", "wan"])
def test_transformer_feed_forwards_fuse_gelu_tanh(name):
    model, inputs = tiny_models.FACTORIES[name]()
    report = diffaccel.patch(model, attention=False, quant="w8a8", solver=False)
    rows = [r for r in report.replaced if r.after.startswith("FusedFeedForward")]
    assert rows, str(report)
    assert all(r.after.startswith("FusedFeedForward(gelu_tanh epilogue") for r in rows)
    with use_backend("triton"):
        tri = tiny_models.output_of(model, inputs)
    with use_backend("torch"):
        ref = tiny_models.output_of(model, inputs)
    assert _rel_l2(tri, ref) <= 1e-3


def test_lora_on_feed_forward_projections_runs_the_loop():
    """LoRA loaded after patching wraps net.0.proj / net.2 (peft, through diffaccel's LoRA layers): the
    fused wrapper then runs diffusers' loop, so the result is that of the unfused quantized model with
    the same adapter."""
    peft = pytest.importorskip("peft")
    model, inputs = tiny_models.unet_sd15()
    unfused = copy.deepcopy(model)
    diffaccel.patch(model, attention=False, quant="w8a8", solver=False)
    diffaccel.patch(unfused, attention=False, quant="w8a8", solver=False, exclude=("*.ff",))
    config = dict(r=4, lora_alpha=4, target_modules=["ff.net.0.proj", "ff.net.2"], init_lora_weights=False)
    for m in (model, unfused):
        torch.manual_seed(7)
        m.add_adapter(peft.LoraConfig(**config))
    fused = [m for m in model.modules() if isinstance(m, FusedFeedForward)]
    assert fused and all(dff.unfused_reason(f).startswith("net.0.proj is LoraLinear") for f in fused)
    with use_backend("torch"):
        assert torch.equal(tiny_models.output_of(model, inputs), tiny_models.output_of(unfused, inputs))


def test_failure_while_fusing_rolls_everything_back(monkeypatch):
    """A failure at the second feed-forward (after layers were quantized and one feed-forward fused)
    leaves the model as it was: same module objects, same outputs."""
    model, inputs = tiny_models.unet_sd15()
    ref = tiny_models.output_of(model, inputs)
    before = dict(model.named_modules())
    real = dff.FusedFeedForward
    calls = {"n": 0}

    def failing(ff):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real(ff)

    monkeypatch.setattr(dff, "FusedFeedForward", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        diffaccel.patch(model, quant="w8a8", solver=False)
    assert calls["n"] == 2
    assert dict(model.named_modules()) == before
    assert not diffaccel.is_patched(model)
    assert torch.equal(tiny_models.output_of(model, inputs), ref)


def test_hooks_on_the_feed_forward_itself_follow_the_fused_module():
    """A torch hook on the FeedForward container is carried to the fused module that takes its place
    (the same hook table): it fires on every call and its handle still removes it."""
    model, inputs = tiny_models.unet_sd15()
    names = [n for n, m in model.named_modules() if type(m).__name__ == "FeedForward"]
    calls = []
    handle = model.get_submodule(names[0]).register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    report = diffaccel.patch(model, attention=False, quant="w8a8", solver=False)
    fused = {r.name for r in report.replaced if r.after.startswith("FusedFeedForward")}
    assert fused == set(names)
    tiny_models.output_of(model, inputs)
    assert len(calls) == 1
    handle.remove()
    tiny_models.output_of(model, inputs)
    assert len(calls) == 1
    model.get_submodule(names[0]).register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    diffaccel.unpatch(model)
    tiny_models.output_of(model, inputs)  # registered while patched: the original has it too
    assert len(calls) == 2


@pytest.mark.parametrize("mode", ["dynamic", "static", "fp8"])
def test_fused_output_follows_autocast_like_the_loop(mode):
    """Under torch.autocast the loop's last Linear returns the autocast dtype; the fused path that
    writes the down projection's static codes returned the storage dtype (fp32 in a bf16 region)."""
    ff = _quantize(_ff("geglu"), spec="fp8" if mode == "fp8" else "w8a8",
                   static=(torch.tensor([0.03]), torch.tensor([0.02])) if mode == "static" else None)
    fused = FusedFeedForward(ff)
    assert fused.writes_codes == (mode == "static")
    x = torch.randn(2, 77, 64)
    with torch.no_grad(), use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        out, loop = fused(x), _loop(ff, x)
    assert out.dtype == loop.dtype == torch.bfloat16
    # the loop rounds the up projection to bf16 before the activation and the down projection's
    # quantizer, the fused epilogue does not: codes move by a step here and there (seen <= 1.6e-2)
    assert _rel_l2(out, loop) <= 3e-2
    with torch.no_grad(), use_backend("torch"):
        assert fused(x).dtype == torch.float32
