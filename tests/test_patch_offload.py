"""diffaccel.patch with accelerate's offload hooks (diffusers' enable_model_cpu_offload).

Model offload moves a whole backbone with ``module.to(device)`` before its forward and back
after, so a patched module is correct under it when every tensor it computes with is a registered
parameter or buffer (QuantLinear/QuantConv2d move their packed buffers keeping their dtypes), and
patch/unpatch keep working while the hooks sit on the top-level models.

diffusers refuses ``enable_model_cpu_offload()`` without an accelerator only when it has to guess
the device; with ``device="cpu"`` it attaches the same hooks, which is what the CPU tests use
(offloading to the same device: outputs must be bit-identical). The GPU test runs the real thing.

Sequential offload hooks every layer and keeps its weights on the meta device outside its own
forward; the CPU tests call accelerate's ``cpu_offload`` (what diffusers' method calls per component)
on the tiny backbones, the GPU test diffusers' method on the pipeline.
"""
import importlib

import pytest
import torch

import diffaccel
from diffaccel.integrations import reference as ref

peft = pytest.importorskip("peft")

PROMPTS = ["a handwritten digit three", "a handwritten digit seven"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _sample(pipe, steps=3):
    g = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=3.0, generator=g, output_type="latent")


def _pipeline(device="cpu"):
    pipe = ref.load_reference_pipeline("unet", device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _add_lora(unet, seed=1):
    torch.manual_seed(seed)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False),
                     adapter_name=f"lora{seed}")


def _has_offload_hook(module):
    return type(getattr(module, "_hf_hook", None)).__name__ == "CpuOffload"


def _unregistered_tensors(obj, where):
    """Tensor attributes of ``obj`` that are not its registered parameters/buffers: a device move
    of the owning model would leave them behind."""
    found = []
    for name, value in vars(obj).items():
        if name in ("_parameters", "_buffers", "_modules"):
            continue
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, torch.Tensor) for v in values):
            found.append(f"{where}.{name}")
    return found


def test_patched_modules_compute_only_with_registered_tensors():
    pipe = _pipeline()
    diffaccel.patch(pipe, quant="w8a8")
    _add_lora(pipe.unet)  # LoRA after patching: peft layers around the quantized ones
    kinds = set()
    bad = []
    for name, module in pipe.unet.named_modules():
        if type(module).__module__.startswith(("diffaccel", "peft")):
            kinds.add(type(module).__name__)
            bad += _unregistered_tensors(module, name)
        processor = getattr(module, "processor", None)
        if processor is not None and type(processor).__module__.startswith("diffaccel"):
            kinds.add(type(processor).__name__)
            bad += _unregistered_tensors(processor, f"{name}.processor")
    assert {"QuantLinear", "QuantConv2d", "LoraLinear", "DiffaccelAttnProcessor"} <= kinds, kinds
    assert not bad, bad
    # and all of them follow a device move of the backbone: everything sits in state_dict/buffers
    quant = [m for m in pipe.unet.modules() if type(m).__name__ in ("QuantLinear", "QuantConv2d")]
    names = {id(t) for t in pipe.unet.state_dict(keep_vars=True).values()}
    for m in quant:
        assert all(id(b) in names for b in m.buffers())


