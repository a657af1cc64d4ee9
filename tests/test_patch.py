"""diffaccel.patch / unpatch on every supported backbone: equivalence, bit-exact unpatch,
atomicity, idempotence and clear errors."""
import copy
import importlib
import logging
import re

import pytest
import torch

import diffaccel
from diffaccel.ops import use_backend

import tiny_models

BACKBONES = list(tiny_models.FACTORIES)
# Floating-point path (attention only, fp32 on CPU, torch reference backend): same math as
# diffusers' SDPA up to summation order.
FP32_RTOL = 1e-4
# Quantized presets on random-weight tiny models (no calibration, per-token dynamic acts): bound on
# the relative L2 error of the backbone output. Measured on these models (worst of the seven):
# w8a8 0.031, fp8 0.103, int4 g32 0.218 (the UNets; the transformers stay under 0.08), so
# the bounds below leave ~1.5x margin.
QUANT_REL_L2 = {"w8a8": 0.05, "fp8": 0.15, "w4a8-g32": 0.3, "w4a16-g32": 0.3}


def _spec(name):
    from diffaccel.quant import QuantSpec

    if name.endswith("-g32"):  # tiny models' K (32..64) is not divisible by the presets' group of 128
        act = "int8" if name.startswith("w4a8") else None
        return QuantSpec(weight_dtype="int4", weight_group_size=32, act_dtype=act, act_mode="dynamic",
                         act_symmetric=True)
    return name


def _rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _params_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# SDPA called by a module's own forward, not by an attention processor (patch replaces processors):
# Mochi's caption pool (time_embed.pooler, one query per sample)
SDPA_OUTSIDE_PROCESSORS = {"mochi": 1}


class _TorchSDPACalls(torch.overrides.TorchFunctionMode):
    """Counts the F.scaled_dot_product_attention calls torch itself computes: a redirect processor's
    own mode (pushed inside, so asked first) answers those diffaccel takes before they get here."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", BACKBONES)
def test_attention_patch_matches_and_unpatch_is_bit_exact(name):
    model, inputs = tiny_models.FACTORIES[name]()
    ref = tiny_models.output_of(model, inputs)
    report = diffaccel.patch(model, attention=True, solver=False)
    assert report.by_part("attention"), f"no attention module patched in {name}:\n{report}"
    with _TorchSDPACalls() as torch_sdpa:
        out = tiny_models.output_of(model, inputs)
    torch.testing.assert_close(out, ref, rtol=FP32_RTOL, atol=FP32_RTOL * ref.abs().max().item())
    if not any(s.part == "attention" for s in report.skipped):
        # every attention module reported replaced computes with diffaccel (a processor could pass
        # for replaced while its calls still reach torch: equal outputs would not show it)
        expected = SDPA_OUTSIDE_PROCESSORS.get(name, 0)
        assert torch_sdpa.calls == expected, f"{name}: {torch_sdpa.calls} SDPA calls computed by torch"
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), ref)
    assert not diffaccel.is_patched(model)


@pytest.mark.parametrize("preset", list(QUANT_REL_L2))
@pytest.mark.parametrize("name", BACKBONES)
def test_quant_preset_within_error_bound(name, preset):
    model, inputs = tiny_models.FACTORIES[name]()
    ref = tiny_models.output_of(model, inputs)
    report = diffaccel.patch(model, attention=False, quant=_spec(preset), solver=False)
    quantized = report.by_part("quant")
    assert quantized, str(report)
    # the modules really are the quantized layers, and the skipped ones say why
    for r in quantized:
        assert type(model.get_submodule(r.name)).__name__.startswith(("Quant", "Fused")), r
    assert all(s.reason for s in report.skipped)
    err = _rel_l2(tiny_models.output_of(model, inputs), ref)
    assert err < QUANT_REL_L2[preset], f"{name} {preset}: rel L2 {err:.4f}"
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), ref)


@pytest.mark.parametrize("name", ["unet_sd15", "unet_sdxl", "sd3", "flux"])
def test_fused_qkv_projections_patched(name):
    """After diffusers' ``fuse_qkv_projections()`` (a common step before torch.compile): the fused
    processors are replaced too, the fused projection layers quantized, and outputs stay within the
    same bounds as the unfused model's."""
    model, inputs = tiny_models.FACTORIES[name]()
    model.fuse_qkv_projections()
    ref = tiny_models.output_of(model, inputs)
    report = diffaccel.patch(model, attention=True, quant="w8a8", solver=False)
    assert not [s for s in report.skipped if s.part == "attention"], str(report)
    fused = {r.name.rsplit(".", 1)[-1] for r in report.by_part("quant")} & {"to_qkv", "to_kv", "to_added_qkv"}
    assert fused, str(report)
    assert _rel_l2(tiny_models.output_of(model, inputs), ref) < QUANT_REL_L2["w8a8"]
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), ref)


