"""`diffaccel.patch` / `diffaccel.unpatch`: the walk over a model.

Per instance (classes are never touched), atomic (every change is recorded in an undo log
and rolled back if a later step fails) and idempotent (a second `patch` with the same options
returns the first report). `unpatch` puts the very same original objects back, so outputs are
bit-identical to before.

LoRA (peft) and quantization: a quantizing patch, when peft is installed, also teaches peft's
LoRA dispatch to wrap QuantLinear/QuantConv2d (once per process, and only for those base layers:
``diffaccel.nn.lora.install_peft_dispatch``), turns a peft LoRA layer whose base it quantizes into
diffaccel's state-free subclass of it (undone by unpatch), and guards ``fuse_lora`` on the target.
`unpatch` restores each original float layer wherever its replacement sits then, so LoRA loaded
after patching stays on the restored float layers.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from .integrations import targets as _targets
from .nn._base import QuantLayerBase, forward_wrapped, quantized_layer_of, set_class

log = logging.getLogger("diffaccel")

_STATE_ATTR = "_diffaccel_patch"
ENV_DISABLE = "DIFFACCEL_DISABLE"

# backbone -> weakref to the target whose patch changed it. A pipeline made from a patched one's
# components (from_pipe, Pipeline(**pipe.components)) shares the patched backbone; this is how
# patch / unpatch / is_patched on it find out. (Kept off the module itself: a module holding a
# weakref would no longer pickle.)
_PATCHED_THROUGH: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _patched_through(backbone: nn.Module):
    """The live target whose patch holds ``backbone``, or None."""
    ref = _PATCHED_THROUGH.get(backbone)
    owner = ref() if ref is not None else None
    return owner if owner is not None and getattr(owner, _STATE_ATTR, None) is not None else None


def _hold_through(target, parts, undo) -> None:
    """Record ``target``'s patch as the one holding ``parts`` (backbones, a fused scheduler) until undone."""
    owner = weakref.ref(target)
    for part in parts:
        _PATCHED_THROUGH[part] = owner
        undo.push(lambda p=part: _PATCHED_THROUGH.pop(p, None))


def _shared_with(target, info) -> Optional[tuple]:
    """(backbone attribute, other target) for a backbone of ``target`` patched through another target."""
    for attr, backbone in info.backbones.items():
        owner = _patched_through(backbone)
        if owner is not None and owner is not target:
            return attr, owner
    return None


def _shared_by(target) -> Optional[tuple]:
    """``_shared_with`` for a target ``patch`` may not take (then None)."""
    try:
        info = _targets.resolve_target(target)
    except TypeError:
        return None
    return _shared_with(target, info)


def _describe_owner(attr: str, owner) -> str:
    what = f"its {attr}" if attr else "it"
    return (f"{what} is patched through another {type(owner).__name__} (0x{id(owner):x}) that shares it "
            f"(from_pipe, or a pipeline built from the same components)")


# -- the report -------------------------------------------------------------------------

@dataclass(frozen=True)
class Replaced:
    name: str
    part: str  # "attention" | "quant" | "solver"
    before: str
    after: str
    backend: str


@dataclass(frozen=True)
class Skipped:
    name: str
    part: str
    reason: str


@dataclass
class PatchReport:
    replaced: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def by_part(self, part: str) -> list:
        """The replaced entries of one part: "attention", "quant" or "solver"."""
        if part not in ("attention", "quant", "solver"):
            raise ValueError(f"part: expected 'attention', 'quant' or 'solver', got {part!r}")
        return [r for r in self.replaced if r.part == part]

    def __str__(self) -> str:
        lines = []
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.replaced:
            rows = [(r.part, r.name or "<root>", f"{r.before} -> {r.after}", r.backend) for r in self.replaced]
            lines.append(_table(("part", "replaced", "with", "backend"), rows))
        if self.skipped:
            rows = [(s.part, s.name or "<root>", s.reason) for s in self.skipped]
            lines.append(_table(("part", "left alone", "why"), rows))
        counts = {}
        for r in self.replaced:
            counts[r.part] = counts.get(r.part, 0) + 1
        summary = ", ".join(f"{n} {p}" for p, n in sorted(counts.items())) or "nothing"
        lines.append(f"replaced {summary}; left {len(self.skipped)} alone")
        return "\n".join(lines)


def _table(header, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*map(str, row)) for row in rows]
    return "\n".join(out)


# -- undo log and per-instance state ---------------------------------------------------------