def test_offload_enabled_after_patch():
    pipe = _pipeline()
    original = _sample(pipe)
    diffaccel.patch(pipe, quant="w8a8")
    patched = _sample(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    assert _has_offload_hook(pipe.unet)
    assert torch.equal(_sample(pipe), patched)
    diffaccel.unpatch(pipe)  # under the hooks
    assert _has_offload_hook(pipe.unet)
    assert torch.equal(_sample(pipe), original)


def test_patch_and_unpatch_with_offload_hooks_attached():
    pipe = _pipeline()
    original = _sample(pipe)
    reference = _pipeline()
    diffaccel.patch(reference, quant="w8a8")
    _add_lora(reference.unet)
    expected = _sample(reference)

    pipe.enable_model_cpu_offload(device="cpu")
    hook = pipe.unet._hf_hook
    report = diffaccel.patch(pipe, quant="w8a8")
    assert report.by_part("quant") and report.by_part("attention")
    _add_lora(pipe.unet)
    assert pipe.unet._hf_hook is hook  # patching touches submodules, not the top-level hooks
    # (each pipeline call ends in maybe_free_model_hooks, which enables the offload afresh: on
    # the patched model from the second call on)
    assert torch.equal(_sample(pipe), expected)
    assert torch.equal(_sample(pipe), expected)
    hook = pipe.unet._hf_hook
    diffaccel.unpatch(pipe)
    assert pipe.unet._hf_hook is hook
    pipe.unet.delete_adapters("lora1")  # (diffusers re-attaches the offload hooks here)
    assert _has_offload_hook(pipe.unet)
    assert torch.equal(_sample(pipe), original)


def test_accelerate_cpu_offload_with_hook_moves_quantized_buffers():
    from accelerate import cpu_offload_with_hook

    pipe = _pipeline()
    diffaccel.patch(pipe.unet, quant="w8a8")
    unet = pipe.unet
    quant = next(m for m in unet.modules() if type(m).__name__ == "QuantLinear")
    dtypes = {k: v.dtype for k, v in quant.state_dict().items()}
    _, hook = cpu_offload_with_hook(unet, "cpu")
    x = torch.randn(1, 1, ref.IMAGE_SIZE, ref.IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    text = pipe.encode_prompt(PROMPTS[:1], "cpu")
    with torch.no_grad():
        out = unet(x, torch.tensor([500]), encoder_hidden_states=text).sample
    hook.offload()
    assert {k: v.dtype for k, v in quant.state_dict().items()} == dtypes  # packed codes kept their dtypes
    hook.remove()
    with torch.no_grad():
        assert torch.equal(unet(x, torch.tensor([500]), encoder_hidden_states=text).sample, out)
    diffaccel.unpatch(unet)


@pytest.mark.gpu
@pytest.mark.parametrize("with_lora", [False, True])
def test_enable_model_cpu_offload_on_cuda_matches_resident_pipeline(with_lora):
    """On a GPU: the patched pipeline with model offload (weights on the CPU between calls) gives
    the resident patched pipeline's output. Same kernels on the same device: expected identical;
    the 1e-6 relative bound only allows a nondeterministic reduction order."""
    resident, offloaded = _pipeline("cpu"), _pipeline("cpu")
    for p in (resident, offloaded):
        diffaccel.patch(p, quant="w8a8")  # both quantized on the CPU: the same codes
    resident.to("cuda")
    if with_lora:
        _add_lora(resident.unet)  # onto CUDA-resident quantized layers: peft must place it on CUDA
        _add_lora(offloaded.unet)  # onto offloaded (CPU) layers: the hook moves it with the model
        assert resident.unet.get_submodule(
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q").lora_A["lora1"].weight.is_cuda
    offloaded.enable_model_cpu_offload()
    expected = _sample(resident)
    out = _sample(offloaded)
    assert out.device.type == "cuda"
    assert ((out - expected).norm() / expected.norm()).item() < 1e-6
    quant = next(m for m in offloaded.unet.modules() if type(m).__name__ == "QuantLinear")
    assert quant.weight_q.device.type == "cpu" and quant.weight_q.dtype == torch.int8  # offloaded after the call
    diffaccel.unpatch(offloaded)
    diffaccel.unpatch(resident)
    if with_lora:
        for p in (offloaded, resident):
            p.unet.delete_adapters("lora1")
    out, expected = _sample(offloaded), _sample(resident)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-6


def test_layers_carrying_their_own_accelerate_hook_are_left_alone():
    """device_map dispatch / sequential offload hook individual layers; a replacement would drop
    the hook, so the preset path leaves such a layer alone (with the reason) and a recipe that
    names it is refused, the model unchanged."""
    import tiny_models
    from accelerate.hooks import ModelHook, add_hook_to_module

    model, inputs = tiny_models.unet_sd15()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    hooked = model.get_submodule(name)
    add_hook_to_module(hooked, ModelHook())
    before = tiny_models.output_of(model, inputs)
    report = diffaccel.patch(model, quant="w8a8", solver=False)
    assert any(s.name == name and "accelerate hook" in s.reason for s in report.skipped)
    assert model.get_submodule(name) is hooked
    assert report.by_part("quant")
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), before)

    patch_module = importlib.import_module("diffaccel.patch")  # (diffaccel.patch is the function)
    undo = patch_module._UndoLog()
    with pytest.raises(ValueError, match="target: .*to_q carries an accelerate hook"):
        patch_module._swap_module(model, name, torch.nn.Identity(), undo)
    assert model.get_submodule(name) is hooked and len(undo) == 0


def test_layers_with_a_diffusers_hook_are_left_alone():
    """diffusers' HookRegistry (layerwise casting, group offloading) replaces a layer's forward on the
    instance: the preset path leaves such a layer alone and says why; the others are quantized."""
    import tiny_models
    from diffusers.hooks import HookRegistry, ModelHook

    model, inputs = tiny_models.unet_sd15()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    hooked = model.get_submodule(name)
    HookRegistry.check_if_exists_or_initialize(hooked).register_hook(ModelHook(), "noop")
    before = tiny_models.output_of(model, inputs)
    report = diffaccel.patch(model, quant="w8a8", solver=False)
    why = {s.name: s.reason for s in report.skipped}
    assert why[name] == "its forward is wrapped on the instance (a diffusers hook), which a replacement would drop"
    assert model.get_submodule(name) is hooked
    assert report.by_part("quant")
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), before)


