"""Fused scheduler steps: ``patch_scheduler(scheduler)`` swaps a one-kernel step (guidance folded
in, no host syncs) into one diffusers scheduler instance; ``unpatch_scheduler`` restores it."""
from ._patch import SchedulerPatchResult, is_patched, patch_scheduler, unpatch_scheduler
from .schedulers import ADAPTERS, unsupported_reason

SUPPORTED_SCHEDULERS = tuple(sorted(ADAPTERS))

__all__ = ["SchedulerPatchResult", "SUPPORTED_SCHEDULERS", "is_patched", "patch_scheduler", "unpatch_scheduler",
           "unsupported_reason"]
