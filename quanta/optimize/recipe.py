"""Recipes: which changes the optimizer tries, in which order, with which share of the budget.

A recipe is a small declarative value, named on the command line:

    bf16        the whole model in bfloat16
    int8        int8 matmuls (torch._int_mm) where faster and within budget, else bf16
    int4        int4 weights, group-wise, where within budget (for size, not speed)
    prune       structured pruning: whole FFN neurons and attention heads removed
    lowrank     activation-aware SVD where the rank saves work
    prune+int8  any structural change first, then a precision, joined by "+"

Every step is judged against the original model, not the previous step, so
the budget is the total drop the user allows. A structural step may spend up
to `share` of it and leaves the rest to the precision step after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from quanta.errors import ConfigError, shorten

__all__ = ["Step", "Recipe", "STRUCTURAL", "PRECISIONS", "parse_recipe"]

STRUCTURAL = ("prune", "lowrank")
PRECISIONS = ("bf16", "int8", "int4")
# A structural change followed by a precision may spend this share of the budget.
STRUCTURAL_SHARE = 0.6


@dataclass(frozen=True)
class Step:
    """One change of a recipe; it may bring the loss up to `share` x the budget."""

    kind: str
    share: float = 1.0


@dataclass(frozen=True)
class Recipe:
    """A named sequence of steps, e.g. `prune+int8`."""

    name: str
    steps: tuple[Step, ...]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "steps": [{"kind": s.kind, "share": s.share} for s in self.steps],
        }


def parse_recipe(name: str) -> Recipe:
    """The recipe called `name`: one step, or steps joined by "+".

    Raises:
        ConfigError: an unknown step, a repeated one, more than one precision, or a
            structural step after a precision.

    Example:
        >>> [s.kind for s in parse_recipe("prune+int8").steps]
        ['prune', 'int8']
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"recipe {shorten(name)} is empty; choose e.g. int8 or prune+int8")
    kinds = [part.strip() for part in name.split("+")]
    for kind in kinds:
        if kind not in STRUCTURAL + PRECISIONS:
            raise ConfigError(
                f"recipe {name!r} has unknown step {kind!r}; steps are "
                f"{', '.join(STRUCTURAL + PRECISIONS)}, joined by '+'"
            )
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"recipe {name!r} names a step twice")
    precisions = [k for k in kinds if k in PRECISIONS]
    if len(precisions) > 1:
        raise ConfigError(f"recipe {name!r} names {len(precisions)} precisions; choose one")
    if precisions and kinds[-1] not in PRECISIONS:
        raise ConfigError(f"recipe {name!r}: the precision comes last, e.g. prune+int8")

    structural = [k for k in kinds if k in STRUCTURAL]
    steps = []
    for index, kind in enumerate(structural):
        # Each structural step may spend its part of the structural share.
        cap = STRUCTURAL_SHARE if precisions else 1.0
        steps.append(Step(kind, share=cap * (index + 1) / len(structural)))
    steps += [Step(kind) for kind in precisions]
    return Recipe("+".join(kinds), tuple(steps))