def _layerwise(model):
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)


def test_layerwise_casting_after_a_quantizing_patch_is_refused_by_unpatch():
    """enable_layerwise_casting after patch(quant=...) hooks the float layers that are left; unpatch put
    back float originals that were never hooked, and diffusers can neither remove the hook nor apply
    it again (the README's "enable it again" raised): a half-cast model, 0.085 off the casting
    reference. unpatch refuses now, restoring nothing. Enabled before patch, the hooked layers are
    left alone (the report's note says nothing was quantized) and unpatch is exact."""
    import tiny_models

    model, inputs = tiny_models.unet_sd15()
    diffaccel.patch(model, quant="w8a8", solver=False)
    _layerwise(model)
    patched = tiny_models.output_of(model, inputs)
    with pytest.raises(RuntimeError, match="layerwise casting was enabled after diffaccel.patch.*nothing was restored"):
        diffaccel.unpatch(model)
    assert diffaccel.is_patched(model) and torch.equal(tiny_models.output_of(model, inputs), patched)

    model, inputs = tiny_models.unet_sd15()
    _layerwise(model)
    before = tiny_models.output_of(model, inputs)
    report = diffaccel.patch(model, quant="w8a8", solver=False)
    assert not report.by_part("quant")
    assert any(n.startswith("quant: no layer was quantized; ") and "wrapped by hooks" in n for n in report.notes)
    assert "note: quant: no layer was quantized" in str(report)
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), before)

    model, _ = tiny_models.unet_sd15()  # attention only: unpatch restores processors, no float layers
    diffaccel.patch(model, solver=False)
    _layerwise(model)
    diffaccel.unpatch(model)


