"""diffusers' step caches (First-Block Cache, Pyramid Attention Broadcast, TaylorSeer, MagCache) on
a patched backbone: enabled before or after `patch`, with attention alone or W8A8, a short sampling
loop gives what the unpatched model with the same cache gives, step by step, and the cache skips
the same calls (the hooks find the same modules: patch swaps processors, not Attention modules)."""
import pytest
import torch

import diffaccel
import tiny_models

hooks = pytest.importorskip("diffusers.hooks")

# fp32 on CPU: the patched attention differs from diffusers' by rounding order (measured 8e-8).
FP32_REL_L2 = 1e-5
# dynamic W8A8 (test_patch.QUANT_REL_L2); measured ~1e-3 on this Flux through the loop
W8A8_REL_L2 = 0.05
TIMESTEPS = (950, 800, 600, 400, 200)


def _flux(seed=0):
    """tiny Flux with 81 image tokens (over 64 rows, so the shared q/k/v quantization and the fused
    norms run) and a batch of 2"""
    model, _ = tiny_models.flux(seed)
    g = torch.Generator().manual_seed(123)
    n = 9
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(n)), torch.arange(float(n)), indexing="ij"),
                      -1).reshape(-1, 3)
    inputs = dict(hidden_states=torch.randn(2, n * n, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 32, generator=g),
                  pooled_projections=torch.randn(2, 16, generator=g), img_ids=ids, txt_ids=torch.zeros(6, 3))
    return model, inputs


def _config(kind, clock):
    if kind == "first_block":
        return hooks.FirstBlockCacheConfig(threshold=0.5)
    if kind == "pyramid":
        return hooks.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 900),
            current_timestep_callback=lambda: clock[0])
    if kind == "taylorseer":
        return hooks.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1,
                                           taylor_factors_dtype=torch.float32)
    if kind == "taylorseer_ff":  # on the feed-forwards, which W8A8 replaces by FusedFeedForward
        return hooks.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1,
                                           taylor_factors_dtype=torch.float32,
                                           cache_identifiers=[r"transformer_blocks\.\d+\.(ff|ff_context)"])
    assert kind == "magcache", kind
    return hooks.MagCacheConfig(threshold=0.5, max_skip_steps=2, retention_ratio=0.2,
                                num_inference_steps=len(TIMESTEPS), mag_ratios=[1.0, 1.0, 0.98, 0.97, 0.96])


def _drifting(inputs):
    """the latents of a 5-step loop"""
    noise = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(7))
    return [inputs["hidden_states"] + 0.03 * i * noise for i in range(len(TIMESTEPS))]


def _loop(model, inputs, clock, cached=True):
    """the backbone calls of a 5-step loop (latents drifting, timesteps falling), each in the cache
    context a diffusers pipeline would set"""
    outs = []
    for i, (x, t) in enumerate(zip(_drifting(inputs), TIMESTEPS)):
        clock[0] = t
        kw = dict(inputs, hidden_states=x, timestep=torch.full((2,), t / 1000), return_dict=False)
        with torch.no_grad():
            if not cached:
                outs.append(model(**kw)[0])
                continue
            with model.cache_context("cond", step_index=i, num_inference_steps=len(TIMESTEPS), timestep=t,
                                     sigma=t / 1000):
                outs.append(model(**kw)[0])
    return outs


def _rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("quant", [None, "w8a8"])
@pytest.mark.parametrize("order", ["cache_first", "patch_first"])
@pytest.mark.parametrize("kind", ["first_block", "pyramid", "taylorseer", "magcache"])
def test_caches_on_a_patched_backbone_match_the_unpatched_cached_model(kind, order, quant):
    clock = [TIMESTEPS[0]]
    reference, inputs = _flux()
    reference.enable_cache(_config(kind, clock))
    expected = _loop(reference, inputs, clock)
    plain = _loop(_flux()[0], inputs, clock, cached=False)
    # the cache is doing something: some step's output is not the uncached one
    assert any(not torch.allclose(e, p, rtol=0, atol=1e-6) for e, p in zip(expected, plain))

    model, _ = _flux()
    if order == "cache_first":
        model.enable_cache(_config(kind, clock))
    diffaccel.patch(model, quant=quant)
    if order == "patch_first":
        model.enable_cache(_config(kind, clock))
    got = _loop(model, inputs, clock)
    bound = FP32_REL_L2 if quant is None else W8A8_REL_L2
    assert [round(_rel_l2(g, e), 6) for g, e in zip(got, expected) if _rel_l2(g, e) >= bound] == []

    model.disable_cache()
    diffaccel.unpatch(model)
    fresh, _ = _flux()
    with torch.no_grad():
        kw = dict(inputs, timestep=torch.full((2,), 0.5))
        assert torch.equal(model(**kw, return_dict=False)[0], fresh(**kw, return_dict=False)[0])


def test_unpatch_under_a_cache_on_replaced_modules_says_how_to_remove_it():
    """A cache enabled after a W8A8 patch, hooking the feed-forwards diffaccel replaced: unpatch
    refuses (the restored FeedForward would lose the hook) and names diffusers' remedy, not only
    accelerate's (which leaves a diffusers hook in place); after disable_cache it restores exactly."""
    clock = [TIMESTEPS[0]]
    model, inputs = _flux()
    reference, _ = _flux()
    diffaccel.patch(model, quant="w8a8")
    model.enable_cache(_config("taylorseer_ff", clock))
    _loop(model, inputs, clock)
    with pytest.raises(RuntimeError, match=r"held by hooks attached after patch .* model\.disable_cache\(\)"):
        diffaccel.unpatch(model)
    assert diffaccel.is_patched(model)
    model.disable_cache()
    diffaccel.unpatch(model)
    with torch.no_grad():
        kw = dict(inputs, timestep=torch.full((2,), 0.5))
        assert torch.equal(model(**kw, return_dict=False)[0], reference(**kw, return_dict=False)[0])
