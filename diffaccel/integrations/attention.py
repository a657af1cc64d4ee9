"""diffusers attention processors that run ``diffaccel.ops.attention``.

``make_processor(original, *, quant=None) -> (new_processor | None, reason)`` is what ``patch``
calls per attention module. Each new processor keeps the one it replaces as ``.original`` (so
``unpatch`` can put it back) and computes exactly what the original does, with SDPA swapped for
``diffaccel.ops.attention`` (``quant="int8"`` for the INT8-QK path):

- ``AttnProcessor2_0`` / ``AttnProcessor`` (UNet self/cross attention, PixArt, DiT): ``DiffaccelAttnProcessor``.
- ``JointAttnProcessor2_0`` (SD3): ``DiffaccelJointAttnProcessor``; image and text tokens are joined
  in [B, L, H, D] order so the kernel reads them in place and the output reshapes without a copy.
- ``CogVideoXAttnProcessor2_0`` (CogVideoX: text and video tokens in one sequence, RoPE on the video
  part): ``DiffaccelCogVideoXAttnProcessor``.
- Their fused-projection variants (``FusedAttnProcessor2_0``, ``FusedJointAttnProcessor2_0``,
  ``FusedCogVideoXAttnProcessor2_0``, set by diffusers' ``fuse_qkv_projections()``): the same
  processors projecting through ``to_qkv`` / ``to_kv`` / ``to_added_qkv``; q, k and v are column
  slices of one GEMM's output, read in place.
- Processors that call diffusers' attention dispatcher with ``backend=self._attention_backend``
  (Flux, Wan, HunyuanVideo, QwenImage, ...): a per-instance copy of the processor whose
  ``_attention_backend`` names a dispatcher backend registered here (``"diffaccel"`` /
  ``"diffaccel_int8"``). Only that instance routes to it; the class and other instances are untouched.

Everything else is refused with the reason (processors holding weights such as IP-adapters,
PAG, context-parallel, a user-chosen non-native backend).
"""
from __future__ import annotations

import ast
import copy
import functools
import inspect
import logging
import textwrap
from typing import Optional

import torch
import torch.nn.functional as F

from diffaccel.nn.shared_input import project_shared
from diffaccel.ops.attention import (FLOAT_DTYPES, MAX_HEAD_DIM, MIN_HEAD_DIM, QUANT_MODES, attention,
                                     attention_with_lse)
from diffaccel.ops.attention import _validate as _validate_attention_args

log = logging.getLogger("diffaccel")

DISPATCH_BACKEND_NAMES = {None: "diffaccel", "int8": "diffaccel_int8"}
ALREADY_PATCHED = "already a diffaccel processor"  # make_processor's reason for a processor of its own
_NATIVE_BACKENDS = (None, "native")


def _check_quant(quant):
    if quant not in QUANT_MODES:
        raise ValueError(f"quant: expected one of {QUANT_MODES}, got {quant!r}")


def _split_columns(t: torch.Tensor, parts: int):
    """Equal column slices of a fused projection's output (views, as diffusers' torch.split)."""
    return torch.split(t, t.shape[-1] // parts, dim=-1)


def _fused_projections(attn, hidden_states, encoder_hidden_states):
    """q, k, v as ``FusedAttnProcessor2_0`` computes them: one ``to_qkv`` GEMM for self-attention,
    ``to_q`` and one ``to_kv`` GEMM for cross-attention."""
    if encoder_hidden_states is None:
        return _split_columns(attn.to_qkv(hidden_states), 3)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    return (attn.to_q(hidden_states), *_split_columns(attn.to_kv(encoder_hidden_states), 2))


def _heads(attn, batch_size: int, head_dim: int, query, key, value, *, qk_norms: bool = True):
    """[B, L, H*D] projections as [B, H, L, D] views (the kernel reads them in place, no copy), with
    the module's q/k norms applied as diffusers' processors apply them (``qk_norms``: the classic
    ``AttnProcessor`` never applies them)."""
    query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if qk_norms and attn.norm_q is not None:
        query = attn.norm_q(query)
    if qk_norms and attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def _attention_scores_skipped() -> bool:
    """True inside diffusers' layer-skip hook with ``skip_attention_scores`` (skip-layer and
    perturbed-attention guidance): its torch-function mode answers every SDPA call whose query and
    value lengths agree with the value itself. diffaccel's kernels never call SDPA, so the places
    that stand for it ask here."""
    if not torch._C._is_torch_function_mode_enabled():
        return False
    try:
        from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode
    except ImportError:  # pragma: no cover - diffusers without layer skip
        return False
    return any(isinstance(m, AttentionScoreSkipFunctionMode)
               for m in torch.overrides._get_current_function_mode_stack())


_DTYPE_FALLBACKS: set = set()  # dtypes already warned about
_WARNED: set = set()  # other once-per-process warnings, by key


def _autocast_like_sdpa(query, key, value):
    """q, k, v as torch SDPA takes them inside an autocast region: cast to the autocast dtype. (RMS
    q/k norms return fp32 under autocast while v stays bf16: SDPA runs that, so diffaccel must too.)"""
    kind = query.device.type
    if not torch.is_autocast_enabled(kind):
        return query, key, value
    dtype = torch.get_autocast_dtype(kind)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (query, key, value))