def test_torch_hooks_on_a_quantized_layer_keep_firing():
    """register_forward_(pre_)hook on a layer that patch quantizes: the QuantLinear shares its hook
    tables, so the hooks see every call (with the quantized output), handles still remove them, and
    unpatch gives the original its hooks back."""
    import tiny_models

    model, inputs = tiny_models.unet_sd15()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    seen = []
    pre = model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m).__name__)))
    post = model.get_submodule(name).register_forward_hook(lambda m, args, out: seen.append(("post", out.shape)))
    diffaccel.patch(model, attention=False, quant="w8a8", solver=False)
    assert type(model.get_submodule(name)).__name__ == "QuantLinear"
    tiny_models.output_of(model, inputs)
    assert [k for k, _ in seen] == ["pre", "post"] and seen[0][1] == "QuantLinear"
    pre.remove()
    seen.clear()
    diffaccel.unpatch(model)
    tiny_models.output_of(model, inputs)
    assert [k for k, _ in seen] == ["post"]
    post.remove()
    assert not model.get_submodule(name)._forward_hooks


def test_backward_and_state_dict_hooks_follow_a_quantized_layer():
    """Only the forward hook tables were shared: a full backward hook on a layer never fired while it
    was quantized, and backward / state-dict hooks registered while patched were lost at unpatch."""
    import tiny_models

    model, inputs = tiny_models.unet_sd15()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    grads = []
    model.get_submodule(name).register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0].shape))
    diffaccel.patch(model, attention=False, quant="w8a8", solver=False)
    layer = model.get_submodule(name)
    assert type(layer).__name__ == "QuantLinear"
    x = {k: (v.clone().requires_grad_(True) if k == "sample" else v) for k, v in inputs.items()}
    model(**x, return_dict=False)[0].sum().backward()
    assert len(grads) == 1
    layer.register_state_dict_post_hook(lambda m, sd, prefix, meta: sd.__setitem__(prefix + "tag", torch.ones(1)))
    diffaccel.unpatch(model)
    restored = model.get_submodule(name)
    assert type(restored) is torch.nn.Linear and f"{name}.tag" in model.state_dict()
    assert len(restored._backward_hooks) == 1 and restored._is_full_backward_hook


def test_patch_again_with_an_equal_spec_is_a_no_op():
    import tiny_models
    from diffaccel.quant import QuantSpec

    model, _ = tiny_models.unet_sd15()
    first = diffaccel.patch(model, quant=QuantSpec(), solver=False)
    modules = dict(model.named_modules())
    again = diffaccel.patch(model, quant=QuantSpec(), solver=False)  # equal, not the same object: was refused
    assert again is first and dict(model.named_modules()) == modules


# -- sequential offload (accelerate's cpu_offload on every layer, after patch) --------------------

def _like_accelerate_hooks(model):
    """No-op forward pre-hooks where accelerate's cpu_offload puts its hooks (modules holding tensors
    directly): the fused paths that read a layer's tensors without calling it step aside for both,
    so this reference runs the same kernels the offloaded model does."""
    return [m.register_forward_pre_hook(lambda *args: None) for m in model.modules()
            if any(t is not None for t in (*m._parameters.values(), *m._buffers.values()))]


@pytest.mark.parametrize("offload_buffers", [False, True])
@pytest.mark.parametrize("backbone,quant", [("unet_sd15", "w8a8"), ("unet_sdxl", "fp8"), ("sd3", "w8a8"),
                                            ("flux", "fp8"), ("wan", "w8a8")])
def test_sequential_offload_after_patch(backbone, quant, offload_buffers):
    """What enable_sequential_cpu_offload does to a patched backbone: every layer's weights sit on
    the meta device until its own forward loads them. The fused ResNet block (GroupNorm weights),
    the fused feed-forward and the shared q/k/v quantization (the projections' packed buffers, with
    offload_buffers) read them without calling the layer; they must run the layers unfused instead
    of failing on meta tensors (which they did)."""
    import tiny_models
    from accelerate import cpu_offload

    model, inputs = tiny_models.FACTORIES[backbone]()
    diffaccel.patch(model, quant=quant, solver=False)
    hooks = _like_accelerate_hooks(model)
    expected = tiny_models.output_of(model, inputs)
    for h in hooks:
        h.remove()
    cpu_offload(model, torch.device("cpu"), offload_buffers=offload_buffers)
    assert torch.equal(tiny_models.output_of(model, inputs), expected)
    assert any(p.is_meta for p in model.parameters())  # the weights really were offloaded
    if offload_buffers:
        quant_layer = next(m for m in model.modules() if type(m).__name__ in ("QuantLinear", "QuantConv2d"))
        assert quant_layer.weight_q.is_meta