class _UndoLog:
    def __init__(self):
        self._undo: list[Callable[[], None]] = []
        self.originals: list[nn.Module] = []  # replaced float modules, held for restore
        self.installed: list[tuple[str, nn.Module]] = []  # (name, module): replacements, class-swapped modules
        # (name, quantized layer, its state_digest() at patch time): unpatch checks the weights are still those
        self.digests: list[tuple[str, nn.Module, Optional[tuple]]] = []
        self._where: Optional[dict] = None  # id(root) -> {id(module): [(parent, attr), ...]}, during rollback

    def push(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def rollback(self) -> None:
        self._where = {}
        try:
            while self._undo:
                self._undo.pop()()
        finally:
            self._where = None

    def where_is(self, root: nn.Module, module: nn.Module) -> list:
        """(parent, attribute) pairs where ``module`` sits in ``root`` now (indexed once per rollback)."""
        index = None if self._where is None else self._where.get(id(root))
        if index is None:
            index = {}
            for parent in root.modules():
                for attr, child in parent._modules.items():
                    if child is not None:
                        index.setdefault(id(child), []).append((parent, attr))
            if self._where is not None:
                self._where[id(root)] = index
        return index.get(id(module), [])

    def extend(self, later: "_UndoLog") -> None:
        """Take over ``later``'s entries, to be undone before this log's own."""
        self._undo.extend(later._undo)
        self.originals.extend(later.originals)
        self.installed.extend(later.installed)
        self.digests.extend(later.digests)

    def __len__(self):
        return len(self._undo)


@dataclass
class _PatchState:
    options: Optional[tuple]
    report: PatchReport
    undo: _UndoLog
    restorable: bool = True
    copied: bool = False  # the state of a deepcopy or unpickled copy: patched, but no undo log
    # the backbones, and whether diffusers' layerwise casting was on in them at patch time (unpatch
    # refuses when it was enabled since: see _layerwise_cast)
    backbones: tuple = ()
    cast_at_patch: bool = False

    # The undo log's closures hold the original model's modules: a copy that kept them would
    # "unpatch" the original. A copy of a patched model stays patched and cannot be unpatched.
    def __deepcopy__(self, memo):
        return _PatchState(self.options, self.report, _UndoLog(), restorable=False, copied=True)

    def __reduce__(self):
        return _copied_state, (self.report, _portable_options(self.options))


def _portable_options(options: Optional[tuple]) -> Optional[tuple]:
    """The options as a pickled copy can keep them: None where they name objects of this process
    (a recipe or spec is keyed by its id, a filter_fn may be a lambda), so that patch on the loaded
    copy with the same preset is a no-op and anything else is refused."""
    if options is None:
        return None
    quant = options[1]
    keys = [q for _, q in quant] if isinstance(quant, tuple) else [quant]
    if options[4] is not None or not all(q is None or isinstance(q, str) for q in keys):
        return None
    return options


def _copied_state(report: PatchReport, options: Optional[tuple] = None) -> _PatchState:
    return _PatchState(options, report, _UndoLog(), restorable=False, copied=True)


def _get_parent(root: nn.Module, qualified_name: str):
    parent_name, _, child = qualified_name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def _module_device(module: nn.Module) -> Optional[torch.device]:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


# Model offload hooks the top-level models only; a hook on a layer itself (device_map dispatch,
# sequential offload) would not follow a replacement, so such layers are not replaced.
_ACCELERATE_HOOK_REASON = "carries an accelerate hook (device_map dispatch or sequential offload)"


def _layerwise_cast(roots) -> bool:
    """Whether a module under ``roots`` carries diffusers' layerwise casting hook
    (``enable_layerwise_casting``). Enabled after a quantizing patch, it hooks the float layers left;
    the float originals unpatch would put back were never hooked, and diffusers can neither remove
    the hook nor apply it a second time, so unpatch would leave the model half cast."""
    for root in roots:
        for m in root.modules():
            registry = getattr(m, "_diffusers_hook", None)
            if registry is not None and "layerwise_casting" in getattr(registry, "hooks", {}):
                return True
    return False


def _has_accelerate_hook(module: nn.Module) -> bool:
    return getattr(module, "_hf_hook", None) is not None


# diffusers' HookRegistry (layerwise casting, group offloading, caches) replaces forward on the instance
_WRAPPED_FORWARD_REASON = "its forward is wrapped on the instance (a diffusers hook), which a replacement would drop"


def _wrapper_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot be replaced without losing what wraps it (None: it can)."""
    if _has_accelerate_hook(module):
        return _ACCELERATE_HOOK_REASON
    if forward_wrapped(module):
        return _WRAPPED_FORWARD_REASON
    return None


# torch's per-module hook tables: shared (the same dict objects) with a replacement, hooks registered
# on the original keep firing, their handles still remove them, and unpatch hands them back as they are
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
                "_backward_hooks", "_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")
# (not a table: whether the backward hooks are full ones; copied at patch and back at unpatch)
_BACKWARD_HOOK_KIND = "_is_full_backward_hook"


def _held_by_hook(module: nn.Module) -> bool:
    """A hook attached after patch holds ``module``: it wraps its forward, or (a hook on a parent
    that offloads) its tensors are on the meta device between calls."""
    return _wrapper_reason(module) is not None or any(
        t.is_meta for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))


def _share_hooks(original: nn.Module, new: nn.Module) -> None:
    for table in _HOOK_TABLES:
        if hasattr(original, table):
            setattr(new, table, getattr(original, table))
    if hasattr(original, _BACKWARD_HOOK_KIND):
        setattr(new, _BACKWARD_HOOK_KIND, getattr(original, _BACKWARD_HOOK_KIND))


def _swap_module(root: nn.Module, qualified_name: str, new: nn.Module, undo: _UndoLog, hold_original: bool = True,
                 also: tuple = ()):
    """Put ``new`` where ``qualified_name`` is, and at the names in ``also`` (other places the same
    module object sits: it stays one shared module)."""
    parent, child = _get_parent(root, qualified_name)
    original = getattr(parent, child)
    why = _wrapper_reason(original)
    if why is not None:
        raise ValueError(f"target: {qualified_name} {why}; patch before dispatching, offloading layer by layer "
                         f"or enabling layerwise hooks (enable_model_cpu_offload is fine either way)")
    original_device = _module_device(original)
    layer = quantized_layer_of(new)
    if layer is not None:
        undo.digests.append((qualified_name, layer, layer.state_digest()))
    _share_hooks(original, new)
    if new.training != original.training:  # (a new module starts in training mode): model.eval() since
        new.train(original.training)        # patching reaches the replacement, unpatch gives it back
    for name in (qualified_name, *also):
        where, attr = _get_parent(root, name)
        setattr(where, attr, new)
        _adopt_lora_parent(where, attr, undo)
    undo.installed.append((qualified_name, new))

    def restore():
        # Put the original back wherever `new` sits now: LoRA loaded after patching wraps it (it is
        # then peft's base_layer, and the restored float layer keeps the LoRA), and unloading LoRA
        # loaded before patching moves it up to the wrapper's place.
        places = undo.where_is(root, new)
        if not places:
            log.warning("diffaccel.unpatch: %s is no longer in the model; nothing to restore there", qualified_name)
            return
        # back on the device and in the dtype the replacement has now (the user may have called
        # model.to(...) after patching), else where it was
        device = _module_device(new) or original_device
        if device is not None and _module_device(original) != device:
            original.to(device)
        for narrow in getattr(new, "narrowing_casts", ()):  # .half().float(): rounded like the rest of the model
            original.to(narrow)
        dtype = getattr(new, "original_dtype", None)
        if dtype is not None and dtype.is_floating_point and _module_dtype(original) not in (None, dtype):
            original.to(dtype)
        fmt = getattr(new, "memory_format", None)  # model.to(memory_format=...) since patching
        if fmt is not None:
            original.to(memory_format=getattr(torch, fmt))
        if original.training != new.training:  # model.train() / .eval() since patching
            original.train(new.training)
        if hasattr(new, _BACKWARD_HOOK_KIND):  # a backward hook registered since patching
            setattr(original, _BACKWARD_HOOK_KIND, getattr(new, _BACKWARD_HOOK_KIND))
        for where, attr in places:
            setattr(where, attr, original)

    undo.push(restore)
    if hold_original:
        undo.originals.append(original)


def _is_torch_ao_quantized(module: nn.Module) -> bool:
    """A layer torch.ao.quantization already replaced (quantize_dynamic and the like): not an
    nn.Linear / nn.Conv2d, but a quantized linear or conv a user would expect to see reported."""
    kind = type(module)  # (not their LinearPackedParams children)
    return (kind.__module__.startswith("torch.ao.nn.quantized") and "PackedParams" not in kind.__name__
            and ("Linear" in kind.__name__ or "Conv" in kind.__name__))


def _lora_variant_reason(root: nn.Module, qualified_name: str) -> Optional[str]:
    """Why the base layer of a peft LoRA layer must stay float: a LoRA variant (DoRA, ...) on it
    reads the base weight at every call, which a quantized layer only holds as codes."""
    parent_name, _, attr = qualified_name.rpartition(".")
    if attr != "base_layer":
        return None
    parent = root.get_submodule(parent_name)
    variants = sorted({type(v).__name__ for v in getattr(parent, "lora_variant", {}).values()})
    if not variants and any(getattr(parent, "use_dora", {}).values()):
        variants = ["DoRA"]
    if variants:
        return f"LoRA variant {', '.join(variants)} on it reads the float base weight; kept in floating point"
    return None


def _adopt_lora_parent(parent: nn.Module, attr: str, undo: _UndoLog) -> None:
    """A peft lora.Linear/Conv2d (LoRA loaded before patching) whose base layer was just quantized
    becomes diffaccel's subclass of it (no extra state): adapters added later then land on the
    quantized layer's device and dtype, and merging into low-bit codes raises a clear error."""
    if attr != "base_layer" or type(parent).__module__.split(".")[0] != "peft":
        return
    from .nn import lora as dlora

    adopted = dlora.LORA_CLASS_FOR_PEFT_CLASS.get(type(parent))
    if adopted is None:
        return
    peft_cls = type(parent)
    set_class(parent, adopted)

    def give_back():
        if type(parent) is adopted:
            set_class(parent, peft_cls)

    undo.push(give_back)


def _module_dtype(module: nn.Module) -> Optional[torch.dtype]:
    for t in module.parameters():
        return t.dtype
    return None


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# -- the parts ---------------------------------------------------------------------------

def _set_processor(module, processor) -> None:
    # (Mochi's attention holds a processor but has no set_processor)
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor


# module -> the processor an undo entry just put back: an earlier entry for the same module (a
# processor set since patching and picked up by patching again) then finds the user's processor
# that this restored, and leaves it without a warning
_RESTORED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _restore_processor(module, original, installed, qualified_name: str) -> None:
    from .integrations import attention as attn_integration

    current = module.processor
    if _RESTORED.get(module) is current and current is not installed:
        return
    _RESTORED[module] = original
    if current is installed:
        if hasattr(original, "_attention_backend") and not attn_integration.is_diffaccel_processor(current):
            # set_attention_backend(...) after patching re-pointed our copy: the user's choice stays
            original._attention_backend = current._attention_backend
        _set_processor(module, original)
    elif attn_integration.is_diffaccel_processor(current):
        # diffusers re-created it as type(processor)() (load_ip_adapter keeps self-attention's
        # processor class): put back the diffusers processor it stands for
        _set_processor(module, attn_integration.original_processor(current))
    else:
        # a processor set since patching (e.g. by fuse_qkv_projections) is the user's: left in place
        log.warning("diffaccel.unpatch: %s's attention processor was replaced since patching (now %s); left as it is",
                    qualified_name, type(current).__name__)


def _restore_saved_processors(backbone) -> None:
    """diffusers' fuse_qkv_projections keeps the processors it replaces in original_attn_processors,
    which unfuse_qkv_projections puts back: fused after patching, that copy holds diffaccel's
    processors, and unfusing after unpatch would reinstall them. Unpatch makes it hold the originals."""
    from .integrations import attention as attn_integration

    for module in backbone.modules():
        saved = getattr(module, "original_attn_processors", None)
        if isinstance(saved, dict) and any(attn_integration.is_diffaccel_processor(p) for p in saved.values()):
            module.original_attn_processors = {k: attn_integration.original_processor(p) for k, p in saved.items()}


def _patch_attention(prefix, backbone, report, undo, select, attention_quant):
    from .integrations import attention as attn_integration
    from .ops import _backend

    undo.push(lambda: _restore_saved_processors(backbone))  # (pushed first: runs after the processors are back)

    for name, module in _targets.attention_modules(backbone):
        fqn = f"{prefix}{name}"
        if not select(module, fqn):
            report.skipped.append(Skipped(fqn, "attention", "excluded by filter"))
            continue
        original = module.processor
        new, reason = attn_integration.make_processor(original, quant=attention_quant, module=module)
        if new is None:
            report.skipped.append(Skipped(fqn, "attention", reason))
            continue
        _set_processor(module, new)
        undo.push(lambda m=module, p=original, n=new, q=fqn: _restore_processor(m, p, n, q))
        device = _module_device(module) or torch.device("cpu")
        backend, _ = _backend.choose("attention", device)
        report.replaced.append(Replaced(fqn, "attention", type(original).__name__, type(new).__name__, backend))


def _patch_quant(prefix, backbone, quant, report, undo, select):
    from . import nn as dnn
    from . import quant as dquant
    from .quant.calibrate.structure import weight_read_reason  # (calibration leaves the same layers out)

    # a model built under init_empty_weights / device="meta" has no values to quantize yet
    meta = next((n for n, p in backbone.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(f"target: {prefix}{meta} is on the meta device (weights not loaded yet, or offloaded by an "
                         f"accelerate device_map); load the weights onto a device, then patch with quant")
    if isinstance(backbone, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"target: a bare {type(backbone).__name__} cannot be replaced in place (patch swaps modules "
                        f"inside the object you hold); use diffaccel.nn.quantize_module(layer, spec), or patch the "
                        f"module that contains it")
    if isinstance(quant, (str, dquant.QuantSpec)):
        spec = dquant.resolve_spec(quant)
        # a module object that sits at several places is quantized once and replaced at all of them
        places: dict[int, list[str]] = {}
        for name, module in backbone.named_modules(remove_duplicate=False):
            places.setdefault(id(module), []).append(name)
        for name, module in list(backbone.named_modules()):
            if _is_torch_ao_quantized(module):
                report.skipped.append(Skipped(f"{prefix}{name}", "quant", "already quantized by torch.ao.quantization"))
                continue
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            fqn = f"{prefix}{name}"
            if _targets.is_lora_branch(name):
                report.skipped.append(Skipped(fqn, "quant", "LoRA branch kept in floating point"))
                continue
            if _targets.is_io_layer(name):
                report.skipped.append(Skipped(fqn, "quant", "input/output layer kept in floating point"))
                continue
            if _targets.is_timestep_embedding(name):
                report.skipped.append(Skipped(fqn, "quant", "timestep embedding kept in floating point"))
                continue
            if not select(module, fqn):
                report.skipped.append(Skipped(fqn, "quant", "excluded by filter"))
                continue
            reason = (_wrapper_reason(module) or _lora_variant_reason(backbone, name)
                      or weight_read_reason(backbone, name) or dnn.quantize_reason(module, spec))
            if reason is not None:
                report.skipped.append(Skipped(fqn, "quant", reason))
                continue
            try:
                new = dnn.quantize_module(module, spec)
            except (ValueError, TypeError) as e:
                raise type(e)(f"target: quantizing {fqn} failed ({e}); exclude=[{fqn!r}] keeps it in floating "
                              f"point") from e
            new.qualified_name = fqn  # named in its errors (what `exclude` would take)
            others = tuple(places[id(module)][1:])
            _swap_module(backbone, name, new, undo, also=others)
            for where in (fqn, *(f"{prefix}{n}" for n in others)):
                report.replaced.append(Replaced(where, "quant", type(module).__name__, _describe(new),
                                                _backend_of(new)))
    else:
        # a calibrated recipe: it knows its layers; it must match this backbone
        new_modules, hooks, skipped = quant.build_modules(backbone)
        for name, new in new_modules.items():
            old = backbone.get_submodule(name)
            if not select(old, f"{prefix}{name}"):  # (exclude / filter_fn: a layer kept in floating point)
                report.skipped.append(Skipped(f"{prefix}{name}", "quant", "excluded by filter"))
                continue
            new.qualified_name = f"{prefix}{name}"
            _swap_module(backbone, name, new, undo)
            report.replaced.append(Replaced(f"{prefix}{name}", "quant", type(old).__name__, _describe(new),
                                            _backend_of(new)))
        for name, reason in skipped.items():
            report.skipped.append(Skipped(f"{prefix}{name}", "quant", reason))
        for install in hooks:
            undo.push(install(backbone))
    _fuse_blocks(prefix, backbone, report, undo, select)
    _link_shared_inputs(backbone, undo)
    _fuse_norms(prefix, backbone, report, undo, select)


_MLP_SHARES_ATTENTION_INPUT = ("FluxSingleTransformerBlock", "ChromaSingleTransformerBlock")


def _link_shared_inputs(backbone, undo):
    """Sibling q/k/v projections called by diffusers' own processors quantize their shared input
    once (diffaccel.nn.shared_input.link_siblings; diffaccel's processors share it themselves)."""
    from .nn import shared_input

    # Flux's (and Chroma's) single-stream block runs proj_mlp on the same normed input its attention
    # projects; HunyuanVideo's gives its attention a concatenation of that input with the text instead
    mlp_before = {id(m.attn): m.proj_mlp for m in backbone.modules()
                  if type(m).__name__ in _MLP_SHARES_ATTENTION_INPUT and isinstance(getattr(m, "attn", None), nn.Module)
                  and isinstance(getattr(m, "proj_mlp", None), nn.Module)}
    for _, attn in _targets.attention_modules(backbone):
        also = (mlp_before[id(attn)],) if id(attn) in mlp_before else ()
        linked = shared_input.link_siblings(attn, also)
        if not linked and also:  # (proj_mlp left out of quantization, or in another format)
            linked = shared_input.link_siblings(attn)
        if linked:
            undo.push(lambda layers=linked: shared_input.unlink(layers))


def _fuse_norms(prefix, backbone, report, undo, select):
    """A norm whose output goes only to projections quantized dynamically per token computes their
    codes in the pass that writes it (diffaccel.nn.fused_norm: that instance's class becomes a fused
    subclass); the projections skip their own quantization pass."""
    from .nn import QuantLinear
    from .nn import fused_norm as dfn

    for name, block in list(backbone.named_modules()):
        for attr, layers, reason in dfn.norm_consumers(block):
            norm = getattr(block, attr, None)
            if not isinstance(norm, nn.Module) or not any(type(dfn._unwrapped(m)) is QuantLinear for m in layers):
                continue  # nothing behind it was quantized: nothing to say
            fqn = f"{prefix}{name}.{attr}" if name else f"{prefix}{attr}"
            reason = reason or dfn.fuse_reason(norm)
            act = None
            if reason is None:
                act, reason = dfn.consumers_reason(layers, dfn.norm_width(norm))
            if reason is None and not select(norm, fqn):
                reason = "excluded by filter"
            reason = reason or _wrapper_reason(norm)
            if reason is not None:
                report.skipped.append(Skipped(fqn, "quant", f"norm not fused with the quantization: {reason}"))
                continue
            before = type(norm).__name__
            dfn.fuse_norm(norm, act)
            undo.push(lambda m=norm: dfn.unfuse_norm(m))
            undo.installed.append((fqn, norm))
            names = {id(m): n for n, m in block.named_modules()}
            behind = ", ".join(names.get(id(m), "?") for m in layers)
            report.replaced.append(Replaced(fqn, "quant", before,
                                            f"{type(norm).__name__}({act} codes for {behind}) via layer_norm_quantize",
                                            _op_backend("layer_norm_quantize",
                                                        _module_device(block) or torch.device("cpu"))))


def _fuse_blocks(prefix, backbone, report, undo, select):
    """Blocks whose layers were just quantized with int8 (or fp8) activations get their fused form:
    a diffusers FeedForward runs its activation in the up projection's epilogue
    (diffaccel.nn.FusedFeedForward), a ResnetBlock2D its GroupNorm + SiLU inside its convs
    (diffaccel.nn.resnet: that instance's class becomes FusedResnetBlock2D)."""
    from .nn import QuantConv2d, QuantLinear
    from .nn import feed_forward as dff
    from .nn import resnet as dres

    # (the block's module, the quantized layer type it needs, what the report calls it, how to fuse it)
    kinds = ((dff, QuantLinear, "feed-forward", _fuse_feed_forward), (dres, QuantConv2d, "resnet block", _fuse_resnet))
    for name, module in list(backbone.named_modules()):
        for kind, layer_type, what, fuse in kinds:
            if not kind.is_target(module):
                continue
            fqn = f"{prefix}{name}"
            if not any(isinstance(m, layer_type) for m in module.modules()):
                continue  # nothing of it was quantized: nothing to say
            reason = kind.fuse_reason(module)
            if reason is None and not select(module, fqn):
                reason = "excluded by filter"
            if reason is None:
                reason = _wrapper_reason(module)
            if reason is not None:
                report.skipped.append(Skipped(fqn, "quant", f"{what} not fused: {reason}"))
                continue
            before = type(module).__name__  # (a ResNet block's class changes in place)
            after, backend = fuse(backbone, name, module, undo)
            report.replaced.append(Replaced(fqn, "quant", before, after, backend))


def _fuse_feed_forward(backbone, name, module, undo):
    from .nn import feed_forward as dff

    fused = dff.FusedFeedForward(module)
    # the original shares its net with the replacement: it is a container, not a float module to hold
    _swap_module(backbone, name, fused, undo, hold_original=False)
    writes = "writes net.2's int8 codes" if fused.writes_codes else "writes the activation"
    return f"FusedFeedForward({fused.activation} epilogue, {writes}) via {fused.op_name}", _backend_of(fused)


def _fuse_resnet(backbone, name, module, undo):
    from .nn import resnet as dres

    dres.fuse_resnet(module)
    undo.push(lambda m=module: dres.unfuse_resnet(m))
    undo.installed.append((name, module))
    return ("FusedResnetBlock2D(GroupNorm + SiLU in conv1 / conv2's gather) via int8_conv2d",
            _op_backend("int8_conv2d", _module_device(module) or torch.device("cpu")))


def _describe(module: nn.Module) -> str:
    """e.g. ``QuantLinear(w=int8/channel a=int8/dynamic) via int8_linear``: the format and the op it runs."""
    spec = getattr(module, "spec", None)
    if spec is None:
        return type(module).__name__
    w = f"w={spec.weight_dtype}/{spec.weight_group_size or 'channel'}"
    a = f"a={spec.act_dtype}/{spec.act_mode}{'' if spec.act_symmetric else '-asym'}" if spec.act_dtype else "a=float"
    op = getattr(module, "op_name", None)
    return f"{type(module).__name__}({w} {a})" + (f" via {op}" if op else "")


def _backend_of(module: nn.Module) -> str:
    module = quantized_layer_of(module) or module  # (MixDQ's BOS path: the quantized layer it wraps runs)
    op = getattr(module, "op_name", None)
    if op is None:
        return "n/a"
    device = _module_device(module) or torch.device("cpu")
    backend = _op_backend(op, device)
    if backend == "cuda":
        # a _C kernel that covers some calls only (the sm_90 GEMMs): what this module's calls take
        backend = _probed_backend(module, op, device) or backend
    return backend


def _probed_backend(module: nn.Module, op: str, device: torch.device) -> Optional[str]:
    """The backend of ``module``'s ``op`` call on an input of FUSED_QUANT_MAX_M + 1 rows (above it
    every GEMM takes the same path), or None where the op's choice does not depend on the call."""
    from .nn import QuantConv2d
    from .ops import _backend
    from .ops.gemm import FUSED_QUANT_MAX_M

    if _backend.registered_ops()[op].cuda_covers is None:
        return None
    layer = module.net[0].proj if hasattr(module, "net") else module  # FusedFeedForward: its up projection
    dtype = getattr(layer, "original_dtype", torch.float16)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    if isinstance(layer, QuantConv2d):
        side = int((FUSED_QUANT_MAX_M + 1) ** 0.5) + 1
        x = torch.zeros(1, layer.in_channels, side, side, dtype=dtype, device=device)
    else:
        x = torch.zeros(FUSED_QUANT_MAX_M + 1, layer.in_features, dtype=dtype, device=device)
    # (a layer whose input quantization is shared with its siblings reaches the GEMM as int8_act_gemm)
    ops = (op, "int8_act_gemm") if op == "int8_linear" else (op,)
    with torch.no_grad():
        return _backend.probe_backend(lambda: module(x), ops)


def _op_backend(op: str, device: torch.device) -> str:
    from .ops import _backend

    try:
        return _backend.choose(op, device)[0]
    except _backend.BackendUnavailable as e:
        return f"unavailable ({e})"


SOLVER_OPTIONS = ("dc_ratios", "dc_order", "noise", "seed")


def _solver_key(solver):
    """A hashable form of ``solver`` (bool, or a dict of patch_scheduler options) for the idempotence check."""
    if not isinstance(solver, dict):
        return bool(solver)
    unknown = sorted(set(solver) - set(SOLVER_OPTIONS))
    if unknown:
        raise ValueError(f"solver: unknown option(s) {unknown}; expected a bool or a dict with keys from "
                         f"{list(SOLVER_OPTIONS)} (passed to diffaccel.patch_scheduler)")
    key = []
    for name in SOLVER_OPTIONS:
        v = solver.get(name)
        if name == "dc_ratios" and v is not None:
            try:
                v = tuple(float(r) for r in torch.as_tensor(v, dtype=torch.float64).reshape(-1).tolist())
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"solver['dc_ratios']: expected a sequence of floats, got {type(v).__name__}") from e
        key.append((name, v))
    return tuple(key)


def _patch_solver(target_info, report, undo, solver_options=None):
    from . import solvers

    scheduler = target_info.scheduler
    if scheduler is None:
        return
    if solvers.is_patched(scheduler):
        owner = _patched_through(scheduler)
        by = (f"another {type(owner).__name__} (0x{id(owner):x}) that shares it" if owner is not None
              else "patch_scheduler")
        if solver_options:
            raise ValueError(f"solver: the scheduler is already patched by {by}; give the DC-Solver options "
                             + ("to patch_scheduler, or unpatch_scheduler it first" if owner is None else
                                f"when patching that {type(owner).__name__}, or unpatch it first"))
        report.skipped.append(Skipped("scheduler", "solver", f"already patched by {by}" + (
            "; it runs fused while that one stays patched" if owner is not None else "")))
        return
    try:
        result = solvers.patch_scheduler(scheduler, **(solver_options or {}))
    except (TypeError, ValueError) as e:
        # patch_scheduler names its own argument ("seed: ..."); here the caller passed solver={"seed": ...}
        name, sep, rest = str(e).partition(": ")
        option = name.split("[", 1)[0]
        if not sep or option not in (solver_options or {}):
            raise
        raise type(e)(f"solver[{option!r}]{name[len(option):]}: {rest}") from None
    if not result.patched:
        report.skipped.append(Skipped("scheduler", "solver", result.reason))
        return
    undo.push(lambda s=scheduler: solvers.unpatch_scheduler(s))
    device = next((_module_device(b) for b in target_info.backbones.values()), None) or torch.device("cpu")
    report.replaced.append(Replaced("scheduler", "solver", result.name, f"fused {result.name}.step",
                                    _op_backend("fused_solver_step", device)))


class _MethodGuard:
    """Set as an instance attribute over a method of a patched target or its backbones (fuse_lora,
    save_pretrained, add_adapter): ``check(owner, backbones, *args, **kwargs)`` runs first and raises
    before the class's method changes or writes anything (diffusers merges LoRA layer by layer, saves
    a pipeline component by component and peft wraps layer by layer, so a refusal from inside would
    come after part of the work). Plain data and a
    module-level check, so that a deepcopy checks its own backbones and a pickle works."""

    def __init__(self, owner, name: str, check: Callable[..., None], backbones: list):
        self.owner = owner
        self.name = name
        self.check = check
        self.backbones = backbones

    def __call__(self, *args, **kwargs):
        self.check(self.owner, self.backbones, *args, **kwargs)
        return getattr(type(self.owner), self.name)(self.owner, *args, **kwargs)


def _guard_method(target, info, undo: _UndoLog, name: str, check: Callable[..., None]) -> None:
    """Put a _MethodGuard over ``name`` on the target and each backbone that has that method;
    ``check(owner, backbones, *args, **kwargs)`` (the call's own arguments) decides. unpatch takes
    the guards off."""
    backbones = list(info.backbones.values())
    owners = backbones if any(b is target for b in backbones) else [target] + backbones
    for owner in owners:
        if not callable(getattr(type(owner), name, None)) or name in vars(owner):
            continue
        guard = _MethodGuard(owner, name, check, backbones)
        object.__setattr__(owner, name, guard)

        def drop_guard(owner=owner, guard=guard):
            if vars(owner).get(name) is guard:
                object.__delattr__(owner, name)

        undo.push(drop_guard)


def _check_fusable(owner, backbones, *args, **kwargs) -> None:
    from .nn import lora as dlora

    for backbone in backbones:
        dlora.check_fusable(backbone)


def _support_lora_on_quantized(target, info, undo: _UndoLog) -> None:
    """LoRA loaded after patching lands beside the quantized layers (peft learns to wrap them, once
    per process, see diffaccel.nn.lora); fuse_lora on the patched target or its backbones refuses,
    before merging anything, while a LoRA layer sits on a quantized base, and add_adapter refuses,
    before wrapping any layer, a config (DoRA, PiSSA, ...) that needs a quantized layer's float weight."""
    from .nn import lora as dlora

    dlora.install_peft_dispatch()
    _guard_method(target, info, undo, "fuse_lora", _check_fusable)
    _guard_method(target, info, undo, "add_adapter", _check_adapter)


def _check_adapter(owner, backbones, adapter_config=None, *args, **kwargs) -> None:
    from .nn import lora as dlora

    dlora.check_adapter_config(owner, kwargs.get("adapter_config", adapter_config))


def _saving_pipeline(owner):
    """The pipeline whose save_pretrained is calling ``owner.save_pretrained`` (a backbone patched on
    its own inside an unpatched pipeline), or None for a direct call."""
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        caller = frame.f_locals.get("self")
        if frame.f_code.co_name == "save_pretrained" and caller is not owner and hasattr(caller, "components"):
            return caller
        frame = frame.f_back
    return None


def _check_savable(owner, backbones, *args, **kwargs) -> None:
    for backbone in backbones:
        name = next((n for n, m in backbone.named_modules() if isinstance(m, QuantLayerBase)), None)
        if name is not None:
            pipe = _saving_pipeline(owner)
            written = "nothing was written" if pipe is None else (
                f"nothing of it was written, but {type(pipe).__name__}.save_pretrained, which is not patched "
                f"itself, has written the components it saved before this one (patch the pipeline, not its "
                f"backbone, for a refusal before anything is written)")
            raise RuntimeError(
                f"save_pretrained: {name} is a diffaccel quantized layer, whose low-bit buffers diffusers' "
                f"from_pretrained cannot load (the checkpoint would lack the float weights); {written}. Save the "
                f"float model: diffaccel.unpatch, save_pretrained, then patch again (a calibrated recipe saves "
                f"on its own: recipe.save(path))")


# -- public ------------------------------------------------------------------------------

_ENV_OFF = ("", "0", "false", "no", "off")
_ENV_ON = ("1", "true", "yes", "on")


def disabled_by_env() -> bool:
    """DIFFACCEL_DISABLE set to 1 / true / yes / on (any case); unset, empty, 0 / false / no / off
    leave patching on, and any other value is refused (a typo must not silently disable)."""
    value = os.environ.get(ENV_DISABLE, "").strip().lower()
    if value in _ENV_OFF:
        return False
    if value in _ENV_ON:
        return True
    raise ValueError(f"{ENV_DISABLE}: expected 1 / true / yes / on to disable, 0 / false / no / off (or unset) to "
                     f"enable, got {os.environ[ENV_DISABLE]!r}")


def _patterns(exclude) -> tuple:
    """``exclude`` as a tuple of fnmatch patterns (one string would be read letter by letter: '*')."""
    if isinstance(exclude, str):
        raise TypeError(f"exclude: expected a list or tuple of name patterns, got the string {exclude!r}; "
                        f"write exclude=({exclude!r},)")
    try:
        patterns = tuple(exclude)
    except TypeError:
        raise TypeError(f"exclude: expected a list or tuple of name patterns, got {type(exclude).__name__}") from None
    bad = next((p for p in patterns if not isinstance(p, str)), None)
    if bad is not None:
        raise TypeError(f"exclude: expected name patterns (str), got {bad!r}")
    return patterns


def patch(target, *, attention=True, quant=None, solver=True, attention_quant=None,
          filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, exclude=(),
          keep_originals: bool = True) -> PatchReport:
    """Swap diffaccel's fused attention, quantized layers and fused solver into ``target`` in place.

    target: a diffusers pipeline (its backbone and scheduler; text encoders and VAE are left
        alone), a diffusers model, or any nn.Module.
    attention: replace attention processors with diffaccel's; ``attention_quant="int8"``
        selects the quantized attention path.
    quant: None, a preset name ("w8a8", "fp8", "w4a8", "w4a16"), a QuantSpec, or a
        QuantRecipe from ``diffaccel.calibrate``. For a pipeline with several backbones (Wan 2.2's
        ``transformer`` and ``transformer_2``), a dict from backbone name to any of those: a recipe
        belongs to one backbone, so one recipe for several is refused; backbones the dict leaves
        out are not quantized.
    solver: replace the pipeline scheduler's step with the fused one; a dict passes its options
        to ``patch_scheduler`` (``{"dc_ratios": [...], "dc_order": 2}``: DC-Solver's compensation
        on UniPC; ``{"noise": "philox", "seed": 0}``: noise drawn inside the step kernel).
    filter_fn(module, qualified_name) -> bool and ``exclude`` (fnmatch patterns of qualified
        names) choose where attention and quantization apply.
    keep_originals: keep the replaced float modules so ``unpatch`` can restore them (set False
        to free their memory; ``unpatch`` then refuses for those modules).
    """
    if attention_quant not in (None, "int8"):
        raise ValueError(f"attention_quant: expected None or 'int8', got {attention_quant!r}")
    if attention is False and attention_quant is not None:
        raise ValueError(f"attention_quant: {attention_quant!r} with attention=False; the INT8 attention path is "
                         f"part of the attention patch")
    for name, flag in (("attention", attention), ("keep_originals", keep_originals)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected True or False, got {flag!r}")
    if not isinstance(solver, (bool, dict)):
        raise TypeError(f"solver: expected True, False or a dict of patch_scheduler options, got {solver!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn: expected a callable (module, qualified_name) -> bool or None, got "
                        f"{type(filter_fn).__name__} (name patterns go in exclude=)")
    exclude = _patterns(exclude)
    info = _targets.resolve_target(target)
    quant_of = _quant_per_backbone(quant, info)
    if isinstance(solver, dict) and solver and info.scheduler is None:
        raise ValueError(f"solver: scheduler options {sorted(solver)}, but {type(target).__name__} holds no "
                         f"scheduler; leave solver at its default (or use patch_scheduler on the scheduler)")
    options = (attention, _quant_key(quant), _solver_key(solver), attention_quant, filter_fn, exclude,
               keep_originals)
    if disabled_by_env():  # (after the checks: a bad call fails the same with diffaccel switched off)
        report = PatchReport(notes=[f"{ENV_DISABLE}={os.environ[ENV_DISABLE].strip()}: patch is a no-op, "
                                    f"nothing was changed"])
        log.warning(report.notes[0])
        return report

    def select(module, fqn):
        if exclude and _matches(fqn, exclude):
            return False
        return filter_fn is None or bool(filter_fn(module, fqn))

    state = getattr(target, _STATE_ATTR, None)
    if state is not None:
        if state.options != options:
            if state.copied:  # (unpatch refuses a copy: its float originals belong to the model it came from)
                raise ValueError("target: a copy of a patched model (copy.deepcopy / torch.load), patched with "
                                 + ("other options" if state.options is not None else
                                    "a recipe, spec or filter_fn a loaded copy cannot compare")
                                 + "; a copy cannot be unpatched: patch a fresh model with these options instead")
            raise ValueError("target: already patched with other options; call diffaccel.unpatch(target) first")
        return _patch_again(target, info, state, select, attention, attention_quant, solver)

    shared = _shared_with(target, info)
    if shared is not None:
        raise ValueError(f"target: {_describe_owner(*shared)}; it already runs diffaccel there. Patch or unpatch "
                         f"that {type(shared[1]).__name__} instead")

    report = PatchReport()
    undo = _UndoLog()
    # modules built inside torch.inference_mode would hold inference tensors, whose in-place
    # updates (the per-timestep state of a recipe) fail in a later plain no_grad run
    with torch.inference_mode(False):
        try:
            for attr, backbone in info.backbones.items():
                prefix = f"{attr}." if attr else ""
                if attention:
                    _patch_attention(prefix, backbone, report, undo, select, attention_quant)
                if quant_of[attr] is not None:
                    _patch_quant(prefix, backbone, quant_of[attr], report, undo, select)
                elif isinstance(quant, dict):
                    report.skipped.append(Skipped(attr, "quant", "backbone not in the quant dict"))
            if isinstance(solver, dict) or solver:
                _patch_solver(info, report, undo, solver if isinstance(solver, dict) else None)
            elif info.scheduler is not None:
                report.skipped.append(Skipped("scheduler", "solver", "solver=False"))
            for name, reason in info.left_alone.items():
                report.skipped.append(Skipped(name, "component", reason))
            if quant is not None:
                _guard_method(target, info, undo, "save_pretrained", _check_savable)
                if importlib.util.find_spec("peft") is not None:
                    _support_lora_on_quantized(target, info, undo)
        except BaseException:
            undo.rollback()
            raise
    # Only now, with nothing left to roll back, let the float originals go (or off the GPU).
    restorable = bool(keep_originals) or not undo.originals
    if not keep_originals and undo.originals:
        undo.originals.clear()
        undo = _UndoLog()
        report.notes.append("keep_originals=False: replaced float modules were freed; unpatch is unavailable")
    else:
        for original in undo.originals:
            device = _module_device(original)
            if device is not None and device.type != "cpu":
                original.to("cpu")  # held for unpatch without holding accelerator memory
    # the scheduler too: another pipeline sharing it (SDXL's refiner built with scheduler=base.scheduler)
    # is told whose patch fused it
    patched_scheduler = [info.scheduler] if any(r.part == "solver" for r in report.replaced) else []
    _hold_through(target, (*info.backbones.values(), *patched_scheduler), undo)
    backbones = tuple(info.backbones.values())
    if quant is not None and not any(r.part == "quant" for r in report.replaced):
        hooked = sum(s.part == "quant" and s.reason in (_WRAPPED_FORWARD_REASON, _ACCELERATE_HOOK_REASON)
                     for s in report.skipped)
        report.notes.append("quant: no layer was quantized" + (
            f"; {hooked} are wrapped by hooks (diffusers' layerwise casting or group offloading, accelerate's "
            f"dispatch): patch before enabling them" if hooked else "; the reasons are below"))
    object.__setattr__(target, _STATE_ATTR, _PatchState(options, report, undo, restorable, backbones=backbones,
                                                        cast_at_patch=_layerwise_cast(backbones)))
    log.info("diffaccel.patch(%s):\n%s", type(target).__name__, report)
    return report


def _patch_again(target, info, state: _PatchState, select, attention, attention_quant, solver) -> PatchReport:
    """``patch`` on a target already patched with the same options. What was patched stays as it is;
    what was set since is patched now: attention processors replaced after patching (diffusers'
    set_attn_processor and the like) and a scheduler assigned to the pipeline. The report is brought
    up to date. With nothing new, nothing changes."""
    from . import solvers
    from .integrations import attention as attn_integration

    if state.copied:
        return state.report
    delta, undo = PatchReport(), _UndoLog()
    with torch.inference_mode(False):
        try:
            if attention:
                for attr, backbone in info.backbones.items():
                    _patch_attention(f"{attr}." if attr else "", backbone, delta, undo, select, attention_quant)
            scheduler = info.scheduler
            if (isinstance(solver, dict) or solver) and scheduler is not None and not solvers.is_patched(scheduler):
                _patch_solver(info, delta, undo, solver if isinstance(solver, dict) else None)
                if solvers.is_patched(scheduler):
                    _hold_through(target, (scheduler,), undo)
        except BaseException:
            undo.rollback()
            raise
    report = state.report
    fresh = {r.name for r in delta.replaced}
    # reported as patched, but replaced since by something diffaccel does not take (a sliced or
    # IP-adapter processor, an unsupported scheduler)
    lost = {s.name for s in delta.skipped if s.reason != attn_integration.ALREADY_PATCHED}
    lost &= {r.name for r in report.replaced}
    if not fresh and not lost:
        return report
    report.replaced = [r for r in report.replaced if r.name not in fresh | lost] + delta.replaced
    report.skipped = [s for s in report.skipped if s.name not in fresh] + \
        [s for s in delta.skipped if s.name in lost]
    note = (f"patched again: {len(fresh)} module(s) set since the last patch were patched"
            + (f"; {len(lost)} set since then are not supported and left as they are (see skipped)" if lost else ""))
    report.notes.append(note)
    state.undo.extend(undo)
    log.info("diffaccel.patch(%s): %s", type(target).__name__, note)
    return report


def unpatch(target) -> None:
    """Restore the original modules, processors and scheduler step. A no-op on an unpatched target.
    A scheduler patched by ``patch_scheduler`` gets its class's methods back."""
    from . import solvers

    state = getattr(target, _STATE_ATTR, None)
    if state is None:
        if _targets.is_scheduler(target):
            if solvers.unpatch_scheduler(target):
                log.info("diffaccel.unpatch(%s): restored the scheduler's own step", type(target).__name__)
            return
        _check_target_type(target)
        shared = _shared_by(target)
        if shared is not None:
            raise RuntimeError(f"target: {_describe_owner(*shared)}; unpatch that {type(shared[1]).__name__}, "
                               f"which restores it here too")
        return
    if state.copied:
        raise RuntimeError("target: a copy (deepcopy or pickle) of a patched model cannot be unpatched: the "
                           "originals belong to the model it was copied from; unpatch that one before copying, "
                           "or reload the model")
    if not state.restorable:
        raise RuntimeError("target: patched with keep_originals=False, so the float modules are gone; "
                           "reload the model instead of unpatching")
    held = [(name, module) for name, module in state.undo.installed if _held_by_hook(module)]
    if held:
        # A hook on the module would be dropped with it (or, on a class-swapped one, go on calling
        # the fused forward); one on a parent keeps the tensors on meta between calls. Either way
        # the float original would be restored where the hook keeps the buffers.
        names = ", ".join(name for name, _ in held[:3]) + (", ..." if len(held) > 3 else "")
        diffusers_hook = any(forward_wrapped(m) and not _has_accelerate_hook(m) for _, m in held)
        how = ("a diffusers hook: model.disable_cache() for a cache, else diffusers.hooks.HookRegistry"
               ".check_if_exists_or_initialize(module).remove_hook(name, recurse=True)" if diffusers_hook else
               "accelerate's: pipe.remove_all_hooks() or accelerate.hooks.remove_hook_from_submodules(model)")
        raise RuntimeError(
            f"target: {len(held)} patched modules ({names}) are held by hooks attached after patch (sequential "
            f"CPU offload, device_map dispatch, a diffusers cache or other diffusers hook); nothing was restored. "
            f"Remove them first ({how}), unpatch, then enable them again")
    if state.undo.digests and not state.cast_at_patch and _layerwise_cast(state.backbones):
        raise RuntimeError(
            "target: diffusers' layerwise casting was enabled after diffaccel.patch. The float layers unpatch "
            "would put back were never cast, and diffusers can neither remove the casting nor apply it a second "
            "time, so the model would be left half cast; nothing was restored. Reload the model (enable "
            "layerwise casting before patch, or after unpatch)")
    changed = [name for name, layer, digest in state.undo.digests
               if digest is not None and (now := layer.state_digest()) is not None
               and not QuantLayerBase.same_digest(digest, now)]
    if changed:
        names = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
        raise RuntimeError(
            f"target: {len(changed)} quantized layers ({names}) hold other weights than when they were patched "
            f"(load_state_dict of another model's patched state dict, or an in-place edit, since patching); "
            f"their float originals still hold the weights from before, so restoring them would mix two "
            f"checkpoints. Nothing was restored: load the float checkpoint into a fresh model instead")
    state.undo.rollback()
    object.__delattr__(target, _STATE_ATTR)
    log.info("diffaccel.unpatch(%s): restored", type(target).__name__)


def is_patched(target) -> bool:
    """True for a target ``patch`` patched, one sharing a backbone with such a target (a pipeline
    made with ``from_pipe``), and a scheduler with a fused step (``patch_scheduler``)."""
    from . import solvers

    if getattr(target, _STATE_ATTR, None) is not None:
        return True
    if _targets.is_scheduler(target):
        return solvers.is_patched(target)
    _check_target_type(target)
    return _shared_by(target) is not None  # a pipeline sharing a backbone with a patched one runs patched there


def _check_target_type(target) -> None:
    if not (isinstance(target, nn.Module) or _targets.is_pipeline(target)):
        raise TypeError(f"target: expected a diffusers pipeline, a torch.nn.Module or a scheduler, got "
                        f"{type(target).__name__}")


def patch_report(target) -> Optional[PatchReport]:
    state = getattr(target, _STATE_ATTR, None)
    return None if state is None else state.report


def _check_quant_arg(quant, name: str = "quant") -> None:
    from . import quant as dquant

    if isinstance(quant, str):
        try:
            dquant.resolve_spec(quant)  # raises for unknown presets, naming the argument
        except ValueError as e:
            raise ValueError(f"{name}: {str(e).removeprefix('spec: ')}") from None
        return
    if isinstance(quant, dquant.QuantSpec):
        if quant.act_mode == "static":  # (every layer would fail for want of calibrated scales)
            raise ValueError(f"{name}: a QuantSpec with static activations needs calibrated activation scales per "
                             f"layer; use diffaccel.calibrate(...) and patch with its recipe, or act_mode='dynamic'")
        return
    if hasattr(quant, "build_modules"):
        return
    raise TypeError(f"{name}: expected None, a preset name, a QuantSpec or a QuantRecipe"
                    f"{' (or a dict of them per backbone)' if name == 'quant' else ''}, got {type(quant).__name__}")


def _quant_per_backbone(quant, info) -> dict:
    """{backbone attribute: what quantizes it (None: nothing)}, with ``quant`` checked."""
    names = list(info.backbones)
    if isinstance(quant, dict):
        if names == [""]:
            raise TypeError("quant: a dict maps a pipeline's backbone names to their quantization; for a module, "
                            "pass the preset, QuantSpec or recipe itself")
        unknown = sorted(set(quant) - set(names), key=str)
        if unknown:
            raise ValueError(f"quant: {unknown} are not backbones of this pipeline (it has {names})")
        for name, q in quant.items():
            if q is not None:
                _check_quant_arg(q, f"quant[{name!r}]")
        return {name: quant.get(name) for name in names}
    if quant is not None:
        _check_quant_arg(quant)
        if hasattr(quant, "build_modules") and len(names) > 1:
            raise ValueError(f"quant: a recipe is calibrated for one backbone and this pipeline has {len(names)} "
                             f"({', '.join(names)}); pass a dict, e.g. quant={{{names[0]!r}: recipe, ...}}")
    return {name: quant for name in names}


def _quant_key(quant):
    if isinstance(quant, dict):
        return tuple(sorted((name, _quant_key(q)) for name, q in quant.items()))
    if quant is None or isinstance(quant, str):
        return quant
    from .quant import QuantSpec

    if isinstance(quant, QuantSpec):  # (equal specs are the same options; a recipe is compared by identity)
        return quant
    return id(quant)