def _sdpa(query, key, value, attn_mask=None, is_causal=False, scale=None, *, quant=None):
    """What the original processor's ``F.scaled_dot_product_attention`` call gives, run by diffaccel.
    A dtype the op does not take (a model cast to float64 to debug it) runs torch's SDPA, as the
    unpatched model would, with a warning the first time."""
    query, key, value = _autocast_like_sdpa(query, key, value)
    # (the mode check first: a shape comparison would guard a dynamic-shape compiled graph on Lq != Lk)
    if _attention_scores_skipped() and query.shape[2] == value.shape[2]:
        return value
    if query.dtype not in FLOAT_DTYPES:
        if query.dtype not in _DTYPE_FALLBACKS:
            _DTYPE_FALLBACKS.add(query.dtype)
            log.warning("diffaccel: attention in %s runs torch's SDPA (diffaccel attention takes %s)", query.dtype,
                        ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES))
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale)
    return attention(query, key, value, attn_mask, is_causal, scale, quant=quant)


class _DiffaccelProcessor:
    """What each processor written here holds: the one it replaces (``unpatch`` puts it back) and
    whether the original projects through fused q/k/v layers. The attention path (``quant``) is
    fixed by the class, one subclass per mode (``processor_class``).

    diffusers re-creates the processors it keeps as ``type(processor)()`` (load_ip_adapter's
    self-attention layers, unload_ip_adapter), so each can be built without arguments: it then
    stands for a new instance of the diffusers processor named by ``STANDS_FOR`` and, being of the
    same class, keeps the INT8 path a per-instance setting would lose."""

    STANDS_FOR = ""
    QUANT: Optional[str] = None

    def __init__(self, original=None):
        if original is None:
            original = self._new_original()
        self.original = original
        self.fused_projections = type(original).__name__ in _FUSED_PROCESSORS

    @property
    def quant(self) -> Optional[str]:
        return type(self).QUANT

    def _new_original(self):
        from diffusers.models import attention_processor

        return getattr(attention_processor, self.STANDS_FOR)()

    def __reduce__(self):  # the subclasses are made at run time: rebuilt from the class written here
        base = next(c for c in type(self).__mro__ if "_MADE_AT_RUN_TIME" not in c.__dict__)
        return _rebuild_processor, (base, self.original, self.quant)


def processor_class(base: type, quant: Optional[str], stands_for: Optional[str] = None) -> type:
    """``base`` standing for the diffusers processor ``stands_for`` (default ``base.STANDS_FOR``) and
    running attention path ``quant``: ``base`` itself, else a subclass (``...Int8``,
    ``...ForAttnProcessor``), so that an instance diffusers re-creates as ``type(processor)()``
    stands for the same diffusers processor and runs the same path."""
    _check_quant(quant)
    return _processor_class(base, quant, stands_for or base.STANDS_FOR)


@functools.lru_cache(maxsize=None)
def _processor_class(base: type, quant: Optional[str], stands_for: str) -> type:
    if quant is None and stands_for == base.STANDS_FOR:
        return base
    name = base.__name__ + ("" if stands_for == base.STANDS_FOR else f"For{stands_for}") + (
        quant.capitalize() if quant else "")
    return type(name, (base,), {"QUANT": quant, "STANDS_FOR": stands_for, "_MADE_AT_RUN_TIME": True,
                                "__module__": __name__, "__qualname__": name})