def test_unpatch_refuses_while_offload_hooks_sit_on_patched_layers():
    """unpatch would drop a hook attached after patch with the layer it sits on (and move the float
    original to where the hook keeps the buffers: the meta device). It refuses, changing nothing;
    once the hooks are removed, unpatch restores the original bit for bit and patching again
    fuses what it fused before (accelerate leaves each layer's own forward bound on the instance:
    no wrapper)."""
    import tiny_models
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_submodules

    model, inputs = tiny_models.unet_sd15()
    original = tiny_models.output_of(model, inputs)
    report = diffaccel.patch(model, quant="w8a8", solver=False)
    assert any(r.after.startswith("FusedLayerNorm") for r in report.replaced)  # class-swapped norms
    patched = tiny_models.output_of(model, inputs)
    cpu_offload(model, torch.device("cpu"), offload_buffers=True)
    offloaded = tiny_models.output_of(model, inputs)
    with pytest.raises(RuntimeError, match=r"target: \d+ patched modules \(.*\) are held by hooks attached after patch"):
        diffaccel.unpatch(model)
    assert diffaccel.is_patched(model)
    assert torch.equal(tiny_models.output_of(model, inputs), offloaded)

    remove_hook_from_submodules(model)
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(tiny_models.output_of(model, inputs), patched)
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), original)
    again = diffaccel.patch(model, quant="w8a8", solver=False)
    assert [(r.name, r.after) for r in again.replaced] == [(r.name, r.after) for r in report.replaced]
    assert torch.equal(tiny_models.output_of(model, inputs), patched)
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), original)


def test_unpatch_refuses_while_a_parent_hook_offloads_patched_layers():
    """device_map dispatch with an offloaded block hooks the block, not its layers: between calls
    the quantized layers' buffers are on the meta device, and unpatch would restore the float
    originals there. It refuses; with the hook removed (its tensors back), it restores."""
    import tiny_models
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    model, inputs = tiny_models.unet_sd15()
    original = tiny_models.output_of(model, inputs)
    diffaccel.patch(model, quant="w8a8", solver=False)
    patched = tiny_models.output_of(model, inputs)
    block = model.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0")
    weights = {k: v.clone() for k, v in block.state_dict().items()}
    add_hook_to_module(block, AlignDevicesHook(execution_device="cpu", offload=True, offload_buffers=True,
                                               weights_map=weights, place_submodules=True))
    assert block.attn1.to_q.weight_q.is_meta and "forward" not in block.attn1.to_q.__dict__
    assert torch.equal(tiny_models.output_of(model, inputs), patched)  # the parent's hook loads the whole block
    with pytest.raises(RuntimeError, match=r"patched modules \(down_blocks\.0\.attentions\.0\.transformer_blocks"
                                           r"\.0\.attn1\.to_q, .*\) are held by hooks"):
        diffaccel.unpatch(model)
    remove_hook_from_module(block)
    assert not block.attn1.to_q.weight_q.is_meta
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), original)