def test_unpatch_leaves_processors_set_after_patching(caplog):
    """fuse_qkv_projections() after patch sets diffusers' fused processors over diffaccel's: unpatch
    leaves those (the user's now) in place, says so, and restores everything else."""
    model, inputs = tiny_models.unet_sd15()
    ref = tiny_models.output_of(model, inputs)
    diffaccel.patch(model, solver=False)
    model.fuse_qkv_projections()
    with caplog.at_level(logging.WARNING, logger="diffaccel"):
        diffaccel.unpatch(model)
    assert {type(p).__name__ for p in model.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    assert "attention processor was replaced since patching (now FusedAttnProcessor2_0)" in caplog.text
    out = tiny_models.output_of(model, inputs)
    torch.testing.assert_close(out, ref, rtol=FP32_RTOL, atol=FP32_RTOL * ref.abs().max().item())


@pytest.mark.parametrize("name,kept", [
    ("zimage", {"t_embedder.mlp.0": "timestep", "t_embedder.mlp.2": "timestep", "all_x_embedder.2-1": "input/output",
                "all_final_layer.2-1.linear": "input/output", "cap_embedder.1": "input/output"}),
    ("flux", {"context_embedder": "input/output", "x_embedder": "input/output", "proj_out": "input/output"}),
    ("qwenimage", {"img_in": "input/output", "txt_in": "input/output"}),
    ("flux2", {"context_embedder": "input/output", "x_embedder": "input/output"}),
])
def test_presets_keep_each_models_io_and_timestep_layers_float(name, kept):
    """The data-free presets keep input/output layers (text-side input projections included) and
    timestep MLPs in floating point under each model's own names. (Z-Image's TimestepEmbedder reads
    mlp[0].weight.dtype: quantizing it broke the forward.)"""
    model, inputs = tiny_models.FACTORIES[name]()
    report = diffaccel.patch(model, attention=False, quant="w8a8", solver=False)
    why = {s.name: s.reason for s in report.skipped if s.part == "quant"}
    for layer, kind in kept.items():
        assert why.get(layer, "").startswith(kind), (layer, why.get(layer))
        assert type(model.get_submodule(layer)) in (torch.nn.Linear, torch.nn.Conv2d)
    assert torch.isfinite(tiny_models.output_of(model, inputs)).all()


def test_patch_is_idempotent_and_per_instance():
    a, inputs = tiny_models.unet_sd15()
    b = copy.deepcopy(a)
    r1 = diffaccel.patch(a, quant="w8a8", solver=False)
    modules_after_first = dict(a.named_modules())
    r2 = diffaccel.patch(a, quant="w8a8", solver=False)
    assert r2 is r1
    assert dict(a.named_modules()) == modules_after_first
    # the other instance of the same class is untouched
    assert not diffaccel.is_patched(b)
    assert all(type(m).__module__.startswith(("diffusers", "torch")) for m in b.modules())
    with pytest.raises(ValueError, match="already patched with other options"):
        diffaccel.patch(a, quant="w4a16", solver=False)


def test_patch_again_takes_processors_set_since(caplog):
    """Processors set after patching (set_attn_processor, load_ip_adapter, ...)
    run diffusers' attention; patching again with the same options patches them, bringing the report
    up to date, and unpatch still restores bit for bit, without warning that the processors were
    'replaced since patching' (it did, once per module: the first patch's undo entries found the
    processors the second one had put back)."""
    import logging

    from diffusers.models.attention_processor import AttnProcessor2_0

    model, inputs = tiny_models.unet_sd15()
    before = tiny_models.output_of(model, inputs)
    report = diffaccel.patch(model, quant="w8a8", solver=False)
    patched = tiny_models.output_of(model, inputs)
    n_attention, n_quant = len(report.by_part("attention")), len(report.by_part("quant"))
    model.set_attn_processor(AttnProcessor2_0())
    assert not torch.equal(tiny_models.output_of(model, inputs), patched)  # SDPA now: code flips downstream
    again = diffaccel.patch(model, quant="w8a8", solver=False)
    assert again is report and len(report.by_part("attention")) == n_attention
    assert len(report.by_part("quant")) == n_quant
    assert any(note.startswith(f"patched again: {n_attention} module(s)") for note in report.notes), report.notes
    assert {type(p).__name__ for p in model.attn_processors.values()} == {"DiffaccelAttnProcessor"}
    assert torch.equal(tiny_models.output_of(model, inputs), patched)
    notes = list(report.notes)
    assert diffaccel.patch(model, quant="w8a8", solver=False) is report and report.notes == notes  # nothing new
    with caplog.at_level(logging.WARNING, logger="diffaccel"):
        diffaccel.unpatch(model)  # the processors set in between are the ones put back
    assert not [r for r in caplog.records if "replaced since patching" in r.getMessage()]
    assert {type(p).__name__ for p in model.attn_processors.values()} == {"AttnProcessor2_0"}
    assert torch.equal(tiny_models.output_of(model, inputs), before)


def test_patch_again_reports_processors_it_cannot_take():
    from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

    model, inputs = tiny_models.unet_sd15()
    before = tiny_models.output_of(model, inputs)
    report = diffaccel.patch(model, solver=False)
    first = next(iter(model.attn_processors))
    sliced = first.removesuffix(".processor")
    assert sliced in {r.name for r in report.by_part("attention")}
    model.set_attn_processor({n: SlicedAttnProcessor(1) if n == first else p for n, p in model.attn_processors.items()})
    diffaccel.patch(model, solver=False)
    assert sliced not in {r.name for r in report.by_part("attention")}
    assert {s.name: s.reason for s in report.skipped}[sliced] == "SlicedAttnProcessor is not a supported attention processor"
    assert any("1 set since then are not supported" in note for note in report.notes), report.notes
    model.set_attn_processor(AttnProcessor2_0())  # (the sliced one: same math, other summation order)
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), before)


