"""The one dispatch point: which backend runs an op, per call.

Order (DESIGN.md): the `_C` extension where it is built for this GPU's arch, else Triton
on a CUDA device, else the torch reference. On CPU the reference runs by default; the
extension's C++ CPU kernels and the Triton interpreter (``TRITON_INTERPRET=1``) run on
CPU only when forced, which is how tests check them against the reference.

``DIFFACCEL_BACKEND=cuda|triton|torch`` forces a backend for every op; an op or device
the forced backend cannot serve raises ``BackendUnavailable`` rather than falling back.

Every op is a ``torch.library`` custom op (``CustomOp`` below): that is what ``torch.compile``,
export, CUDA graphs and ``opcheck`` see. A plain eager call skips the dispatcher and runs the
op's body directly, because the dispatcher costs more host time than the kernel launch itself
(about 13 us per call, measured on CPU with the launches stubbed); see ``direct_call_ok``.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ._checks import PLAIN_TENSOR_TYPES

BACKENDS = ("cuda", "triton", "torch")
ENV_BACKEND = "DIFFACCEL_BACKEND"


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this op on this device."""


@dataclass(frozen=True)
class OpBackends:
    """The implementations of one op. ``torch`` is its single reference."""

    name: str
    torch: Callable
    cuda: Optional[Callable] = None  # wraps torch.ops.diffaccel.ext_* from the _C extension
    triton: Optional[Callable] = None
    # which devices the extension's kernels cover: "cpu" (C++ loop) and/or "cuda"
    cuda_devices: tuple = ("cuda",)
    triton_cpu: bool = True  # False where the interpreter lacks what the kernel needs
    triton_min_capability: tuple = (8, 0)  # the oldest GPU arch its Triton kernel compiles for (fp8: sm_89)
    # GPU archs the _C kernel runs on, e.g. ((9, 0),) for a wgmma kernel; None: every arch _C holds
    cuda_capabilities: Optional[tuple] = None
    # name of the _C function that says whether the kernel was compiled (e.g. "cutlass_sm90"); None: always
    cuda_built: Optional[str] = None
    # per call, for a _C kernel that covers only some arguments: f(*op_args) -> None if it runs
    # them, else why not; those calls take the next backend (Triton, then torch), a forced "cuda" raises
    cuda_covers: Optional[Callable] = None


_REGISTRY: dict[str, OpBackends] = {}
_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("diffaccel_backend", default=None)


def register(op: OpBackends) -> OpBackends:
    if op.name in _REGISTRY:
        raise RuntimeError(f"op {op.name!r} registered twice")
    _REGISTRY[op.name] = op
    return op


def registered_ops() -> dict[str, OpBackends]:
    return dict(_REGISTRY)


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Force a backend inside a block (tests, benchmarks). ``None`` restores automatic choice."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def forced_backend() -> Optional[str]:
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_BACKEND, "").strip().lower()
    if not env:
        return None
    if env not in BACKENDS:
        raise BackendUnavailable(f"{ENV_BACKEND}={env!r}: expected one of {', '.join(BACKENDS)}")
    return env


# -- what is available -------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def extension():
    """The compiled ``diffaccel._C`` module, or None (with the reason from ``extension_error``)."""
    try:
        return importlib.import_module("diffaccel._C")
    except ImportError:
        return None


def extension_error() -> Optional[str]:
    try:
        importlib.import_module("diffaccel._C")
        return None
    except ImportError as e:  # pragma: no cover - depends on the install
        return f"diffaccel._C not importable: {e}"


@functools.lru_cache(maxsize=None)
def extension_cuda_archs() -> tuple:
    """Archs the extension holds SASS for, e.g. ('8.0', '8.9', '9.0a'); () if built C++ only."""
    ext = extension()
    if ext is None:
        return ()
    return tuple(a for a in ext.cuda_archs().split(";") if a)


def _arch_matches(built: str, cap: tuple) -> bool:
    major, minor = built.rstrip("af").split(".")
    return (int(major), int(minor)) == tuple(cap)


@functools.lru_cache(maxsize=None)
def triton_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton not importable: {e}"
    try:
        importlib.import_module("diffaccel.kernels")
    except ImportError as e:
        return f"diffaccel.kernels not importable: {e}"
    return None


