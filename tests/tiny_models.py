"""Tiny configs of the diffusers backbones diffaccel supports, with inputs, for CPU tests.

Each factory returns (model, inputs) with random weights under a fixed seed; `model(**inputs)`
runs in well under a second on CPU.
"""
import torch


def _g(seed):
    return torch.Generator().manual_seed(seed)


def unet_sd15(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    m = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(80, 160), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        # diffusers' UNet `attention_head_dim` is the head count: 2 heads -> head dims 40 and 80, as in SD1.5
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8).eval()
    g = _g(seed + 1)
    inputs = dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, 7, 32, generator=g))
    return m, inputs


def unet_sdxl(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    m = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(4, 8), transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=8, use_linear_projection=True).eval()
    g = _g(seed + 1)
    inputs = dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
                  added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g),
                                     "time_ids": torch.randn(2, 6, generator=g)})
    return m, inputs


def sd3(seed=0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                              pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 9, 32, generator=g),
                  pooled_projections=torch.randn(2, 16, generator=g), timestep=torch.tensor([10, 500]))
    return m, inputs


def flux(seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                               guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    g = _g(seed + 1)
    n_img, n_txt = 16, 6
    inputs = dict(hidden_states=torch.randn(1, n_img, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, n_txt, 32, generator=g),
                  pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                                     indexing="ij"), -1).reshape(-1, 3),
                  txt_ids=torch.zeros(n_txt, 3))
    return m, inputs


def pixart(seed=0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2,
                                 caption_channels=24, norm_num_groups=8).eval()
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 5, 24, generator=g), timestep=torch.tensor([10, 500]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return m, inputs


def dit(seed=0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                              norm_num_groups=8).eval()
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                  class_labels=torch.tensor([1, 7]))
    return m, inputs


def wan(seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                              out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                              rope_max_seq_len=32).eval()
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(1, 4, 3, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=g))
    return m, inputs


def cogvideox(seed=0):
    """CogVideoX with rotary embeddings (the 5B's layout): text and video tokens in one sequence."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                    time_embed_dim=32, text_embed_dim=32, num_layers=2, sample_width=8,
                                    sample_height=8, sample_frames=5, patch_size=2, temporal_compression_ratio=4,
                                    max_text_seq_length=6, use_rotary_positional_embeddings=True).eval()
    g = _g(seed + 1)
    frames, tokens = 2, 2 * 4 * 4  # latent frames; video tokens = frames * (8 / 2) * (8 / 2)
    angles = torch.rand(tokens, 16, generator=g) * 6.28
    inputs = dict(hidden_states=torch.randn(1, frames, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
                  image_rotary_emb=(angles.cos(), angles.sin()))
    return m, inputs


def qwenimage(seed=0):
    """QwenImage double-stream blocks: joint [txt, img] attention; padded text -> [B, 1, 1, Ltxt+Limg] bool mask."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    g = _g(seed + 1)
    n_txt = 7
    mask = torch.ones(2, n_txt, dtype=torch.long)
    mask[1, 4:] = 0  # second prompt padded
    inputs = dict(hidden_states=torch.randn(2, 16, 16, generator=g),  # 4x4 packed latent tokens
                  encoder_hidden_states=torch.randn(2, n_txt, 32, generator=g),
                  encoder_hidden_states_mask=mask, timestep=torch.tensor([0.5, 0.9]),
                  img_shapes=[[(1, 4, 4)]] * 2)
    return m, inputs


def hunyuan_video(seed=0):
    """HunyuanVideo: token refiner (self-attn, [B, 1, L, L] bool mask), dual- and single-stream blocks
    ([B, 1, 1, Limg+Ltxt] bool mask from encoder_attention_mask)."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                       num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
                                       patch_size=2, patch_size_t=1, guidance_embeds=False, text_embed_dim=32,
                                       pooled_projection_dim=16, rope_axes_dim=(4, 6, 6)).eval()
    g = _g(seed + 1)
    n_txt = 6
    mask = torch.ones(2, n_txt, dtype=torch.long)
    mask[1, 3:] = 0
    inputs = dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, n_txt, 32, generator=g), encoder_attention_mask=mask,
                  pooled_projections=torch.randn(2, 16, generator=g))
    return m, inputs


def ltx_video(seed=0):
    """LTX-Video: self-attn with RoPE; cross-attn with an additive [B, 1, Ltxt] mask -> [B, H, 1, Ltxt]."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    m = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                                   attention_head_dim=16, cross_attention_dim=32, num_layers=2,
                                   caption_channels=24).eval()
    g = _g(seed + 1)
    frames, h, w, n_txt = 2, 4, 4, 6
    mask = torch.ones(2, n_txt, dtype=torch.long)
    mask[1, 2:] = 0
    inputs = dict(hidden_states=torch.randn(2, frames * h * w, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, n_txt, 24, generator=g), timestep=torch.tensor([10, 500]),
                  encoder_attention_mask=mask, num_frames=frames, height=h, width=w,
                  rope_interpolation_scale=(1.0, 1.0, 1.0))
    return m, inputs


def zimage(seed=0):
    """Z-Image: lists of per-sample latents / captions of different lengths, padded into one batch with
    [B, L] bool padding masks (noise refiner, context refiner and the joint layers)."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    m = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2,
                                 n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                                 axes_dims=[8, 12, 12], axes_lens=[256, 32, 32]).eval()
    g = _g(seed + 1)
    inputs = dict(x=[torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 12, generator=g)],
                  t=torch.tensor([0.3, 0.7]),
                  cap_feats=[torch.randn(5, 32, generator=g), torch.randn(40, 32, generator=g)])
    return m, inputs


def flux2(seed=0):
    """Flux.2: dual-stream blocks (Flux2AttnProcessor) and parallel single-stream blocks
    (Flux2ParallelSelfAttnProcessor); 4-axis RoPE ids."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    m = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32,
                                mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False).eval()
    g = _g(seed + 1)
    n_txt = 6
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), torch.zeros(1),
                                         indexing="ij"), -1).reshape(-1, 4)
    txt_ids = torch.stack([torch.zeros(n_txt), torch.zeros(n_txt), torch.zeros(n_txt), torch.arange(float(n_txt))], -1)
    inputs = dict(hidden_states=torch.randn(2, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, n_txt, 32, generator=g), timestep=torch.tensor([0.2, 0.8]),
                  img_ids=img_ids, txt_ids=txt_ids)
    return m, inputs