def test_attention_backend_chosen_after_patch_is_kept():
    """set_attention_backend(...) after patching re-points the dispatcher processors diffaccel installed:
    they then run the chosen backend, patching again reports them, and unpatch keeps the choice."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    model, inputs = tiny_models.flux()
    report = diffaccel.patch(model, solver=False)
    model.set_attention_backend("_native_math")
    diffaccel.patch(model, solver=False)
    assert not report.by_part("attention")
    assert all("chosen by the user" in s.reason for s in report.skipped if s.part == "attention")
    diffaccel.unpatch(model)
    backends = {p._attention_backend for p in model.attn_processors.values()}
    assert backends == {AttentionBackendName._NATIVE_MATH}


def _ip_adapter_state_dict(unet, embed_dim=16, seed=0):
    """A random IP-Adapter (the plain one: 4 image tokens) in the layout load_ip_adapter reads."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    image_proj = {"proj.weight": torch.randn(4 * cross, embed_dim, generator=g) * 0.1,
                  "proj.bias": torch.zeros(4 * cross), "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    layers, key = {}, 1
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            layers[f"{key}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.1
            layers[f"{key}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.1
            key += 2
    return {"image_proj": image_proj, "ip_adapter": layers}


@pytest.mark.parametrize("loaded", ["before_patch", "after_patch"])
def test_ip_adapter(loaded):
    """An IP-Adapter loaded before or after patching (diffusers' _load_ip_adapter_weights, what
    load_ip_adapter calls): its cross-attention processors hold weights and run diffusers' attention;
    self-attention stays diffaccel's. Loading after patch re-creates the kept processors as
    type(processor)(), which used to raise TypeError. fp32, attention only: 1e-5 of the unpatched
    model with the same adapter; unpatch bit-exact."""
    reference, inputs = tiny_models.unet_sd15()
    reference._load_ip_adapter_weights([_ip_adapter_state_dict(reference)])
    embeds = {"image_embeds": [torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(5))]}
    expected = tiny_models.output_of(reference, {**inputs, "added_cond_kwargs": embeds})

    model, _ = tiny_models.unet_sd15()
    if loaded == "before_patch":
        model._load_ip_adapter_weights([_ip_adapter_state_dict(model)])
    report = diffaccel.patch(model, solver=False)
    if loaded == "after_patch":
        model._load_ip_adapter_weights([_ip_adapter_state_dict(model)])
        assert diffaccel.patch(model, solver=False) is report
    kinds = {n.removesuffix(".processor"): type(p).__name__ for n, p in model.attn_processors.items()}
    assert {k for n, k in kinds.items() if n.endswith("attn1")} == {"DiffaccelAttnProcessor"}
    assert {k for n, k in kinds.items() if n.endswith("attn2")} == {"IPAdapterAttnProcessor2_0"}
    assert {r.name for r in report.by_part("attention")} == {n for n in kinds if n.endswith("attn1")}
    assert all(s.reason.startswith("IPAdapterAttnProcessor2_0 holds weights") for s in report.skipped
               if s.name.endswith("attn2"))
    got = tiny_models.output_of(model, {**inputs, "added_cond_kwargs": embeds})
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    diffaccel.unpatch(model)
    assert {type(p).__name__ for p in model.attn_processors.values()} == {"AttnProcessor2_0",
                                                                          "IPAdapterAttnProcessor2_0"}
    assert torch.equal(tiny_models.output_of(model, {**inputs, "added_cond_kwargs": embeds}), expected)


def test_int8_attention_survives_processors_rebuilt_by_diffusers():
    """The INT8 attention path is fixed by the processor's class, so diffusers re-creating processors
    as type(processor)() (load_ip_adapter after patch) keeps it: it used to be a per-instance setting,
    and the rebuilt self-attention processors silently ran float attention. Each rebuilt one gives the
    same output as the one it replaced; pickling and deepcopy keep the class and the path."""
    import copy
    import pickle

    from diffaccel.integrations import attention as A

    model, inputs = tiny_models.unet_sd15()
    diffaccel.patch(model, solver=False, attention_quant="int8")
    patched = tiny_models.output_of(model, inputs)
    procs = model.attn_processors
    assert {(type(p).__name__, p.quant) for p in procs.values()} == {("DiffaccelAttnProcessorInt8", "int8")}
    model.set_attn_processor({n: type(p)() for n, p in procs.items()})
    assert {(type(p).__name__, p.quant) for p in model.attn_processors.values()} == {
        ("DiffaccelAttnProcessorInt8", "int8")}
    assert torch.equal(tiny_models.output_of(model, inputs), patched)
    model._load_ip_adapter_weights([_ip_adapter_state_dict(model)])
    kinds = {n.removesuffix(".processor"): (type(p).__name__, getattr(p, "quant", None))
             for n, p in model.attn_processors.items()}
    assert {k for n, k in kinds.items() if n.endswith("attn1")} == {("DiffaccelAttnProcessorInt8", "int8")}
    one = next(iter(model.attn_processors.values()))
    for clone in (pickle.loads(pickle.dumps(one)), copy.deepcopy(one)):
        assert type(clone) is type(one) and clone.quant == "int8"
        assert type(clone.original).__name__ == "AttnProcessor2_0"
    assert A.processor_class(A.DiffaccelAttnProcessor, None) is A.DiffaccelAttnProcessor
    assert A.processor_class(A.DiffaccelAttnProcessor, "int8") is type(one)


def test_processors_build_without_arguments():
    """diffusers re-creates kept processors as type(processor)(): each stands for a new instance of the
    diffusers processor it replaces."""
    from diffaccel.integrations import attention as A

    for cls, stands_for in ((A.DiffaccelAttnProcessor, "AttnProcessor2_0"),
                            (A.DiffaccelJointAttnProcessor, "JointAttnProcessor2_0"),
                            (A.DiffaccelCogVideoXAttnProcessor, "CogVideoXAttnProcessor2_0")):
        made = cls()
        assert type(A.original_processor(made)).__name__ == stands_for and made.quant is None
        made = A.processor_class(cls, "int8")()
        assert type(A.original_processor(made)).__name__ == stands_for and made.quant == "int8"


def _count_diffaccel_attention(monkeypatch):
    from diffaccel.integrations import attention as A

    calls = {"n": 0}
    real = A.attention

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(A, "attention", counting)
    return calls


@pytest.mark.parametrize("attention_quant", [None, "int8"])
def test_dispatcher_routed_processors_survive_type_recreation(monkeypatch, attention_quant):
    """Flux's processors call diffusers' dispatcher; patching routed a copy of diffusers' own class.
    diffusers re-creates processors as type(processor)() (Flux's IP-Adapter load for the single
    blocks, unload for all): the re-created ones ran torch SDPA again, silently (2 diffaccel calls
    per forward, then 1, then 0), while the report and is_patched still said patched."""
    import pickle

    from diffusers.hooks._helpers import AttentionProcessorRegistry

    from diffaccel.integrations import attention as A

    model, inputs = tiny_models.flux()
    reference = tiny_models.output_of(model, inputs)
    calls = _count_diffaccel_attention(monkeypatch)
    diffaccel.patch(model, solver=False, attention_quant=attention_quant)
    patched = tiny_models.output_of(model, inputs)
    assert calls["n"] == 2
    model.set_attn_processor({n: type(p)() for n, p in model.attn_processors.items()})
    calls["n"] = 0
    assert torch.equal(tiny_models.output_of(model, inputs), patched) and calls["n"] == 2
    one = next(iter(model.attn_processors.values()))
    assert type(one).__name__ == "FluxAttnProcessor" and A.is_diffaccel_processor(one)
    AttentionProcessorRegistry.get(type(one))  # layer-skip guidance finds the class (a KeyError before)
    for clone in (pickle.loads(pickle.dumps(one)), copy.deepcopy(one)):
        assert type(clone) is type(one) and clone._attention_backend is one._attention_backend
    diffaccel.unpatch(model)
    for p in model.attn_processors.values():  # diffusers' class again, and so are its re-creations
        assert type(p).__module__.startswith("diffusers.") and p._attention_backend is None
        assert type(type(p)())._attention_backend is None
    calls["n"] = 0
    assert torch.equal(tiny_models.output_of(model, inputs), reference) and calls["n"] == 0


def test_classic_attn_processor_never_applies_the_qk_norms():
    """diffusers' AttnProcessor (the default with scale_qk=False, or set by the user) ignores the
    module's norm_q / norm_k; diffaccel's processor applied them (0.78 relative error). A processor
    re-created as type(processor)() stood for AttnProcessor2_0, dropping attn.scale (0.58)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from diffaccel.integrations import attention as A

    torch.manual_seed(0)
    for attn in (Attention(query_dim=32, heads=2, dim_head=16, qk_norm="rms_norm", scale_qk=False).eval(),
                 Attention(query_dim=32, heads=2, dim_head=16, qk_norm="layer_norm").eval()):
        attn.set_processor(AttnProcessor())
        x = torch.randn(2, 9, 32)
        with torch.no_grad():
            expected = attn(x)
            for make in (lambda p: A.make_processor(p, module=attn)[0], lambda p: type(p)()):
                attn.set_processor(make(attn.processor))
                assert type(A.original_processor(attn.processor)) is AttnProcessor
                torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_attention_modules_left_alone_are_reported():
    """Sana's self-attention is linear attention (no SDPA call): each such module is listed with the
    reason, while its cross-attention is patched."""
    model, _ = tiny_models.sana()
    report = diffaccel.patch(model, solver=False)
    why = {s.name: s.reason for s in report.skipped if s.part == "attention"}
    assert why and set(why.values()) == {"SanaLinearAttnProcessor2_0 is not a supported attention processor"}
    assert {n.rsplit(".", 1)[-1] for n in why} == {"attn1"}
    assert {r.name.rsplit(".", 1)[-1] for r in report.by_part("attention")} == {"attn2"}


def test_layers_whose_weight_their_parent_reads_stay_float():
    """HunyuanDiT's attention pool hands its projections' weights to F.multi_head_attention_forward:
    quantized, the forward raised. They are kept in floating point with the reason, calibration leaves
    them out (they never run as layers, so it used to fail with 'saw no input'), and the model runs."""
    model, inputs = tiny_models.hunyuan_dit()
    ref = tiny_models.output_of(model, inputs)
    pool = {f"time_extra_emb.pooler.{p}_proj" for p in "qkvc"}
    for preset in ("w8a8", "fp8"):
        report = diffaccel.patch(model, quant=preset, solver=False)
        why = {s.name: s.reason for s in report.skipped}
        assert {why[n] for n in pool} == {"HunyuanDiTAttentionPool.forward reads its weight directly; kept in "
                                          "floating point"}
        assert len(report.by_part("quant")) > 40
        assert _rel_l2(tiny_models.output_of(model, inputs), ref) < QUANT_REL_L2[preset]
        diffaccel.unpatch(model)
        assert torch.equal(tiny_models.output_of(model, inputs), ref)
    recipe = diffaccel.calibrate(model, [inputs], method="minmax", weight_bits=8, act_bits=8, progress=False)
    assert not pool & set(recipe.layers)
    diffaccel.patch(model, quant=recipe, solver=False)
    assert _rel_l2(tiny_models.output_of(model, inputs), ref) < QUANT_REL_L2["w8a8"]


def test_reading_a_quantized_layers_weight_names_it():
    model, _ = tiny_models.unet_sd15()
    report = diffaccel.patch(model, quant="w8a8", solver=False)
    name = report.by_part("quant")[0].name
    with pytest.raises(AttributeError, match=rf"has no float 'weight'.*exclude=\['{re.escape(name)}'\]"):
        model.get_submodule(name).weight
    # diffusers' fuse_qkv_projections reads every q/k/v weight: excluding the one named only moved the
    # error to the next; the message says to fuse before patching
    with pytest.raises(AttributeError, match=r"fuse_qkv_projections: fuse, then patch; or unpatch, fuse, patch again"):
        model.fuse_qkv_projections()
    diffaccel.unpatch(model)
    model.fuse_qkv_projections()
    assert any(r.name.endswith("attn1.to_qkv") for r in diffaccel.patch(model, quant="w8a8", solver=False).by_part("quant"))


def test_weight_reads_found_in_forward_source():
    from diffaccel.quant.calibrate.structure import _weights_read_by_forward

    class Reader(torch.nn.Module):
        def forward(self, x):
            y = x.to(self.mlp[0].weight.dtype) @ self.proj.weight.t()
            return y + self.block.inner.weight_q.sum() + self.norm.weight_scale  # not .weight itself

    assert _weights_read_by_forward(Reader) == {("mlp", "0"), ("proj",)}


def test_failed_patch_leaves_model_unchanged(monkeypatch):
    import diffaccel.nn as dnn

    model, inputs = tiny_models.unet_sd15()
    ref = tiny_models.output_of(model, inputs)
    before_modules = {n: m for n, m in model.named_modules()}
    before_procs = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    before_params = _params_snapshot(model)
    real = dnn.quantize_module
    calls = {"n": 0}

    def failing(module, spec, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected failure")
        return real(module, spec, **kw)

    monkeypatch.setattr(dnn, "quantize_module", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        diffaccel.patch(model, attention=True, quant="w8a8", solver=False)
    assert calls["n"] == 5
    assert {n: m for n, m in model.named_modules()} == before_modules
    assert {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")} == before_procs
    after = _params_snapshot(model)
    assert all(torch.equal(before_params[k], after[k]) for k in before_params)
    assert not diffaccel.is_patched(model)
    assert torch.equal(tiny_models.output_of(model, inputs), ref)


def test_w4_presets_skip_layers_with_reasons():
    model, inputs = tiny_models.unet_sd15()
    report = diffaccel.patch(model, attention=False, quant="w4a8", solver=False)
    assert any("group" in s.reason for s in report.skipped if s.part == "quant"), str(report)
    assert any(s.reason == "timestep embedding kept in floating point" for s in report.skipped)


def test_filter_and_exclude():
    model, _ = tiny_models.unet_sd15()
    report = diffaccel.patch(model, attention=False, quant="w8a8", solver=False,
                             filter_fn=lambda m, fqn: "up_blocks" not in fqn, exclude=["*.ff.*"])
    assert report.by_part("quant")
    assert not any("up_blocks" in r.name or ".ff." in r.name for r in report.by_part("quant"))
    assert any(s.reason == "excluded by filter" for s in report.skipped)


def test_report_table_and_logging(caplog):
    model, _ = tiny_models.unet_sd15()
    with caplog.at_level(logging.INFO, logger="diffaccel"):
        report = diffaccel.patch(model, quant="w8a8", solver=False)
    text = str(report)
    assert "replaced" in text and "left alone" in text and "conv_in" in text
    assert "input/output layer kept in floating point" in text
    assert any("diffaccel.patch" in rec.message for rec in caplog.records)


@pytest.mark.parametrize("preset, conv_op", [("w8a8", "int8_conv2d"), ("fp8", "fp8_conv2d"), ("w4a16", None)])
def test_report_names_the_op_and_backend_of_quantized_layers(preset, conv_op):
    from diffaccel.nn import FusedFeedForward, QuantConv2d, QuantLinear

    model, _ = tiny_models.unet_sd15()
    report = diffaccel.patch(model, quant=preset, solver=False)
    rows = {r.name: r for r in report.replaced if r.part == "quant"}
    assert rows and all(r.backend == "torch" for r in rows.values())  # the reference, on CPU
    linear_op = {"w8a8": "int8_linear", "fp8": "fp8_gemm", "w4a16": "weight_only_gemm"}[preset]
    fused = [n for n in rows if isinstance(model.get_submodule(n), FusedFeedForward)]
    # feed-forwards fuse their GEGLU into the up projection with int8 or fp8 activations
    assert bool(fused) == (preset != "w4a16")
    assert all(rows[n].after.endswith(f"via {'fp8' if preset == 'fp8' else 'int8'}_ffn_up") for n in fused)
    for name in rows:
        layer = model.get_submodule(name)
        if isinstance(layer, FusedFeedForward):
            assert layer.op_name == ("fp8_ffn_up" if preset == "fp8" else "int8_ffn_up")
        elif type(layer).__name__ == "FusedResnetBlock2D":  # int8 k x k convs only
            assert preset == "w8a8" and rows[name].after.endswith("via int8_conv2d")
        elif type(layer).__name__ == "FusedLayerNorm":  # norms in front of dynamically quantized projections
            assert preset != "w4a16" and rows[name].after.endswith("via layer_norm_quantize")
        elif isinstance(layer, QuantConv2d) and not layer.is_pointwise:
            assert layer.op_name == (conv_op or linear_op), name
        else:
            assert isinstance(layer, (QuantLinear, QuantConv2d)) and layer.op_name == linear_op, name
    with use_backend("triton"):  # a forced backend is what the report names
        again = diffaccel.patch(tiny_models.unet_sd15()[0], quant=preset, solver=False)
    assert {r.backend for r in again.replaced if r.part == "quant"} == {"triton"}


def test_keep_originals_false_frees_and_refuses_unpatch():
    model, inputs = tiny_models.unet_sd15()
    diffaccel.patch(model, quant="w8a8", solver=False, keep_originals=False)
    with pytest.raises(RuntimeError, match="keep_originals=False"):
        diffaccel.unpatch(model)


def test_disable_env_is_a_noop(monkeypatch, caplog):
    monkeypatch.setenv("DIFFACCEL_DISABLE", "1")
    model, inputs = tiny_models.unet_sd15()
    before = dict(model.named_modules())
    report = diffaccel.patch(model, quant="w8a8")
    assert "DIFFACCEL_DISABLE=1" in str(report)
    assert dict(model.named_modules()) == before and not diffaccel.is_patched(model)


def test_bad_inputs():
    model, _ = tiny_models.unet_sd15()
    with pytest.raises(TypeError, match="target"):
        diffaccel.patch(object())
    with pytest.raises(ValueError, match="w9a9"):
        diffaccel.patch(model, quant="w9a9")
    with pytest.raises(TypeError, match="quant"):
        diffaccel.patch(model, quant=3.5)
    with pytest.raises(ValueError, match="attention_quant"):
        diffaccel.patch(model, attention_quant="int4")
    assert not diffaccel.is_patched(model)
    diffaccel.unpatch(model)  # unpatching an unpatched model is a no-op


def test_meta_weights_are_refused_for_quant_and_fine_for_attention():
    """A model built without weights (accelerate's init_empty_weights) can't be quantized: the
    error names a parameter; attention-only patching holds no weights and works."""
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():
        model, _ = tiny_models.unet_sd15()
    with pytest.raises(ValueError, match=r"target: conv_in.weight is on the meta device \(weights not loaded"):
        diffaccel.patch(model, quant="w8a8", solver=False)
    assert not diffaccel.is_patched(model)
    assert diffaccel.patch(model, solver=False).by_part("attention")


def test_state_dict_round_trip_of_patched_model(tmp_path):
    from safetensors.torch import load_file, save_file

    model, inputs = tiny_models.unet_sd15()
    diffaccel.patch(model, quant="w8a8", solver=False)
    out = tiny_models.output_of(model, inputs)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "m.safetensors")
    other, _ = tiny_models.unet_sd15(seed=123)
    diffaccel.patch(other, quant="w8a8", solver=False)
    other.load_state_dict(load_file(tmp_path / "m.safetensors"))
    assert torch.equal(tiny_models.output_of(other, inputs), out)


def test_compile_fullgraph_patched_backbone():
    model, inputs = tiny_models.sd3()
    diffaccel.patch(model, quant="w8a8", solver=False)
    eager = tiny_models.output_of(model, inputs)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        out = compiled(**inputs, return_dict=False)[0]
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_triton_backend_through_patched_model():
    """The patched model really runs diffaccel's kernels: force Triton (interpreter) end to end."""
    model, inputs = tiny_models.pixart()
    ref = tiny_models.output_of(model, inputs)
    diffaccel.patch(model, quant="w8a8", solver=False)
    with use_backend("torch"):
        out_ref = tiny_models.output_of(model, inputs)
    with use_backend("triton"):
        out_tri = tiny_models.output_of(model, inputs)
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-4, atol=1e-4)
    assert _rel_l2(out_ref, ref) < QUANT_REL_L2["w8a8"]


def test_patched_model_follows_to_dtype():
    """model.to(dtype) after patching: packed low-bit buffers keep their dtype, outputs follow."""
    model, inputs = tiny_models.sd3()
    ref = tiny_models.output_of(model, inputs)
    diffaccel.patch(model, quant="w8a8", solver=False)
    model.to(torch.bfloat16)
    q = next(m for m in model.modules() if type(m).__name__ == "QuantLinear")
    assert q.weight_q.dtype == torch.int8
    bf16_inputs = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v)
                   for k, v in inputs.items()}
    out = tiny_models.output_of(model, bf16_inputs)
    assert out.dtype == torch.bfloat16
    assert _rel_l2(out, ref) < QUANT_REL_L2["w8a8"] + 0.02  # bf16 activations add ~1e-2
    diffaccel.unpatch(model)  # originals come back in the model's current dtype
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    plain, _ = tiny_models.sd3()
    plain.to(torch.bfloat16)
    assert torch.equal(tiny_models.output_of(model, bf16_inputs), tiny_models.output_of(plain, bf16_inputs))