def _rebuild_processor(base, original, quant):
    return processor_class(base, quant, type(original).__name__)(original)


# -- AttnProcessor2_0 (UNet) -----------------------------------------------------------------------

class DiffaccelAttnProcessor(_DiffaccelProcessor):
    """``AttnProcessor2_0``'s (and ``AttnProcessor``'s) computation with diffaccel attention."""

    STANDS_FOR = "AttnProcessor2_0"

    def __init__(self, original=None):
        super().__init__(original)
        # the classic AttnProcessor (chosen when scale_qk=False) honours attn.scale and never applies
        # the module's q/k norms; AttnProcessor2_0 applies them and uses SDPA's default scale
        self.classic = type(self.original).__name__ == "AttnProcessor"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        # quantized projections of one input share one activation quantization (project_shared)
        if self.fused_projections:
            query, key, value = _fused_projections(attn, hidden_states, encoder_hidden_states)
        elif encoder_hidden_states is None:
            query, key, value = project_shared(hidden_states, attn.to_q, attn.to_k, attn.to_v)
        else:
            query = attn.to_q(hidden_states)
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key, value = project_shared(encoder_hidden_states, attn.to_k, attn.to_v)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = _heads(attn, batch_size, head_dim, query, key, value, qk_norms=not self.classic)
        scale = attn.scale if self.classic else None
        hidden_states = _sdpa(query, key, value, attn_mask=attention_mask, scale=scale, quant=self.quant)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# -- JointAttnProcessor2_0 (SD3) ------------------------------------------------------------------

class DiffaccelJointAttnProcessor(_DiffaccelProcessor):
    """``JointAttnProcessor2_0``'s computation with diffaccel attention."""

    STANDS_FOR = "JointAttnProcessor2_0"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if self.fused_projections:
            return self._fused_call(attn, hidden_states, encoder_hidden_states)
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = project_shared(hidden_states, attn.to_q, attn.to_k, attn.to_v)
        head_dim = key.shape[-1] // attn.heads
        # kept as [B, L, H, D] (norms act on D, so the order does not matter to them)
        query = query.view(batch_size, -1, attn.heads, head_dim)
        key = key.view(batch_size, -1, attn.heads, head_dim)
        value = value.view(batch_size, -1, attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            eq, ek, ev = (t.view(batch_size, -1, attn.heads, head_dim) for t in project_shared(
                encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=1)
            key = torch.cat([key, ek], dim=1)
            value = torch.cat([value, ev], dim=1)

        hidden_states = _sdpa(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              quant=self.quant)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, : residual.shape[1]],
                                                    hidden_states[:, residual.shape[1]:])
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


    def _fused_call(self, attn, hidden_states, encoder_hidden_states):
        """``FusedJointAttnProcessor2_0``: one ``to_qkv`` and one ``to_added_qkv`` GEMM. Like it, this
        applies no q/k norms (diffusers' fused variant skips ``norm_q``/``norm_added_q``, and the patched
        model must give what the unpatched one gives)."""
        if encoder_hidden_states is None:
            raise ValueError("encoder_hidden_states: FusedJointAttnProcessor2_0 needs the context tokens, got None")
        for name, t in (("hidden_states", hidden_states), ("encoder_hidden_states", encoder_hidden_states)):
            if t.ndim != 3:  # (the original's 4-D branch splits the joint output at the channel count)
                raise ValueError(f"{name}: expected [batch, tokens, channels], got shape {tuple(t.shape)}")
        batch_size, n_sample = hidden_states.shape[:2]
        sample = _split_columns(attn.to_qkv(hidden_states), 3)
        context = _split_columns(attn.to_added_qkv(encoder_hidden_states), 3)
        head_dim = sample[1].shape[-1] // attn.heads
        query, key, value = (torch.cat([a, b], dim=1).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                             for a, b in zip(sample, context))
        hidden_states = _sdpa(query, key, value, quant=self.quant)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states, encoder_hidden_states = hidden_states[:, :n_sample], hidden_states[:, n_sample:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


# -- CogVideoXAttnProcessor2_0 ---------------------------------------------------------------------

class DiffaccelCogVideoXAttnProcessor(_DiffaccelProcessor):
    """``CogVideoXAttnProcessor2_0``'s (and its fused variant's) computation with diffaccel attention."""

    STANDS_FOR = "CogVideoXAttnProcessor2_0"

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if self.fused_projections:  # (diffusers' fused variant takes the mask length from the text tokens)
            sequence_length = text_seq_length
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if self.fused_projections:
            query, key, value = _split_columns(attn.to_qkv(hidden_states), 3)
        else:
            query, key, value = project_shared(hidden_states, attn.to_q, attn.to_k, attn.to_v)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = _heads(attn, batch_size, head_dim, query, key, value)
        if image_rotary_emb is not None:  # RoPE on the video tokens only, in place as the original does
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)
        hidden_states = _sdpa(query, key, value, attn_mask=attention_mask, quant=self.quant)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1)
        return hidden_states, encoder_hidden_states