def hunyuan_video15(seed=0, i2v=False):
    """HunyuanVideo 1.5: token refiner + dual-stream blocks; text (mllm + byT5 + image) tokens reordered
    valid-first with a [B, L] mask -> [B, 1, L, L] mask (query AND key valid). t2v (zero image_embeds):
    the image tokens are all masked, so their query rows are fully masked."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    m = HunyuanVideo15Transformer3DModel(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                         num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1,
                                         patch_size_t=1, text_embed_dim=32, text_embed_2_dim=24, image_embed_dim=16,
                                         rope_axes_dim=(4, 6, 6)).eval()
    g = _g(seed + 1)
    n_txt, n_txt2, n_img = 6, 5, 3
    mask, mask2 = torch.ones(2, n_txt, dtype=torch.long), torch.ones(2, n_txt2, dtype=torch.long)
    mask[1, 3:] = 0
    mask2[0, 2:] = 0
    image_embeds = torch.randn(2, n_img, 16, generator=g) if i2v else torch.zeros(2, n_img, 16)
    inputs = dict(hidden_states=torch.randn(2, 9, 2, 4, 4, generator=g), timestep=torch.tensor([10.0, 500.0]),
                  encoder_hidden_states=torch.randn(2, n_txt, 32, generator=g), encoder_attention_mask=mask,
                  encoder_hidden_states_2=torch.randn(2, n_txt2, 24, generator=g), encoder_attention_mask_2=mask2,
                  image_embeds=image_embeds)
    return m, inputs


def skyreels_v2(seed=0):
    """SkyReels-V2 (Wan-like) with num_frame_per_block=2: block-causal [1, 1, L, L] bool self-attention mask."""
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(seed)
    m = SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                     out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                     rope_max_seq_len=32, num_frame_per_block=2).eval()
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(1, 4, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=g))
    return m, inputs


def animatediff(seed=0):
    """AnimateDiff: the SD1.5-style UNet with a motion adapter (temporal attention over 8 frames)."""
    from diffusers import MotionAdapter, UNetMotionModel

    unet, _ = unet_sd15(seed)
    torch.manual_seed(seed + 2)
    adapter = MotionAdapter(block_out_channels=(80, 160), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=32)
    m = UNetMotionModel.from_unet2d(unet, adapter).eval()
    g = _g(seed + 1)
    inputs = dict(sample=torch.randn(1, 4, 8, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(8, 7, 32, generator=g))
    return m, inputs


def hunyuan_dit(seed=0):
    """HunyuanDiT: 4 layers (the last one has a long skip), qk-norm, 2D RoPE on self-attention."""
    from diffusers import HunyuanDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    torch.manual_seed(seed)
    m = HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2,
                          sample_size=8, hidden_size=32, num_layers=4, cross_attention_dim=32,
                          cross_attention_dim_t5=32, pooled_projection_dim=16, text_len=5, text_len_t5=6).eval()
    g = _g(seed + 1)
    mask, mask_t5 = torch.ones(2, 5), torch.ones(2, 6)
    mask[1, 3:] = 0
    mask_t5[1, 4:] = 0
    meta = torch.tensor([[64.0, 64.0, 8.0, 8.0, 0.0, 0.0]] * 2)
    rope = get_2d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), output_type="pt")
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10.0, 500.0]),
                  encoder_hidden_states=torch.randn(2, 5, 32, generator=g), text_embedding_mask=mask,
                  encoder_hidden_states_t5=torch.randn(2, 6, 32, generator=g), text_embedding_mask_t5=mask_t5,
                  image_meta_size=meta, style=torch.zeros(2, dtype=torch.long), image_rotary_emb=rope)
    return m, inputs


def mochi(seed=0):
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    m = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                                pooled_projection_dim=16, in_channels=4, text_embed_dim=32, time_embed_dim=16,
                                max_sequence_length=8).eval()
    g = _g(seed + 1)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    inputs = dict(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 32, generator=g), timestep=torch.tensor([10, 500]),
                  encoder_attention_mask=mask)
    return m, inputs


def sana(seed=0):
    """Sana: linear self-attention (SanaLinearAttnProcessor2_0) + cross-attention with a padded text mask."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    m = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                               num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                               cross_attention_dim=32, caption_channels=24, mlp_ratio=2.5, sample_size=8,
                               patch_size=1).eval()
    g = _g(seed + 1)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 24, generator=g), timestep=torch.tensor([10, 500]),
                  encoder_attention_mask=mask)
    return m, inputs


def auraflow(seed=0):
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(seed)
    m = AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                   num_single_dit_layers=1, attention_head_dim=16, num_attention_heads=2,
                                   joint_attention_dim=32, caption_projection_dim=32, out_channels=4,
                                   pos_embed_max_size=64).eval()
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 32, generator=g), timestep=torch.tensor([10, 500]))
    return m, inputs


def lumina2(seed=0, kv_heads=2):
    """Lumina2: GQA (4 query heads, 2 kv heads), RoPE, padded caption mask."""
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    m = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=64, num_layers=2,
                                  num_refiner_layers=1, num_attention_heads=4, num_kv_heads=kv_heads, multiple_of=16,
                                  axes_dim_rope=(4, 6, 6), axes_lens=(64, 32, 32), cap_feat_dim=32).eval()
    g = _g(seed + 1)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([0.2, 0.7]),
                  encoder_hidden_states=torch.randn(2, 6, 32, generator=g), encoder_attention_mask=mask)
    return m, inputs


def cogview4(seed=0):
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(seed)
    m = CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                                   num_attention_heads=2, text_embed_dim=32, time_embed_dim=32, condition_dim=8,
                                   pos_embed_max_size=16, sample_size=8, rope_axes_dim=(8, 8)).eval()
    g = _g(seed + 1)
    sizes = torch.tensor([[64.0, 64.0], [64.0, 64.0]])
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 32, generator=g), timestep=torch.tensor([10, 500]),
                  original_size=sizes, target_size=sizes, crop_coords=torch.zeros(2, 2))
    return m, inputs


def chroma(seed=0):
    """Chroma (Flux-like, pruned modulation); padded text -> [B, L] bool mask -> [B, 1, L, L] in the blocks."""
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    m = ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                 axes_dims_rope=(4, 6, 6), approximator_num_channels=8, approximator_hidden_dim=32,
                                 approximator_layers=1).eval()
    g = _g(seed + 1)
    n_txt, n_img = 6, 16
    mask = torch.ones(2, n_txt + n_img, dtype=torch.bool)
    mask[1, 4:n_txt] = False  # second prompt padded (the pipeline keeps image tokens)
    inputs = dict(hidden_states=torch.randn(2, n_img, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, n_txt, 32, generator=g), timestep=torch.tensor([0.2, 0.8]),
                  img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                                     indexing="ij"), -1).reshape(-1, 3),
                  txt_ids=torch.zeros(n_txt, 3), attention_mask=mask)
    return m, inputs


def allegro(seed=0):
    from diffusers import AllegroTransformer3DModel

    torch.manual_seed(seed)
    m = AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                  num_layers=2, cross_attention_dim=32, sample_width=8, sample_height=8,
                                  sample_frames=4, caption_channels=24).eval()
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(2, 4, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 24, generator=g), timestep=torch.tensor([10, 500]))
    return m, inputs


