"""Model optimization: quantization, pruning and low-rank factorization, each measured.

The package itself is callable: `quanta.optimize(model, recipe, calibration=...)`
is `quanta.optimize.api.optimize`, while `quanta.optimize.quantize` and the
other modules stay importable as usual.
"""

import sys
import types

from quanta.optimize.api import embedding_task, optimize, optimize_builtin
from quanta.optimize.artifact import load_artifact, save_artifact
from quanta.optimize.optimizer import Optimized
from quanta.optimize.recipe import parse_recipe

__all__ = [
    "optimize",
    "optimize_builtin",
    "embedding_task",
    "load_artifact",
    "save_artifact",
    "Optimized",
    "parse_recipe",
]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return optimize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