# -- any other diffusers processor that calls SDPA itself -------------------------------------------

class DiffaccelRedirectProcessor(_DiffaccelProcessor):
    """Runs the diffusers processor it wraps unchanged, with each ``F.scaled_dot_product_attention``
    call it makes answered by diffaccel attention: processors with their own projections, norms and
    RoPE (AuraFlow, CogView4, HunyuanDiT, Allegro, Cosmos, ...) need no copy of their code here.

    A torch-function mode catches the SDPA calls, so in eager mode each torch call inside the
    processor pays a Python dispatch (under torch.compile the mode is traced away). A call the op
    does not take (dropout, grouped-query heads, head dims outside its range, ...) runs torch's
    SDPA as the processor asked; the processor counts those in ``fallbacks`` and the first of each
    kind is logged. One subclass per wrapped class (``_redirect_class``), so diffusers' registries,
    keyed by class, and ``type(processor)()`` work as they do for the original."""

    WRAPS: type = type(None)

    def __init__(self, original=None):
        super().__init__(original)
        self.fallbacks: dict = {}

    def _new_original(self):
        return self.WRAPS()

    def __call__(self, attn, *args, **kwargs):
        with _SDPAToDiffaccel(self):
            return self.original(attn, *args, **kwargs)

    def __reduce__(self):  # the subclass is made at run time: rebuilt from the wrapped class
        return _redirect_processor, (self.original, self.quant)

    def attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
        query, key, value = _autocast_like_sdpa(query, key, value)
        why = _sdpa_refusal(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, self.quant)
        if why is None:
            return _sdpa(query, key, value, attn_mask, is_causal, scale, quant=self.quant)
        self.fallbacks[why] = self.fallbacks.get(why, 0) + 1
        if self.fallbacks[why] == 1:
            log.warning("diffaccel: %s called SDPA with arguments diffaccel attention does not take (%s); "
                        "torch SDPA ran that call", type(self.original).__name__, why)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


_TORCH_SDPA = torch._C._nn.scaled_dot_product_attention  # what F.scaled_dot_product_attention is


class _SDPAToDiffaccel(torch.overrides.TorchFunctionMode):
    def __init__(self, processor: DiffaccelRedirectProcessor):
        super().__init__()
        self.processor = processor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TORCH_SDPA:
            return self.processor.attend(*args, **kwargs)
        return func(*args, **kwargs)


def _sdpa_refusal(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, quant) -> Optional[str]:
    """Why diffaccel attention cannot stand for this SDPA call (None: it can): the op's own checks."""
    if dropout_p:
        return f"dropout_p={dropout_p}"
    if enable_gqa and query.dim() == 4 and key.dim() == 4 and query.shape[1] != key.shape[1]:
        return f"grouped-query attention ({query.shape[1]} query heads, {key.shape[1]} key/value heads)"
    try:
        _validate_attention_args(query, key, value, attn_mask, is_causal, scale, quant)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


@functools.lru_cache(maxsize=None)
def _redirect_class(wrapped: type) -> type:
    def __call__(self, attn, *args, **kwargs):
        return DiffaccelRedirectProcessor.__call__(self, attn, *args, **kwargs)

    # diffusers' Attention.forward drops the keyword arguments its processor's signature lacks
    __call__.__signature__ = inspect.signature(wrapped.__call__)
    name = f"Diffaccel{wrapped.__name__}"
    return type(name, (DiffaccelRedirectProcessor,),
                {"WRAPS": wrapped, "__call__": __call__, "__module__": __name__, "__qualname__": name})