def gpu_kernels_missing() -> list:
    """Why GPU kernels are missing from this import of diffaccel: ``_C`` or ``diffaccel.kernels`` not
    importable (e.g. the source checkout imported instead of the installed wheel, as ``python -m``
    from the repository root does). Empty when both import; on a GPU, ops then run only the
    backends that remain, down to their torch references."""
    return [e for e in (extension_error(), triton_error()) if e]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_not(op: OpBackends, backend: str, device: torch.device) -> Optional[str]:
    """None if ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "cuda":
        if op.cuda is None:
            return f"{op.name} has no _C kernel"
        if extension() is None:
            return extension_error()
        if device.type not in op.cuda_devices:
            return f"{op.name}'s _C kernel does not cover {device.type}"
        if device.type == "cuda":
            if not extension_cuda_archs():
                return "_C was built without CUDA sources"
            cap = torch.cuda.get_device_capability(device)
            if not any(_arch_matches(a, cap) for a in extension_cuda_archs()):
                return f"_C holds no code for sm_{cap[0]}{cap[1]} (built: {';'.join(extension_cuda_archs())})"
            if op.cuda_capabilities is not None and tuple(cap) not in op.cuda_capabilities:
                archs = ", ".join(f"sm_{a}{b}" for a, b in op.cuda_capabilities)
                return f"{op.name}'s _C kernel runs on {archs} only (this GPU is sm_{cap[0]}{cap[1]})"
        if op.cuda_built is not None and not getattr(extension(), op.cuda_built)():
            return f"{op.name}'s _C kernel was not compiled in this build (_C.{op.cuda_built}() is False)"
        return None
    if backend == "triton":
        if op.triton is None:
            return f"{op.name} has no Triton kernel"
        err = triton_error()
        if err:
            return err
        if device.type == "cpu":
            if not triton_interpreting():
                return "Triton runs on CPU only under TRITON_INTERPRET=1"
            if not op.triton_cpu:
                return f"{op.name}'s Triton kernel needs what the interpreter lacks"
        elif device.type != "cuda":
            return f"Triton does not run on {device.type}"
        else:
            cap = torch.cuda.get_device_capability(device)
            if tuple(cap) < tuple(op.triton_min_capability):
                need = "".join(map(str, op.triton_min_capability))
                return f"{op.name}'s Triton kernel needs sm_{need}+ (this GPU is sm_{cap[0]}{cap[1]})"
        return None
    raise BackendUnavailable(f"unknown backend {backend!r}")


def choose(op_name: str, device: torch.device) -> tuple[str, str]:
    """(backend, reason) for a call of ``op_name`` on ``device``."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _choose(op_name, device, forced_backend(), triton_interpreting())


@functools.lru_cache(maxsize=None)
def _choose(op_name: str, device: torch.device, forced: Optional[str], interpreting: bool) -> tuple[str, str]:
    # per call this would ask the driver for the GPU's capability; the answer depends only on the
    # key (``interpreting`` is in it because _why_not reads TRITON_INTERPRET)
    op = _REGISTRY[op_name]
    if forced is not None:
        why = _why_not(op, forced, device)
        if why is not None:
            raise BackendUnavailable(f"backend {forced!r} forced for {op_name} on {device.type}, but {why}")
        return forced, "forced"
    if device.type == "cuda":
        for backend in ("cuda", "triton"):
            why = _why_not(op, backend, device)
            if why is None:
                if backend == "cuda" and op.cuda_covers is not None:
                    return backend, f"fastest available (calls it does not cover: {_uncovered(op_name, device)})"
                return backend, "fastest available"
        return "torch", "no GPU kernel available"
    return "torch", "reference on CPU"


@functools.lru_cache(maxsize=None)
def _uncovered(op_name: str, device: torch.device) -> str:
    """The backend for calls a partial _C kernel (``cuda_covers``) declines: Triton, else torch."""
    return "triton" if _why_not(_REGISTRY[op_name], "triton", device) is None else "torch"