def latte(seed=0):
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(seed)
    m = LatteTransformer3DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=16,
                                num_attention_heads=2, caption_channels=24, in_channels=4, cross_attention_dim=32,
                                out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                                num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                                norm_eps=1e-6, video_length=3).eval()
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 24, generator=g), timestep=torch.tensor([10, 500]),
                  enable_temporal_attentions=True)
    return m, inputs


def stable_audio(seed=0):
    """Stable Audio DiT: GQA in self-attention (4 query heads, 2 kv heads), partial RoPE (half the head dim)."""
    from diffusers import StableAudioDiTModel
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    torch.manual_seed(seed)
    m = StableAudioDiTModel(sample_size=16, in_channels=8, num_layers=2, attention_head_dim=16, num_attention_heads=4,
                            num_key_value_attention_heads=2, out_channels=8, cross_attention_dim=32, time_proj_dim=16,
                            global_states_input_dim=24, cross_attention_input_dim=24).eval()
    g = _g(seed + 1)
    L = 16
    rope = get_1d_rotary_pos_embed(16 // 2, L + 1, use_real=True, repeat_interleave_real=False)
    inputs = dict(hidden_states=torch.randn(2, 8, L, generator=g), timestep=torch.tensor([0.3, 0.8]),
                  encoder_hidden_states=torch.randn(2, 6, 24, generator=g),
                  global_hidden_states=torch.randn(2, 1, 24, generator=g), rotary_embedding=rope)
    return m, inputs


def cosmos(seed=0):
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(seed)
    m = CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                 num_layers=2, mlp_ratio=2.0, text_embed_dim=32, adaln_lora_dim=8,
                                 max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
                                 concat_padding_mask=False, extra_pos_embed_type="learnable").eval()
    # (concat_padding_mask=True needs torchvision, not installed here)
    g = _g(seed + 1)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    inputs = dict(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, 6, 32, generator=g), attention_mask=mask, fps=30)
    return m, inputs


def hidream(seed=0):
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    m = HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                       num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                       caption_channels=[16, 8], text_emb_dim=16, num_routed_experts=2,
                                       num_activated_experts=2, axes_dims_rope=(8, 4, 4), max_resolution=(16, 16),
                                       llama_layers=(0, 1), force_inference_output=True).eval()
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timesteps=torch.tensor([10, 500]),
                  encoder_hidden_states_t5=torch.randn(2, 6, 16, generator=g),
                  encoder_hidden_states_llama3=torch.randn(2, 2, 6, 8, generator=g),
                  pooled_embeds=torch.randn(2, 16, generator=g))
    return m, inputs


def ltx2(seed=0):
    """LTX-2: video and audio streams, self/cross attention and audio<->video cross-modal attention."""
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(seed)
    m = LTX2VideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                                    num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                                    audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
                                    audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=1,
                                    caption_channels=24, rope_double_precision=False).eval()
    g = _g(seed + 1)
    frames, h, w, n_audio, n_txt = 2, 4, 4, 5, 6
    mask = torch.ones(2, n_txt, dtype=torch.bool)
    mask[1, 3:] = False
    inputs = dict(hidden_states=torch.randn(2, frames * h * w, 4, generator=g),
                  audio_hidden_states=torch.randn(2, n_audio, 4, generator=g),
                  encoder_hidden_states=torch.randn(2, n_txt, 24, generator=g),
                  audio_encoder_hidden_states=torch.randn(2, n_txt, 24, generator=g),
                  timestep=torch.tensor([10.0, 500.0]), encoder_attention_mask=mask, num_frames=frames, height=h,
                  width=w, audio_num_frames=n_audio, fps=25.0)
    return m, inputs


# -- newer backbones (diffusers 0.4x) ------------------------------------------------------------

def _ids4(t, h, w, l=0):
    return torch.stack(torch.meshgrid(torch.full((1,), float(t)), torch.arange(float(h)), torch.arange(float(w)),
                                      torch.full((1,), float(l)), indexing="ij"), -1).reshape(-1, 4)


def _unzero(m, seed=0, std=0.05):
    """Re-draw parameters that diffusers zero-initialises (final projections, adaLN tables): with them at 0
    the output would be constant and the comparisons meaningless."""
    g = _g(seed + 100)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return m


def flux3(seed=0, cond=True):
    """Flux.3: per-mode blocks (txt / image / image_cond self-attn) then joint single blocks; 4-axis RoPE."""
    from diffusers import Flux3Transformer2DModel

    torch.manual_seed(seed)
    m = Flux3Transformer2DModel(in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=1,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                timestep_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4)).eval()
    g = _g(seed + 1)
    n_txt = 6
    txt_ids = torch.stack([torch.zeros(n_txt), torch.zeros(n_txt), torch.zeros(n_txt), torch.arange(float(n_txt))], -1)
    inputs = dict(hidden_states=torch.randn(2, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, n_txt, 32, generator=g), timestep=torch.tensor([0.2, 0.8]),
                  img_ids=_ids4(0, 4, 4), txt_ids=txt_ids)
    if cond:
        inputs.update(image_cond_hidden_states=torch.randn(2, 9, 16, generator=g), image_cond_ids=_ids4(1, 3, 3))
    return m, inputs


def qwenimage21(seed=0):
    """Qwen-Image 2.1: single-stream, block-causal prefill (one dispatcher call per segment, backend=None),
    text + a 2x2 condition image + the 4x4 target image, padded prompt."""
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(seed)
    m = QwenImage21Transformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=2,
                                      attention_head_dim=16, num_attention_heads=2, context_in_dim=32, mlp_ratio=2,
                                      axes_dims_rope=(4, 6, 6)).eval()
    g = _g(seed + 1)
    # VLM sequence: 3 text, 1 condition-image slot (2x2 tokens), 2 text; then 4 target slots (4x4 tokens)
    n_txt = 6
    img_mask = torch.tensor([[False, False, False, True, False, False] + [True] * 4] * 2)
    txt_mask = torch.ones(2, n_txt, dtype=torch.bool)
    txt_mask[1, 5:] = False
    inputs = dict(hidden_states=torch.randn(2, 4 + 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, n_txt, 32, generator=g), timestep=torch.tensor([0.3, 0.7]),
                  img_shapes=[[(1, 2, 2), (1, 4, 4)]] * 2, img_mask=img_mask, encoder_hidden_states_mask=txt_mask)
    return m, inputs