def test_a_copy_of_a_patched_model_stays_patched_and_refuses_unpatch(tmp_path):
    """deepcopy / torch.save of a patched model: the copy runs patched. Its unpatch refuses, because
    the undo log's closures hold the original's modules (unpatching a deepcopy used to restore the
    original's layers and leave the copy quantized). The copy's guards check the copy itself."""
    dpatch = importlib.import_module("diffaccel.patch")  # (diffaccel.patch is the function)
    a, inputs = tiny_models.unet_sd15()
    original = tiny_models.output_of(a, inputs)
    diffaccel.patch(a, quant="w8a8", solver=False)
    patched = tiny_models.output_of(a, inputs)
    b = copy.deepcopy(a)
    torch.save(a, tmp_path / "a.pt")  # (the patch state used to hold lambdas: pickling failed)
    c = torch.load(tmp_path / "a.pt", weights_only=False)
    for dup in (b, c):
        assert diffaccel.is_patched(dup) and torch.equal(tiny_models.output_of(dup, inputs), patched)
        with pytest.raises(RuntimeError, match=r"a copy \(deepcopy or pickle\) of a patched model cannot be unpatched"):
            diffaccel.unpatch(dup)
        assert torch.equal(tiny_models.output_of(dup, inputs), patched)
        guard = vars(dup)["save_pretrained"]
        assert guard.owner is dup and guard.backbones == [dup]
        with pytest.raises(RuntimeError, match="save_pretrained: .* is a diffaccel quantized layer"):
            dup.save_pretrained(tmp_path / "dup")
    assert diffaccel.patch(b, quant="w8a8", solver=False) is dpatch.patch_report(b)  # same options: a no-op
    assert torch.equal(tiny_models.output_of(a, inputs), patched)  # the original untouched by all this
    diffaccel.unpatch(a)
    assert torch.equal(tiny_models.output_of(a, inputs), original)
    assert torch.equal(tiny_models.output_of(b, inputs), patched)


