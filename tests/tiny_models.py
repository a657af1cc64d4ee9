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


FACTORIES = {"unet_sd15": unet_sd15, "unet_sdxl": unet_sdxl, "sd3": sd3, "flux": flux, "pixart": pixart,
             "dit": dit, "wan": wan, "cogvideox": cogvideox, "qwenimage": qwenimage, "hunyuan_video": hunyuan_video,
             "ltx_video": ltx_video, "zimage": zimage, "flux2": flux2, "hunyuan_video15": hunyuan_video15,
             "skyreels_v2": skyreels_v2, "animatediff": animatediff,
             # their processors call SDPA (Cosmos: the dispatcher, no backend named) themselves:
             # DiffaccelRedirectProcessor
             "sana": sana, "auraflow": auraflow, "lumina2": lumina2, "cogview4": cogview4, "hunyuan_dit": hunyuan_dit,
             "mochi": mochi, "allegro": allegro, "stable_audio": stable_audio, "hidream": hidream,
             # Flux-style dispatcher processors, AttnProcessor2_0
             "chroma": chroma, "latte": latte, "ltx2": ltx2, "cosmos": cosmos}


def output_of(model, inputs):
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    if isinstance(out, (list, tuple)):  # Z-Image: one tensor per sample (their sizes differ)
        out = torch.cat([t.flatten() for t in out])
    return out