def krea2(seed=0):
    """Krea 2: GQA (4 q / 2 kv heads, repeated before the dispatcher), gated attention, text fusion blocks
    (layer-wise attention across tapped encoder layers + refiners with a padding mask)."""
    from diffusers import Krea2Transformer2DModel

    torch.manual_seed(seed)
    m = Krea2Transformer2DModel(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=96, timestep_embed_dim=32,
                                text_hidden_dim=32, num_text_layers=3, text_num_attention_heads=2,
                                text_num_key_value_heads=2, text_intermediate_size=64, num_layerwise_text_blocks=1,
                                num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6)).eval()
    _unzero(m, seed)
    g = _g(seed + 1)
    n_txt = 6
    mask = torch.ones(2, n_txt, dtype=torch.bool)
    mask[1, 4:] = False
    txt_pos = torch.stack([torch.arange(float(n_txt)), torch.zeros(n_txt), torch.zeros(n_txt)], -1)
    img_pos = torch.stack(torch.meshgrid(torch.full((1,), float(n_txt)), torch.arange(4.0), torch.arange(4.0),
                                         indexing="ij"), -1).reshape(-1, 3)
    inputs = dict(hidden_states=torch.randn(2, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, n_txt, 3, 32, generator=g), timestep=torch.tensor([0.3, 0.7]),
                  position_ids=torch.cat([txt_pos, img_pos]), encoder_attention_mask=mask)
    return m, inputs


def ideogram4(seed=0):
    """Ideogram 4: one packed sequence of LLM tokens + image tokens, segment-id block-diagonal [B, 1, L, L] mask
    (two packed samples in the second row), interleaved MRoPE."""
    from diffusers import Ideogram4Transformer2DModel

    torch.manual_seed(seed)
    m = Ideogram4Transformer2DModel(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                    intermediate_size=64, adaln_dim=16, llm_features_dim=24, rope_theta=10000,
                                    mrope_section=(4, 2, 2)).eval()
    _unzero(m, seed)
    g = _g(seed + 1)
    n_txt, n_img = 5, 16
    L = n_txt + n_img
    indicator = torch.tensor([[3] * n_txt + [2] * n_img] * 2)
    segment_ids = torch.zeros(2, L, dtype=torch.long)
    segment_ids[1, 10:] = 1  # second row: two packed segments
    pos_t = torch.arange(float(L))
    hh, ww = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    pos = torch.stack([pos_t, pos_t.clone(), pos_t.clone()], -1)
    pos[n_txt:, 1] = hh.flatten() + n_txt
    pos[n_txt:, 2] = ww.flatten() + n_txt
    inputs = dict(hidden_states=torch.randn(2, L, 16, generator=g), timestep=torch.tensor([0.3, 0.7]),
                  encoder_hidden_states=torch.randn(2, L, 24, generator=g),
                  position_ids=pos.long()[None].expand(2, -1, -1), segment_ids=segment_ids, indicator=indicator)
    return m, inputs


def ernie_image(seed=0):
    """ERNIE-Image: sequence-first single-stream blocks, [B, 1, 1, L] text padding mask; zero-init output."""
    from diffusers import ErnieImageTransformer2DModel

    torch.manual_seed(seed)
    m = ErnieImageTransformer2DModel(hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64,
                                     in_channels=4, out_channels=4, patch_size=2, text_in_dim=24, rope_theta=256,
                                     rope_axes_dim=(4, 6, 6)).eval()
    _unzero(m, seed)
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10.0, 500.0]),
                  text_bth=torch.randn(2, 6, 24, generator=g), text_lens=torch.tensor([6, 3]))
    return m, inputs


def _ids3(t, h, w):
    return torch.stack(torch.meshgrid(torch.full((1,), float(t)), torch.arange(float(h)), torch.arange(float(w)),
                                      indexing="ij"), -1).reshape(-1, 3)


def longcat_image(seed=0):
    """LongCat-Image: Flux-like dual- and single-stream blocks, 3-axis RoPE ids."""
    from diffusers import LongCatImageTransformer2DModel

    torch.manual_seed(seed)
    m = LongCatImageTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       pooled_projection_dim=32, axes_dims_rope=[4, 6, 6]).eval()
    g = _g(seed + 1)
    n_txt = 6
    txt_ids = torch.stack([torch.zeros(n_txt), torch.arange(float(n_txt)), torch.arange(float(n_txt))], -1)
    inputs = dict(hidden_states=torch.randn(2, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, n_txt, 32, generator=g), timestep=torch.tensor([0.2, 0.8]),
                  img_ids=_ids3(1, 4, 4), txt_ids=txt_ids)
    return m, inputs


def ovis_image(seed=0):
    """Ovis-Image: Flux-like dual- and single-stream blocks (no pooled text), 3-axis RoPE ids."""
    from diffusers import OvisImageTransformer2DModel

    torch.manual_seed(seed)
    m = OvisImageTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    axes_dims_rope=(4, 6, 6)).eval()
    g = _g(seed + 1)
    n_txt = 6
    inputs = dict(hidden_states=torch.randn(2, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, n_txt, 32, generator=g), timestep=torch.tensor([0.2, 0.8]),
                  img_ids=_ids3(0, 4, 4), txt_ids=torch.zeros(n_txt, 3))
    return m, inputs


def hunyuan_image(seed=0):
    """HunyuanImage 2.1: token refiner ([B, 1, L, L] mask), dual/single-stream blocks with [B, 1, 1, L] padding
    mask, byT5 glyph tokens reordered valid-first."""
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(seed)
    m = HunyuanImageTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                       num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
                                       patch_size=(2, 2), text_embed_dim=32, text_embed_2_dim=24,
                                       rope_axes_dim=(8, 8)).eval()
    g = _g(seed + 1)
    mask, mask2 = torch.ones(2, 6, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    mask2[0, 2:] = 0
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10.0, 500.0]),
                  encoder_hidden_states=torch.randn(2, 6, 32, generator=g), encoder_attention_mask=mask,
                  encoder_hidden_states_2=torch.randn(2, 5, 24, generator=g), encoder_attention_mask_2=mask2)
    return m, inputs


def kandinsky5(seed=0):
    """Kandinsky 5 (batch 1, channels-last video): text encoder blocks (self-attn, 1D RoPE), visual decoder
    blocks (self-attn 3D RoPE + cross-attn to text). Zero-init modulations re-drawn. return_dict=False returns
    the tensor itself, so output_of reads sample [0]."""
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(seed)
    m = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=32, in_text_dim2=24, time_dim=32, out_visual_dim=4,
                                     patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1,
                                     num_visual_blocks=2, axes_dims=(4, 6, 6)).eval()
    _unzero(m, seed)
    g = _g(seed + 1)
    T, H, W, n_txt = 2, 8, 8, 6
    inputs = dict(hidden_states=torch.randn(1, T, H, W, 4, generator=g),
                  encoder_hidden_states=torch.randn(1, n_txt, 32, generator=g), timestep=torch.tensor([500.0]),
                  pooled_projections=torch.randn(1, 24, generator=g),
                  visual_rope_pos=(torch.arange(T), torch.arange(H // 2), torch.arange(W // 2)),
                  text_rope_pos=torch.arange(n_txt))
    return m, inputs


def sana_video(seed=0):
    """Sana-Video: linear self-attention with Wan RoPE + cross-attention with a padded text mask."""
    from diffusers import SanaVideoTransformer3DModel

    torch.manual_seed(seed)
    m = SanaVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                    num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                    cross_attention_dim=32, caption_channels=24, mlp_ratio=2.5, sample_size=8,
                                    patch_size=(1, 2, 2), rope_max_seq_len=32).eval()
    g = _g(seed + 1)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    inputs = dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 24, generator=g), timestep=torch.tensor([10, 500]),
                  encoder_attention_mask=mask)
    return m, inputs