def test_fuse_qkv_after_patch_does_not_leak_diffaccel_processors_past_unpatch():
    """diffusers' fuse_qkv_projections keeps the processors it replaces (diffaccel's, when called
    after patch) in original_attn_processors; unfuse after unpatch used to put them back on the
    "unpatched" UNet. Unpatch rewrites that copy with the originals."""
    model, inputs = tiny_models.unet_sd15()
    before = tiny_models.output_of(model, inputs)
    diffaccel.patch(model, solver=False)
    model.fuse_qkv_projections()
    diffaccel.unpatch(model)
    model.unfuse_qkv_projections()
    assert {type(p).__name__ for p in model.attn_processors.values()} == {"AttnProcessor2_0"}
    assert torch.equal(tiny_models.output_of(model, inputs), before)


@pytest.mark.parametrize("change", ["float64", "channels_last", "half_float", "bf16_half", "train"])
def test_dtype_and_memory_format_set_after_a_quant_patch_reach_the_restored_layers(change):
    """model.to(torch.float64) / .to(memory_format=torch.channels_last) after patch(quant=...):
    unpatch restores the float layers in that dtype / memory format, so the model equals a
    never-patched one given the same change, bit for bit. (A cast to float64 used to look like no
    change to the quantized layers' probe, leaving the restored ones fp32 and the model unable to
    run; channels_last was dropped.) A chain of casts rounds the restored layers as it rounds the rest of
    the model: after .half().float() they used to be cast once, from their patch-time fp32 values
    (188 weights off). model.train() after patching reaches them too."""
    def apply(m):
        return {"float64": lambda: m.to(torch.float64), "channels_last": lambda: m.to(memory_format=torch.channels_last),
                "half_float": lambda: m.half().float(), "bf16_half": lambda: m.to(torch.bfloat16).half(),
                "train": lambda: m.train()}[change]()

    reference, inputs = tiny_models.unet_sd15()
    model, _ = tiny_models.unet_sd15()
    dtype = {"float64": torch.float64, "bf16_half": torch.float16}.get(change, torch.float32)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    expected = tiny_models.output_of(apply(reference), inputs)
    diffaccel.patch(model, quant="w8a8", solver=False)
    apply(model)
    diffaccel.unpatch(model)
    ref_state = reference.state_dict()
    assert {k: (v.dtype, torch.equal(v, ref_state[k])) for k, v in model.state_dict().items()} == {
        k: (v.dtype, True) for k, v in ref_state.items()}
    assert [m.training for m in model.modules()] == [m.training for m in reference.modules()]
    want = {n: (p.dtype, p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous())
            for n, p in reference.named_parameters()}
    assert {n: (p.dtype, p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous())
            for n, p in model.named_parameters()} == want
    assert torch.equal(tiny_models.output_of(model, inputs), expected)


def test_float64_model_runs_torch_attention_where_the_op_does_not_take_it():
    """A patched model cast to float64 (to debug it) runs: diffaccel attention takes fp16 / bf16 /
    fp32, so fp64 attention runs torch's SDPA as the unpatched model does, with a warning."""
    reference, inputs = tiny_models.unet_sd15()
    model, _ = tiny_models.unet_sd15()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    expected = tiny_models.output_of(reference.double(), inputs)
    diffaccel.patch(model, solver=False)
    model.double()
    got = tiny_models.output_of(model, inputs)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-12
    from diffaccel.integrations.attention import _DTYPE_FALLBACKS  # (warned once per process and dtype)
    assert torch.float64 in _DTYPE_FALLBACKS