def _redirect_processor(original, quant=None):
    return processor_class(_redirect_class(type(original)), quant)(original)


def _calls_sdpa(cls: type) -> bool:
    """A diffusers processor class whose ``__call__`` calls ``F.scaled_dot_product_attention`` itself,
    or diffusers' dispatcher without naming a backend (Cosmos): its native backend calls SDPA."""
    source = _call_source(cls) if cls.__module__.startswith("diffusers.") else ""
    return "scaled_dot_product_attention(" in source or "dispatch_attention_fn(" in source


# -- diffusers' attention dispatcher ------------------------------------------------------------------

def _dispatch_fn(quant):
    def diffaccel_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                            enable_gqa=False, return_lse=False, _parallel_config=None):
        # the dispatcher's layout is [B, L, H, D]; the op reads it as a [B, H, L, D] view, no copy
        if dropout_p != 0.0:
            raise NotImplementedError(f"dropout_p: diffaccel attention has no dropout, got {dropout_p}")
        if _parallel_config is not None:
            raise NotImplementedError("_parallel_config: context-parallel attention is not supported by diffaccel")
        query, key, value = _autocast_like_sdpa(query, key, value)
        if attn_mask is not None and attn_mask.ndim == 2 and attn_mask.shape[0] == query.shape[0] \
                and attn_mask.shape[1] == key.shape[1]:
            attn_mask = attn_mask[:, None, None, :]  # [B, Lk] key padding, as the native backend reads it
        if enable_gqa and query.shape[2] != key.shape[2] and not return_lse:
            # grouped-query heads (Cosmos3): torch SDPA runs them natively, as the native backend would
            if "gqa" not in _WARNED:
                _WARNED.add("gqa")
                log.warning("diffaccel: grouped-query attention (%d query heads, %d key/value heads) runs torch's "
                            "SDPA", query.shape[2], key.shape[2])
            return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value)),
                                                  attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                                  enable_gqa=True).transpose(1, 2)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        if return_lse:
            out, lse = attention_with_lse(q, k, v, attn_mask, is_causal, scale, quant=quant)
            return out.transpose(1, 2), lse.transpose(1, 2).contiguous()
        return _sdpa(q, k, v, attn_mask, is_causal, scale, quant=quant).transpose(1, 2)

    diffaccel_attention.__name__ = f"diffaccel_attention_{quant or 'fp'}"
    return diffaccel_attention


_DISPATCH_MEMBERS: dict = {}


def dispatcher_backend(quant: Optional[str] = None):
    """The ``AttentionBackendName`` member routing dispatcher calls to diffaccel (registered on first use).

    diffusers' backend enum is closed, so the member is made the way ``Enum`` makes its own and
    registered in the enum's value map and the dispatcher's registry; this adds a backend and
    changes nothing that exists.
    """
    _check_quant(quant)
    if quant in _DISPATCH_MEMBERS:
        return _DISPATCH_MEMBERS[quant]
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    value = DISPATCH_BACKEND_NAMES[quant]
    member = AttentionBackendName._value2member_map_.get(value)
    if member is None:
        member = str.__new__(AttentionBackendName, value)
        member._name_ = value.upper()
        member._value_ = value
        member.__objclass__ = AttentionBackendName
        # pickled as this call, not as AttentionBackendName(value): a process loading a saved
        # patched model (Flux keeps the member on its processors) has not registered it yet
        member.__reduce_ex__ = functools.partial(_reduce_dispatcher_backend, quant)
        AttentionBackendName._value2member_map_[value] = member
    if member not in _AttentionBackendRegistry._backends:
        _AttentionBackendRegistry.register(member, constraints=[])(_dispatch_fn(quant))
    _DISPATCH_MEMBERS[quant] = member
    return member


def _reduce_dispatcher_backend(quant, protocol):
    return dispatcher_backend, (quant,)


@functools.lru_cache(maxsize=None)
def _call_source(cls: type) -> str:
    """The source of a processor class's ``__call__`` ("" where Python cannot show it)."""
    try:
        return inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return ""


