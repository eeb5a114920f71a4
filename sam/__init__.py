"""sam: Sharpness-Aware Minimization optimizers, models, data and a trainer.

The SAM family lives in :mod:`sam.optim`; ``from sam import SAM`` is the entry point most code needs.
"""

from .optim import ASAM, GSAM, MSAM, SAM, EveryKSAM, MultiStepSAM, create, frozen_running_stats

__all__ = ["SAM", "ASAM", "MSAM", "GSAM", "MultiStepSAM", "EveryKSAM", "create", "frozen_running_stats"]
__version__ = "0.1.0"