@pytest.mark.parametrize("offload_type", ["leaf_level", "block_level"])
def test_group_offloading_after_patch(offload_type):
    """diffusers' group offloading (enable_group_offload) after patch, onto the same device here:
    leaf level hooks every layer, and the fused paths step aside as under sequential offload; block
    level hooks whole blocks, so within a block they still run. unpatch refuses under leaf-level
    hooks (until they are removed) and works under block-level ones (the groups move their modules'
    tensors, whatever the modules are, at each call without streams)."""
    import tiny_models
    from diffusers.hooks import HookRegistry, apply_group_offloading

    model, inputs = tiny_models.unet_sd15()
    original = tiny_models.output_of(model, inputs)
    diffaccel.patch(model, quant="w8a8", solver=False)
    fused = tiny_models.output_of(model, inputs)
    hooks = _like_accelerate_hooks(model)
    unfused = tiny_models.output_of(model, inputs)
    for h in hooks:
        h.remove()
    assert not torch.equal(fused, unfused)  # (the fused ResNet blocks round differently)
    kw = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    apply_group_offloading(model, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                           offload_type=offload_type, **kw)
    out = tiny_models.output_of(model, inputs)
    if offload_type == "leaf_level":
        assert torch.equal(out, unfused)
        with pytest.raises(RuntimeError, match="held by hooks attached after patch"):
            diffaccel.unpatch(model)
        # (no public call removes them: this is what diffusers does internally)
        HookRegistry.check_if_exists_or_initialize(model).remove_hook("group_offloading", recurse=True)
    else:
        assert torch.equal(out, fused)
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), original)


def test_sequential_offload_before_patch():
    """Offloaded layer by layer first: quant refuses (the weights are on the meta device) and leaves
    the model as it was; attention alone patches (processors hold no weights) and unpatches."""
    import tiny_models
    from accelerate import cpu_offload

    model, inputs = tiny_models.unet_sd15()
    original = tiny_models.output_of(model, inputs)
    diffaccel.patch(model, quant=None, solver=False)
    attention_only = tiny_models.output_of(model, inputs)
    diffaccel.unpatch(model)
    cpu_offload(model, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"target: .* is on the meta device"):
        diffaccel.patch(model, quant="w8a8", solver=False)
    assert not diffaccel.is_patched(model)
    assert torch.equal(tiny_models.output_of(model, inputs), original)
    assert diffaccel.patch(model, quant=None, solver=False).by_part("attention")
    assert torch.equal(tiny_models.output_of(model, inputs), attention_only)
    diffaccel.unpatch(model)
    assert torch.equal(tiny_models.output_of(model, inputs), original)


@pytest.mark.gpu
def test_enable_sequential_cpu_offload_on_cuda_matches_resident_pipeline():
    """On a GPU, diffusers' own enable_sequential_cpu_offload after patch: each layer's float weights
    come from the CPU for its forward only; the packed ones are buffers, which diffusers leaves
    resident for a backbone (it offloads buffers only for components with parameters of their own).
    Output: the resident patched pipeline's with the same fused paths stepping aside, within the
    1e-6 relative bound of the model-offload test. unpatch refuses under the hooks and restores the
    original once remove_all_hooks took them off."""
    resident, offloaded, original = _pipeline("cpu"), _pipeline("cpu"), _pipeline("cuda")
    for p in (resident, offloaded):
        diffaccel.patch(p, quant="w8a8")
    resident.to("cuda")
    _like_accelerate_hooks(resident.unet)
    offloaded.enable_sequential_cpu_offload()
    expected = _sample(resident)
    out = _sample(offloaded)
    assert out.device.type == "cuda"
    assert ((out - expected).norm() / expected.norm()).item() < 1e-6
    assert any(p.is_meta for p in offloaded.unet.parameters())
    quant = next(m for m in offloaded.unet.modules() if type(m).__name__ == "QuantLinear")
    assert quant.weight_q.device.type == "cuda" and quant.weight_q.dtype == torch.int8
    with pytest.raises(RuntimeError, match="held by hooks attached after patch"):
        diffaccel.unpatch(offloaded)
    offloaded.remove_all_hooks()
    diffaccel.unpatch(offloaded)
    offloaded.to("cuda")
    out, expected = _sample(offloaded), _sample(original)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-6