def wan_vace(seed=0):
    """Wan VACE: Wan blocks + VACE control blocks (self/cross attention, Wan RoPE)."""
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(seed)
    m = WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                  rope_max_seq_len=32, vace_layers=[0, 1], vace_in_channels=8).eval()
    _unzero(m, seed)  # the VACE blocks' proj_out are zero-init
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(1, 4, 3, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
                  control_hidden_states=torch.randn(1, 8, 3, 8, 8, generator=g))
    return m, inputs


def helios(seed=0, history=True):
    """Helios: Wan-like blocks with guidance cross-attn, multi-term memory (short / mid / long history latents
    prepended, history key scaling)."""
    from diffusers import HeliosTransformer3DModel

    torch.manual_seed(seed)
    m = HeliosTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                 rope_dim=(4, 6, 6)).eval()
    _unzero(m, seed)
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
                  indices_hidden_states=torch.tensor([[8, 9]]))
    if history:
        inputs.update(latents_history_short=torch.randn(1, 4, 2, 8, 8, generator=g),
                      indices_latents_history_short=torch.tensor([[6, 7]]),
                      latents_history_mid=torch.randn(1, 4, 2, 8, 8, generator=g),
                      indices_latents_history_mid=torch.tensor([[4, 5]]),
                      latents_history_long=torch.randn(1, 4, 4, 8, 8, generator=g),
                      indices_latents_history_long=torch.tensor([[0, 1, 2, 3]]))
    return m, inputs


def bria(seed=0):
    """Bria 3.2: Flux-like dual/single-stream blocks."""
    from diffusers import BriaTransformer2DModel

    torch.manual_seed(seed)
    m = BriaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6]).eval()
    g = _g(seed + 1)
    n_txt = 6
    inputs = dict(hidden_states=torch.randn(2, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, n_txt, 32, generator=g), timestep=torch.tensor([0.2, 0.8]),
                  img_ids=_ids3(0, 4, 4), txt_ids=torch.zeros(n_txt, 3))
    return m, inputs


def bria_fibo(seed=0):
    """Bria FIBO: Flux-like blocks, per-block text-encoder-layer projections concatenated into the context."""
    from diffusers import BriaFiboTransformer2DModel

    torch.manual_seed(seed)
    m = BriaFiboTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   axes_dims_rope=[4, 6, 6], text_encoder_dim=24).eval()
    g = _g(seed + 1)
    n_txt = 6
    inputs = dict(hidden_states=torch.randn(2, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, n_txt, 32, generator=g),
                  text_encoder_layers=[torch.randn(2, n_txt, 24, generator=g) for _ in range(2)],
                  timestep=torch.tensor([0.2, 0.8]), img_ids=_ids3(0, 4, 4), txt_ids=torch.zeros(n_txt, 3))
    return m, inputs


def glm_image(seed=0):
    """GLM-Image: joint [txt, img] attention, RoPE on the image part, padded text -> [B, 1, L, L] *float* 0/1
    mask (diffusers passes it to SDPA as an additive mask)."""
    from diffusers import GlmImageTransformer2DModel

    torch.manual_seed(seed)
    m = GlmImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                                   num_attention_heads=2, text_embed_dim=24, time_embed_dim=32, condition_dim=8,
                                   prior_vq_quantizer_codebook_size=64).eval()
    g = _g(seed + 1)
    mask = torch.ones(2, 6)
    mask[1, 3:] = 0
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 24, generator=g),
                  prior_token_id=torch.randint(0, 64, (2, 16), generator=g),
                  prior_token_drop=torch.tensor([False, True]), timestep=torch.tensor([10, 500]),
                  target_size=torch.tensor([[64.0, 64.0]] * 2), crop_coords=torch.zeros(2, 2), attention_mask=mask)
    return m, inputs


def prx(seed=0):
    """PRX: image queries attend to [txt, img] keys; [B, L_txt] text mask -> [B, 1, 1, L] bool."""
    from diffusers import PRXTransformer2DModel

    torch.manual_seed(seed)
    m = PRXTransformer2DModel(in_channels=4, patch_size=2, context_in_dim=24, hidden_size=32, mlp_ratio=2.0,
                              num_heads=2, depth=2, axes_dim=[8, 8]).eval()
    _unzero(m, seed)
    g = _g(seed + 1)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([0.2, 0.8]),
                  encoder_hidden_states=torch.randn(2, 6, 24, generator=g), attention_mask=mask)
    return m, inputs


def cogview3plus(seed=0):
    """CogView3-Plus: joint [txt, img] attention (CogVideoXAttnProcessor2_0-style, no RoPE), sincos pos-embed."""
    from diffusers import CogView3PlusTransformer2DModel

    torch.manual_seed(seed)
    m = CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                       num_attention_heads=2, out_channels=4, text_embed_dim=32, time_embed_dim=32,
                                       condition_dim=8, pos_embed_max_size=16, sample_size=8).eval()
    g = _g(seed + 1)
    sizes = torch.tensor([[64.0, 64.0], [64.0, 64.0]])
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 32, generator=g), timestep=torch.tensor([10, 500]),
                  original_size=sizes, target_size=sizes, crop_coords=torch.zeros(2, 2))
    return m, inputs


def easyanimate(seed=0):
    """EasyAnimate V5.1: one MMDiT block (separate text/vision qkv, joint attention) + one non-MMDiT block,
    3D RoPE on the video part, text + T5 tokens."""
    from diffusers import EasyAnimateTransformer3DModel

    torch.manual_seed(seed)
    m = EasyAnimateTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                      patch_size=2, sample_width=8, sample_height=8, num_layers=2, mmdit_layers=1,
                                      time_embed_dim=32, text_embed_dim=32, text_embed_dim_t5=24).eval()
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, 6, 32, generator=g),
                  encoder_hidden_states_t5=torch.randn(2, 5, 24, generator=g))
    return m, inputs