def implementation(op_name: str, device: torch.device, args: Optional[tuple] = None) -> Callable:
    """The function that runs ``op_name`` on ``device``; ``args`` (the op's arguments) are needed
    for an op whose _C kernel covers only some calls (``OpBackends.cuda_covers``)."""
    backend, _ = choose(op_name, device)
    op = _REGISTRY[op_name]
    if backend == "cuda" and op.cuda_covers is not None:
        if args is None:
            raise TypeError(f"implementation({op_name!r}): its _C kernel covers some calls only; pass args")
        why = op.cuda_covers(*args)
        if why is not None:
            if forced_backend() == "cuda":
                raise BackendUnavailable(f"backend 'cuda' forced for {op_name}, but its _C kernel {why}")
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            backend = _uncovered(op_name, device)
    probe = _probing.get()
    if probe is not None and op_name in probe[0]:
        probe[1] = backend
        raise _Probed
    fn = getattr(op, backend)
    if backend == "torch" and device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        # each op fixes its own precision (fp32 accumulation, its output dtype); a caller's autocast
        # would run the torch references' fp32 matmuls in bf16 (Triton and _C ignore it)
        return _without_autocast(fn, device.type)
    if backend == "triton" and device.type == "cuda" and device.index is not None \
            and device.index != torch.cuda.current_device():
        # Triton launches on the current device (the _C kernels set a device guard themselves)
        return _on_device(fn, device)
    return fn


def run(op_name: str, *args):
    """Run ``op_name`` on its arguments with the backend ``implementation`` picks for them (on the
    device of the first argument): the body of an op."""
    return implementation(op_name, args[0].device, args)(*args)


def _without_autocast(fn: Callable, device_type: str) -> Callable:
    def without_autocast(*args):
        with torch.autocast(device_type, enabled=False):
            return fn(*args)
    return without_autocast


class _Probed(Exception):
    """Raised by ``implementation`` under ``probe_backend`` once the probed op's backend is known."""


_probing: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("diffaccel_probe", default=None)


def probe_backend(fn: Callable[[], object], op_names: tuple) -> Optional[str]:
    """The backend the first call of one of ``op_names`` made by ``fn()`` would run on; that call
    does not run (ops before it do). None if ``fn()`` makes no such call or fails before it. For an
    op whose _C kernel covers some calls only, this is how a report says what a module's calls run on."""
    state = [tuple(op_names), None]
    token = _probing.set(state)
    try:
        fn()
    except _Probed:
        pass
    except Exception:  # noqa: BLE001 - a probe that cannot run says nothing
        return None
    finally:
        _probing.reset(token)
    return state[1]


def _on_device(fn: Callable, device: torch.device) -> Callable:
    def on_device(*args):
        with torch.cuda.device(device):
            return fn(*args)
    return on_device


# -- the custom ops and their eager fast path -----------------------------------------------

_direct_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("diffaccel_direct_calls", default=True)


@contextlib.contextmanager
def through_dispatcher():
    """Every op call inside goes through the torch dispatcher (tests compare the two paths)."""
    token = _direct_enabled.set(False)
    try:
        yield
    finally:
        _direct_enabled.reset(token)


def direct_call_ok(args) -> bool:
    """Whether an op call can run its body directly instead of through the dispatcher: in eager
    mode on plain tensors that need no gradient, with no mode, transform, tracer or profiler that
    expects to see the op. Anything else takes the dispatcher, so it sees what it always saw."""
    if torch.compiler.is_compiling() or not _direct_enabled.get():
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state() is not None
            or torch.autograd._profiler_enabled() or torch.autograd.forward_ad._current_level >= 0):
        return False  # (forward-mode AD: dual tensors' tangents would be dropped by the body)
    grad = torch.is_grad_enabled()
    for a in args:
        if type(a) in PLAIN_TENSOR_TYPES:
            if a.is_meta or (grad and a.requires_grad):
                return False
        elif hasattr(type(a), "__torch_function__"):
            # tensor subclasses, and fx.Proxy under torch.fx.symbolic_trace, must see the op
            return False
    return True