# what a processor passes as the dispatcher's ``backend=``: its own setting, or nothing (diffusers'
# active backend, native by default, which calls SDPA)
_OWN_BACKEND = "self._attention_backend"
_DEFAULT_BACKENDS = ("", "None", _OWN_BACKEND)


@functools.lru_cache(maxsize=None)
def _dispatcher_backends(cls: type) -> tuple:
    """The ``backend=`` argument (its source text; "" where not given) of each diffusers
    ``dispatch_attention_fn`` call in a processor class's ``__call__``."""
    try:
        tree = ast.parse(textwrap.dedent(_call_source(cls)))
    except SyntaxError:  # pragma: no cover - source Python shows is parseable
        return ()
    # local names bound to the processor's own setting (ACE-Step: dispatch_backend = self._attention_backend)
    aliases = {node.targets[0].id for node in ast.walk(tree)
               if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
               and ast.unparse(node.value) == _OWN_BACKEND}
    backends = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == \
                "dispatch_attention_fn":
            given = next((k.value for k in node.keywords if k.arg == "backend"), None)
            text = "" if given is None else ast.unparse(given)
            backends.append(_OWN_BACKEND if text in aliases else text)
    return tuple(backends)


def _routes_through_dispatcher(processor) -> bool:
    """Every dispatcher call of the processor goes to the backend set on it (Flux, Wan, ...): setting
    diffaccel's backend there covers them all. A processor that also calls it with ``backend=None``
    on some path (QwenImage 2.1's segmented prefill) is not one: the redirect takes it."""
    if not hasattr(processor, "_attention_backend") or not hasattr(processor, "_parallel_config"):
        return False
    backends = _dispatcher_backends(type(processor))
    return bool(backends) and all(b == _OWN_BACKEND for b in backends)


def _fixed_backend(cls: type) -> Optional[str]:
    """A backend the processor names itself on some dispatcher call (e.g. ``"flex"``), which
    neither diffaccel's backend nor the redirect would answer."""
    return next((b for b in _dispatcher_backends(cls) if b not in _DEFAULT_BACKENDS), None)


class _Routed:
    """Marks the subclasses ``_routed_class`` makes."""

    BASE: type = object


@functools.lru_cache(maxsize=None)
def _routed_class(base: type, quant: Optional[str]) -> type:
    """``base`` (a diffusers processor calling the attention dispatcher) with its calls routed to
    diffaccel: a subclass whose class-level ``_attention_backend`` is diffaccel's, so a processor
    diffusers re-creates as ``type(processor)()`` (Flux's IP-Adapter load and unload) stays routed,
    and holds a new ``base`` instance as the ``original`` unpatch puts back. Same name as ``base``:
    diffusers' code that reads processor class names sees the one it knows."""

    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        self.original = base(*args, **kwargs)

    def __reduce_ex__(self, protocol):  # the class is made at run time: rebuilt from base and quant
        return _rebuild_routed, (base, quant), dict(self.__dict__)

    return type(base.__name__, (_Routed, base), {
        "BASE": base, "_attention_backend": dispatcher_backend(quant), "__init__": __init__,
        "__reduce_ex__": __reduce_ex__, "__module__": __name__, "__qualname__": base.__qualname__})


def _rebuild_routed(base: type, quant: Optional[str]):
    return object.__new__(_routed_class(base, quant))


# -- the entry point used by patch ---------------------------------------------------------------------

_UNET_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor", "FusedAttnProcessor2_0")
_JOINT_PROCESSORS = ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0")
_COGVIDEOX_PROCESSORS = ("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0")
_FUSED_PROCESSORS = ("FusedAttnProcessor2_0", "FusedJointAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0")


def _diffusers_class(processor, names, module="diffusers.models.attention_processor"):
    cls = type(processor)
    return cls.__name__ in names and cls.__module__ == module


def is_diffaccel_processor(processor) -> bool:
    return isinstance(processor, _DiffaccelProcessor) or \
        getattr(processor, "_attention_backend", None) in _DISPATCH_MEMBERS.values()