def consisid(seed=0):
    """ConsisID (is_train_face=False: no face adapter): CogVideoX-like blocks with RoPE on the video part."""
    from diffusers import ConsisIDTransformer3DModel

    torch.manual_seed(seed)
    m = ConsisIDTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                   time_embed_dim=32, text_embed_dim=32, num_layers=2, sample_width=8,
                                   sample_height=8, sample_frames=5, patch_size=2, temporal_compression_ratio=4,
                                   max_text_seq_length=6, use_rotary_positional_embeddings=True,
                                   is_train_face=False).eval()
    g = _g(seed + 1)
    frames, tokens = 2, 2 * 4 * 4
    angles = torch.rand(tokens, 16, generator=g) * 6.28
    inputs = dict(hidden_states=torch.randn(1, frames, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
                  image_rotary_emb=(angles.cos(), angles.sin()))
    return m, inputs


def hunyuan_video_framepack(seed=0):
    """HunyuanVideo FramePack: HunyuanVideo blocks + clean / 2x / 4x history latents packed before the noisy ones,
    SigLIP image tokens prepended to the text, batch 2 -> [B, 1, 1, N] padding mask."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(seed)
    m = HunyuanVideoFramepackTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                attention_head_dim=16, num_layers=1, num_single_layers=1,
                                                num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                                                guidance_embeds=False, text_embed_dim=32, pooled_projection_dim=16,
                                                rope_axes_dim=(4, 6, 6), has_image_proj=True, image_proj_dim=24,
                                                has_clean_x_embedder=True).eval()
    g = _g(seed + 1)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    inputs = dict(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, 6, 32, generator=g), encoder_attention_mask=mask,
                  pooled_projections=torch.randn(2, 16, generator=g), image_embeds=torch.randn(2, 3, 24, generator=g),
                  indices_latents=torch.tensor([7, 8]),
                  latents_clean=torch.randn(2, 4, 2, 8, 8, generator=g),
                  indices_latents_clean=torch.tensor([0, 9]),
                  latents_history_2x=torch.randn(2, 4, 2, 8, 8, generator=g),
                  indices_latents_history_2x=torch.tensor([1, 2]),
                  latents_history_4x=torch.randn(2, 4, 4, 8, 8, generator=g),
                  indices_latents_history_4x=torch.tensor([3, 4, 5, 6]))
    return m, inputs


def chronoedit(seed=0, n_txt=512):
    """ChronoEdit: Wan-based (image-to-video style, CLIP image tokens via added k/v), temporal RoPE skip.
    The processor splits image / text context as [:-512] / [-512:] (hard-coded text length), so the text is
    512 tokens; with fewer the image branch gets 0 keys (torch SDPA returns zeros; diffaccel raises)."""
    from diffusers import ChronoEditTransformer3DModel

    torch.manual_seed(seed)
    m = ChronoEditTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                     in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                     num_layers=2, image_dim=24, added_kv_proj_dim=32, rope_max_seq_len=32,
                                     rope_temporal_skip_len=2).eval()
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, n_txt, 32, generator=g),
                  encoder_hidden_states_image=torch.randn(1, 5, 24, generator=g))
    return m, inputs


def omnigen(seed=0):
    """OmniGen (Phi-3 style): text tokens with an input image's patches spliced in, time token, output image;
    additive [B, 1, L, L] mask from (1 - m) * finfo.min: causal prefix, bidirectional image tokens, and a
    left-padded second sample whose padded query rows are fully masked."""
    from diffusers import OmniGenTransformer2DModel

    torch.manual_seed(seed)
    m = OmniGenTransformer2DModel(in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2,
                                  num_key_value_heads=2, intermediate_size=64, num_layers=2, pad_token_id=0,
                                  vocab_size=64, max_position_embeddings=256, original_max_position_embeddings=128,
                                  rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.0] * 8},
                                  pos_embed_max_size=16, time_step_dim=32).eval()
    g = _g(seed + 1)
    n_c, n_out = 10, 16  # condition tokens (4 of them an input image's 2x2 patches), output image 4x4 patches
    L = n_c + 1 + n_out
    input_ids = torch.randint(1, 64, (2, n_c), generator=g)
    input_ids[1, :2] = 0
    mask = torch.tril(torch.ones(L, L)).repeat(2, 1, 1)
    mask[:, n_c + 1 - 1 - 0:, n_c:] = 1  # time + output image tokens attend among themselves
    mask[:, 3:7, 3:7] = 1  # input image tokens bidirectional
    mask[1, :, :2] = 0  # left padding
    pos = torch.arange(L).repeat(2, 1)
    pos[1] = torch.clamp(pos[1] - 2, min=0)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([0.3, 0.7]),
                  input_ids=input_ids,
                  input_img_latents=[torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)],
                  input_image_sizes={0: [[3, 7]], 1: [[3, 7]]}, attention_mask=mask, position_ids=pos)
    return m, inputs


def unet3d(seed=0):
    """UNet3DConditionModel (ModelScope T2V): spatial self/cross attention + temporal transformers
    (transformer_in included); `attention_head_dim` is the head count (8 -> head dims 8 / 16)."""
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    m = UNet3DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                             down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                             up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), block_out_channels=(64, 128),
                             layers_per_block=1, norm_num_groups=32, cross_attention_dim=32,
                             attention_head_dim=8).eval()
    g = _g(seed + 1)
    inputs = dict(sample=torch.randn(2, 4, 3, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, 7, 32, generator=g))
    return m, inputs


def unet_svd(seed=0):
    """UNetSpatioTemporalConditionModel (SVD): spatial + temporal transformer blocks, image-embedding cross-attn."""
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(seed)
    m = UNetSpatioTemporalConditionModel(sample_size=8, in_channels=8, out_channels=4,
                                         down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                                         up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
                                         block_out_channels=(32, 64), addition_time_embed_dim=8,
                                         projection_class_embeddings_input_dim=24, layers_per_block=1,
                                         cross_attention_dim=32, num_attention_heads=(2, 4), num_frames=3).eval()
    g = _g(seed + 1)
    inputs = dict(sample=torch.randn(1, 3, 8, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 1, 32, generator=g),
                  added_time_ids=torch.tensor([[6.0, 127.0, 0.02]]))
    return m, inputs


def i2vgen_xl(seed=0):
    """I2VGen-XL: UNet3D-like with image-latent conditioning, fps embedding and image-embedding context tokens."""
    from diffusers import I2VGenXLUNet

    torch.manual_seed(seed)
    m = I2VGenXLUNet(sample_size=8, in_channels=4, out_channels=4,
                     down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                     up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), block_out_channels=(64, 128),
                     layers_per_block=1, norm_num_groups=32, cross_attention_dim=32, attention_head_dim=8,
                     num_attention_heads=None).eval()
    g = _g(seed + 1)
    inputs = dict(sample=torch.randn(2, 4, 3, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                  fps=torch.tensor([16, 16]), image_latents=torch.randn(2, 4, 3, 8, 8, generator=g),
                  image_embeddings=torch.randn(2, 32, generator=g),
                  encoder_hidden_states=torch.randn(2, 7, 32, generator=g))
    return m, inputs


FACTORIES = {"unet_sd15": unet_sd15, "unet_sdxl": unet_sdxl, "sd3": sd3, "flux": flux, "pixart": pixart,
             "dit": dit, "wan": wan, "cogvideox": cogvideox, "qwenimage": qwenimage, "hunyuan_video": hunyuan_video,
             "ltx_video": ltx_video, "zimage": zimage, "flux2": flux2, "hunyuan_video15": hunyuan_video15,
             "skyreels_v2": skyreels_v2, "animatediff": animatediff,
             # their processors call SDPA (Cosmos: the dispatcher, no backend named) themselves:
             # DiffaccelRedirectProcessor
             "sana": sana, "auraflow": auraflow, "lumina2": lumina2, "cogview4": cogview4, "hunyuan_dit": hunyuan_dit,
             "mochi": mochi, "allegro": allegro, "stable_audio": stable_audio, "hidream": hidream,
             # Flux-style dispatcher processors, AttnProcessor2_0
             "chroma": chroma, "latte": latte, "ltx2": ltx2, "cosmos": cosmos,
             # newer backbones: dispatcher processors, the redirect (QwenImage 2.1's segmented prefill,
             # EasyAnimate, OmniGen), AttnProcessor2_0 (the video UNets)
             "flux3": flux3, "qwenimage21": qwenimage21, "krea2": krea2, "ideogram4": ideogram4,
             "ernie_image": ernie_image, "longcat_image": longcat_image, "ovis_image": ovis_image,
             "hunyuan_image": hunyuan_image, "kandinsky5": kandinsky5, "sana_video": sana_video, "wan_vace": wan_vace,
             "helios": helios, "bria": bria, "bria_fibo": bria_fibo, "glm_image": glm_image, "prx": prx,
             "cogview3plus": cogview3plus, "easyanimate": easyanimate, "consisid": consisid,
             "hunyuan_video_framepack": hunyuan_video_framepack, "chronoedit": chronoedit, "omnigen": omnigen,
             "unet3d": unet3d, "unet_svd": unet_svd, "i2vgen_xl": i2vgen_xl}


def output_of(model, inputs):
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    if isinstance(out, (list, tuple)):  # Z-Image: one tensor per sample (their sizes differ)
        out = torch.cat([t.flatten() for t in out])
    return out


# -- backbones checked by tests/test_calib_more_backbones.py only, not in FACTORIES: each stood
# for a defect in calibration, layer detection or attention routing --------------------------

def anyflow(seed=0):
    """AnyFlow (Wan-based flow map): latents (B, F, C, H, W), per-frame timestep t and target r_timestep."""
    from diffusers.models.transformers.transformer_anyflow import AnyFlowTransformer3DModel

    torch.manual_seed(seed)
    m = AnyFlowTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                  rope_max_seq_len=32).eval()
    _unzero(m, seed)
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(1, 3, 4, 8, 8, generator=g), timestep=torch.full((1, 3), 700.0),
                  r_timestep=torch.full((1, 3), 300.0), encoder_hidden_states=torch.randn(1, 6, 32, generator=g))
    return m, inputs


def cosmos3(seed=0, layers=2):
    """Cosmos 3 Omni: packed 1-D sequence, causal text (und) path + full gen path, GQA, interleaved 3-axis mRoPE.
    Vision latent [1, C, T=2, 4, 4]: frame 0 is a clean condition frame, frame 1 is noisy."""
    from diffusers.models.transformers.transformer_cosmos3 import Cosmos3OmniTransformer

    torch.manual_seed(seed)
    m = Cosmos3OmniTransformer(head_dim=16, hidden_size=64, intermediate_size=96, latent_channel=4,
                               latent_patch_size=2, num_attention_heads=4, num_hidden_layers=layers,
                               num_key_value_heads=2, patch_latent_dim=16, vocab_size=32,
                               rope_axes_dim=(4, 2, 2), rope_theta=10000.0).eval()
    _unzero(m, seed)
    g = _g(seed + 1)
    n_txt, t, h, w = 5, 2, 4, 4
    n_vis = t * (h // 2) * (w // 2)
    L = n_txt + n_vis
    per_frame = (h // 2) * (w // 2)
    pos_txt = torch.arange(n_txt).expand(3, -1)
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    pos_vis = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + n_txt
    inputs = dict(input_ids=torch.randint(0, 32, (n_txt,), generator=g), text_indexes=torch.arange(n_txt),
                  position_ids=torch.cat([pos_txt, pos_vis], 1), und_len=n_txt, sequence_length=L,
                  vision_tokens=[torch.randn(1, 4, t, h, w, generator=g)], vision_token_shapes=[(t, h // 2, w // 2)],
                  vision_sequence_indexes=torch.arange(n_txt, L),
                  vision_mse_loss_indexes=torch.arange(n_txt + per_frame, L),
                  vision_timesteps=torch.full((per_frame,), 500.0), vision_noisy_frame_indexes=[torch.tensor([1])])
    return m, inputs


def minimax_h3(seed=0):
    from diffusers.models.transformers.transformer_minimax_h3 import MiniMaxH3Transformer3DModel

    torch.manual_seed(seed)
    m = MiniMaxH3Transformer3DModel(num_attention_heads=2, attention_head_dim=96, hidden_size=64, num_layers=2,
                                    num_refiner_layers=1, ffn_dim=128, in_channels=4, audio_in_channels=8,
                                    patch_size=(1, 2, 2), text_dim=32, freq_dim=32, time_embed_hidden_dim=64,
                                    time_embed_dim=32, rope_freq_dim=16).eval()
    _unzero(m, seed)
    g = _g(seed + 1)
    Nt, Nv, Na = 5, 8, 3
    L = Nt + Nv + Na
    # packed order: text rows, video rows, audio rows; tags 0 video, 1 text, 2 audio (as documented)
    inputs = dict(hidden_states=torch.randn(1, Nv, 16, generator=g),
                  audio_hidden_states=torch.randn(1, Na, 8, generator=g),
                  encoder_hidden_states=torch.randn(1, Nt, 32, generator=g), timestep=torch.tensor([0.7]),
                  timestep_indices=torch.zeros(L, dtype=torch.long),
                  token_tags=torch.cat([torch.ones(Nt), torch.zeros(Nv), 2 * torch.ones(Na)]).long(),
                  position_ids=torch.randint(0, 4, (L, 3), generator=g), video_indices=torch.arange(Nt, Nt + Nv),
                  audio_indices=torch.arange(Nt + Nv, L), text_indices=torch.arange(Nt))
    return m, inputs


def kandinsky6(seed=0, audio=True):
    from diffusers import Kandinsky6Transformer3DModel

    torch.manual_seed(seed)
    m = Kandinsky6Transformer3DModel(in_visual_dim=4, out_visual_dim=4, in_text_dim=32, in_text_dim2=16, time_dim=32,
                                     patch_size=(1, 2, 2), model_dim=64, ff_dim=128, num_text_blocks=1,
                                     num_visual_blocks=1, axes_dims=(8, 12, 12), visual_cond=True, in_audio_dim=8,
                                     out_audio_dim=8, text_token_padding=True, ca_rope=True, cross_gates=True,
                                     fix_modulation=True).eval()
    _unzero(m, seed)
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(1, 2, 4, 4, 9, generator=g),  # (B, T, H, W, 2*4+1)
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
                  pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([500.0]))
    if audio:
        inputs["audio_hidden_states"] = torch.randn(1, 5, 8, generator=g)
    return m, inputs


def motif_video(seed=0, cross=False):
    from diffusers import MotifVideoTransformer3DModel

    torch.manual_seed(seed)
    # cross=True: 2 single blocks (1 encoder with text cross-attention, 1 decoder) + dual-block cross-attention
    m = MotifVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                     num_layers=1, num_single_layers=2 if cross else 1, num_decoder_layers=1,
                                     text_embed_dim=32, rope_axes_dim=(4, 6, 6),
                                     enable_text_cross_attention_dual=cross,
                                     enable_text_cross_attention_single=cross).eval()
    _unzero(m, seed)
    g = _g(seed + 1)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 4, 4, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=g))
    return m, inputs


def stable_audio3(seed=0):
    """Stable Audio 3 DiT: differential self/cross attention (fused to_qkv = [q1|q2|k1|k2|v]), memory tokens."""
    from diffusers.models.transformers.transformer_stable_audio3 import StableAudio3DiTModel

    torch.manual_seed(seed)
    m = StableAudio3DiTModel(io_channels=4, embed_dim=32, depth=2, num_heads=4, cond_token_dim=16,
                             global_cond_dim=16, local_add_cond_dim=5, timestep_features_dim=16,
                             num_memory_tokens=4).eval()
    _unzero(m, seed)
    g = _g(seed + 1)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    inputs = dict(hidden_states=torch.randn(2, 4, 12, generator=g), timestep=torch.tensor([0.3, 0.3]),
                  encoder_hidden_states=torch.randn(2, 6, 16, generator=g),
                  global_hidden_states=torch.randn(2, 16, generator=g), encoder_attention_mask=mask)
    return m, inputs


def dreamlite(seed=0):
    """DreamLite UNet: GQA (num_kv_heads=1) + RMS qk-norm attention, depthwise-separable resnets."""
    from diffusers.models.unets.unet_dreamlite import DreamLiteUNetModel

    torch.manual_seed(seed)
    m = DreamLiteUNetModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                           layers_per_block=1,
                           down_block_types=("DreamLiteCrossAttnNoSelfAttnDownBlock2D",
                                             "DreamLiteCrossAttnDownBlock2D"),
                           mid_block_type="DreamLiteUNetMidBlock2DCrossAttn",
                           up_block_types=("DreamLiteCrossAttnUpBlock2D", "DreamLiteCrossAttnNoSelfAttnUpBlock2D"),
                           cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, ff_mult=2,
                           num_kv_heads=1, encoder_hid_dim_type="text_proj_rms", encoder_hid_dim=24).eval()
    _unzero(m, seed)
    g = _g(seed + 1)
    inputs = dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([300.0, 300.0]),
                  encoder_hidden_states=torch.randn(2, 7, 24, generator=g))
    return m, inputs


def stable_cascade(seed=0):
    """Stable Cascade prior-style UNet (self-attn over [x tokens, cond tokens]); timestep arg is `timestep_ratio`."""
    from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet

    torch.manual_seed(seed)
    m = StableCascadeUNet(in_channels=4, out_channels=4, timestep_ratio_embedding_dim=16, patch_size=1,
                          conditioning_dim=32, block_out_channels=(32, 64), num_attention_heads=(2, 4),
                          down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1),
                          down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(1, 1),
                          clip_text_in_channels=16, clip_text_pooled_in_channels=16, clip_seq=2,
                          dropout=(0.0, 0.0), self_attn=True, switch_level=(False,)).eval()
    _unzero(m, seed)
    g = _g(seed + 1)
    inputs = dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep_ratio=torch.tensor([0.3, 0.3]),
                  clip_text_pooled=torch.randn(2, 1, 16, generator=g), clip_text=torch.randn(2, 5, 16, generator=g))
    return m, inputs


def ace_step(seed=0):
    """ACE-Step 1.5 DiT: GQA self-attn (sliding window / full, alternating) + cross-attn, 1D patch conv."""
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel

    torch.manual_seed(seed)
    m = AceStepTransformer1DModel(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, in_channels=8, audio_acoustic_hidden_dim=4,
                                  patch_size=2, sliding_window=2).eval()
    _unzero(m, seed)
    g = _g(seed + 1)
    t = torch.tensor([0.3, 0.8])
    inputs = dict(hidden_states=torch.randn(2, 16, 4, generator=g), timestep=t, timestep_r=t.clone(),
                  encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                  context_latents=torch.randn(2, 16, 4, generator=g))
    return m, inputs


def _cam(B, F, g, H=4, W=4):
    c2w = torch.eye(4).repeat(B, F, 1, 1)
    c2w[..., :3, 3] = torch.randn(B, F, 3, generator=g) * 0.1
    intr = torch.tensor([W * 1.0, H * 1.0, W / 2, H / 2]).repeat(B, F, 1)
    return torch.cat([c2w.flatten(-2), intr], -1)


def sana_wm(seed=0):
    """SANA-WM: GDN linear attention (block 0) + softmax UCPE attention (block 1), camera conditions, per-frame t."""
    from diffusers.models.transformers.transformer_sana_wm import SanaWMTransformer3DModel

    torch.manual_seed(seed)
    m = SanaWMTransformer3DModel(in_channels=4, num_layers=2, hidden_size=64, num_attention_heads=2,
                                 softmax_every_n=2, linear_head_dim=32, caption_channels=16,
                                 chunk_plucker_post_attn_blocks=2, mlp_ratio=2.0).eval()
    _unzero(m)
    g = _g(seed + 1)
    B, F = 1, 2
    inputs = dict(hidden_states=torch.randn(B, 4, F, 4, 4, generator=g), timestep=torch.full((B, 1, F), 500.0),
                  encoder_hidden_states=torch.randn(B, 1, 6, 16, generator=g),
                  encoder_attention_mask=torch.ones(B, 6, dtype=torch.long),
                  camera_conditions=_cam(B, F, g),
                  chunk_plucker=torch.randn(B, 48, F, 4, 4, generator=g))
    return m, inputs


# name -> (factory, the forward's timestep argument, two timesteps on the model's own scale)
CALIBRATION_ONLY = {"anyflow": (anyflow, "timestep", (900.0, 100.0)),
                    "cosmos3": (cosmos3, "vision_timesteps", (900.0, 100.0)),
                    "minimax_h3": (minimax_h3, "timestep", (0.9, 0.1)),
                    "kandinsky6": (kandinsky6, "timestep", (900.0, 100.0)),
                    "motif_video": (motif_video, "timestep", (900, 100)),
                    "stable_audio3": (stable_audio3, "timestep", (0.9, 0.1)),
                    "dreamlite": (dreamlite, "timestep", (900.0, 100.0)),
                    "stable_cascade": (stable_cascade, "timestep_ratio", (0.9, 0.1)),
                    "sana_wm": (sana_wm, "timestep", (900.0, 100.0))}