def _unsupported_transform(args) -> Optional[str]:
    """What would differentiate through the op other than reverse-mode autograd: forward-mode AD (a
    dual tensor among ``args``; torch.func.jvp), whose tangents the op would drop silently, or
    torch.func.grad / vjp, which torch refuses for the op's autograd with an internal message."""
    if torch.autograd.forward_ad._current_level >= 0 and any(
            isinstance(a, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(a).tangent is not None
            for a in args):
        return "forward-mode AD (torch.autograd.forward_ad)"
    if torch._C._are_functorch_transforms_active():
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        kinds = {i.key() for i in retrieve_all_functorch_interpreters()}
        if TransformType.Jvp in kinds:
            return "forward-mode AD (torch.func.jvp / jacfwd)"
        if TransformType.Grad in kinds:
            return "torch.func.grad / vjp / jacrev"
    return None


class CustomOp:
    """``diffaccel::<name>``, registered with ``torch.library.custom_op`` from ``body``; calling
    this object runs ``body`` directly where ``direct_call_ok`` allows, else the registered op.
    Both run the same code: the dispatcher adds only its bookkeeping."""

    def __init__(self, name: str, body: Callable, mutates_args=()):
        self.name = name
        self.fake: Optional[Callable] = None

        @functools.wraps(body)  # (the op's schema is read from body's signature)
        def run_body(*args):
            # An empty first operand (no rows, no queries, an empty batch) has only empty outputs,
            # which the fake builds; kernels and references are never asked for zero-sized grids.
            if self.fake is not None and isinstance(args[0], torch.Tensor) and args[0].numel() == 0:
                outs = self.fake(*args)
                if all(t.numel() == 0 for t in (outs if isinstance(outs, tuple) else (outs,))):
                    return outs
            return body(*args)

        self.body = run_body
        self.definition = torch.library.custom_op(f"diffaccel::{name}", run_body, mutates_args=mutates_args)
        self.packet = getattr(torch.ops.diffaccel, name)

    def register_fake(self, fn: Callable) -> Callable:
        self.fake = fn
        return self.definition.register_fake(fn)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.definition.register_autograd(backward, setup_context=setup_context)

    def __call__(self, *args):
        if direct_call_ok(args):
            return self.body(*args)
        transform = _unsupported_transform(args)
        if transform is not None:
            raise NotImplementedError(
                f"diffaccel.ops.{self.name}: {transform} is not supported (the op has a reverse-mode backward "
                f"only); use loss.backward() / torch.autograd.grad, or diffaccel.unpatch the model for it")
        return self.packet(*args)


def recomputed_grads(forward: Callable, inputs: tuple, needs: tuple, grads: tuple) -> tuple:
    """A backward that recomputes: ``forward(*inputs)`` (differentiable torch math, returning a tuple
    of outputs) run again with grad enabled, then the vector-Jacobian product with ``grads``. Per
    input, its gradient where ``needs`` says so, else None. Outputs that are empty, do not depend on
    the inputs or got no gradient are left out."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) if t is not None else None for t, n in zip(inputs, needs)]
        outs = forward(*leaves)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad and o.numel()]
        wanted = [t for t, n in zip(leaves, needs) if n]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                   if pairs and wanted else [None] * len(wanted))
    return tuple(next(got) if n else None for n in needs)


def custom_op(name: str, *, mutates_args=()):
    """Decorator: ``@custom_op("attention")`` over the op's body (annotated like any
    ``torch.library.custom_op``) makes it a ``CustomOp``."""
    def wrap(body: Callable) -> CustomOp:
        return CustomOp(name, body, mutates_args)
    return wrap


def explain(device: Optional[torch.device] = None) -> list[dict]:
    """For ``diffaccel.info``: per op, the backend a call would use and why, and what else exists."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise TypeError(f"device: expected a torch.device or a name like 'cuda:0', got {device!r} ({e})") from None
    rows = []
    for name, op in sorted(_REGISTRY.items()):
        try:
            backend, reason = choose(name, device)
        except BackendUnavailable as e:
            backend, reason = "unavailable", str(e)
        others = {b: (_why_not(op, b, device) or "available") for b in BACKENDS if b != backend}
        rows.append({"op": name, "device": device.type, "backend": backend, "reason": reason, "others": others})
    return rows