def head_dim_of(module) -> Optional[int]:
    """The per-head width of a diffusers attention module, or None if it does not say."""
    if module is None:
        return None
    head_dim = getattr(module, "head_dim", None)
    if isinstance(head_dim, int):
        return head_dim
    inner, heads = getattr(module, "inner_dim", None), getattr(module, "heads", None)
    if isinstance(inner, int) and isinstance(heads, int) and heads > 0:
        return inner // heads
    return None


def _share_skip_metadata(new_cls, original_cls) -> None:
    """diffusers' layer-skip hook (skip-layer and perturbed-attention guidance) looks a processor's
    class up in its registry to learn what a skipped attention returns. A processor written here
    returns what the one it replaces returns, so it is registered with that one's entry, if any.
    (Dispatcher-routed processors keep their class and need nothing.)"""
    try:
        from diffusers.hooks._helpers import AttentionProcessorRegistry
        AttentionProcessorRegistry._register()
        registry = AttentionProcessorRegistry._registry
    except (ImportError, AttributeError):  # pragma: no cover - diffusers without layer skip
        return
    if original_cls in registry and new_cls not in registry:
        AttentionProcessorRegistry.register(new_cls, registry[original_cls])


def make_processor(original, *, quant: Optional[str] = None, module=None) -> tuple:
    """``(new_processor, reason)`` replacing ``original``, or ``(None, reason)`` when it is not supported.

    ``module`` (optional): the attention module holding ``original``; with it, head dims the op does not
    take are refused here rather than failing at the first forward.
    """
    _check_quant(quant)
    what = "diffaccel attention" + (" (INT8 QK)" if quant else "")
    if original is None:
        return None, "no processor"
    head_dim = head_dim_of(module)
    if head_dim is not None and not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return None, f"head dim {head_dim} outside diffaccel attention's range [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    if is_diffaccel_processor(original):
        return None, ALREADY_PATCHED
    original = original_processor(original)  # (one of ours re-pointed by set_attention_backend: the diffusers class)
    for names, cls in ((_UNET_PROCESSORS, DiffaccelAttnProcessor), (_JOINT_PROCESSORS, DiffaccelJointAttnProcessor),
                       (_COGVIDEOX_PROCESSORS, DiffaccelCogVideoXAttnProcessor)):
        if _diffusers_class(original, names):
            cls = processor_class(cls, quant, type(original).__name__)
            _share_skip_metadata(cls, type(original))
            return cls(original), f"{type(original).__name__} -> {what}"
    if isinstance(original, torch.nn.Module):
        return None, f"{type(original).__name__} holds weights (e.g. IP-adapter); not replaced"
    if getattr(original, "_parallel_config", None) is not None:
        return None, f"{type(original).__name__} runs context-parallel attention; not replaced"
    chosen = getattr(original, "_attention_backend", None)
    if chosen is not None and str(getattr(chosen, "value", chosen)) not in ("native",):
        return None, f"{type(original).__name__} uses the attention backend {chosen!s} chosen by the user"
    if _routes_through_dispatcher(original):
        try:
            backend = dispatcher_backend(quant)
        except ImportError as e:  # pragma: no cover - diffusers without a dispatcher
            return None, f"diffusers attention dispatcher unavailable: {e}"
        new = copy.copy(original)
        new.__class__ = _routed_class(type(original), quant)
        new._attention_backend = backend
        new.original = original
        _share_skip_metadata(new.__class__, type(original))
        return new, f"{type(original).__name__} via the attention dispatcher -> {what}"
    fixed = _fixed_backend(type(original))
    if fixed is not None:
        return None, f"{type(original).__name__} calls the attention dispatcher with backend={fixed}; not replaced"
    if _calls_sdpa(type(original)):
        cls = processor_class(_redirect_class(type(original)), quant)
        _share_skip_metadata(cls, type(original))
        return cls(original), f"{type(original).__name__}'s SDPA calls -> {what}"
    return None, f"{type(original).__name__} is not a supported attention processor"


def original_processor(processor):
    """The processor ``make_processor`` replaced (for unpatch); ``processor`` itself if not ours (a
    routed processor whose backend the user chose since: as the diffusers class, with that backend)."""
    if is_diffaccel_processor(processor):
        return getattr(processor, "original", processor)
    if isinstance(processor, _Routed):
        plain = copy.copy(processor)
        plain.__class__ = type(processor).BASE
        plain.__dict__.pop("original", None)
        return plain
    return processor
