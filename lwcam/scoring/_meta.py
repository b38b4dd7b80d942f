"""The metadata every score carries beside its function: its family, its direction and what it needs.

As Quantus states each metric's ``evaluation_category`` and ``score_direction`` on the metric itself,
every public score of :mod:`lwcam.scoring` is declared with :func:`score`, which records a
:class:`ScoreInfo` in :data:`SCORES` and on the function (``fn.score_info``). A table column that is a
score's value states the same direction; ``tests/test_architecture.py`` checks the scorecard's columns
against these declarations (a column derived from a score, such as a difference, states its own).

Example:
    >>> @score("complexity", "higher", needs=())
    ... def ones(saliency):
    ...     return saliency.new_ones(len(saliency))
    >>> ones.score_info.family, ones.score_info.direction, "ones" in SCORES
    ('complexity', 'higher', False)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, TypeVar

__all__ = ["FAMILIES", "NEEDS", "SCORES", "ScoreInfo", "score"]

Family = Literal["faithfulness", "localisation", "randomisation", "robustness", "complexity"]
Direction = Literal["higher", "lower", "neither"]

#: The five families of the scorecard (Quantus' categories less axiomatic), in the order of its columns.
FAMILIES: tuple[Family, ...] = ("faithfulness", "localisation", "randomisation", "robustness", "complexity")

#: What a score may need besides the map: the model being explained (queried), a ground-truth mask, or an
#: explainer to run again (on a randomised model or a perturbed image).
NEEDS = frozenset({"model", "mask", "explainer"})

_REGISTRY: dict[str, ScoreInfo] = {}

#: Every declared score of :mod:`lwcam.scoring`, by function name (read-only; filled as its modules load).
SCORES: Mapping[str, ScoreInfo] = MappingProxyType(_REGISTRY)

F = TypeVar("F", bound=Callable[..., object])


@dataclass(frozen=True)
class ScoreInfo:
    """A score's family, direction and needs.

    Attributes:
        name: the function's name.
        family: one of :data:`FAMILIES`.
        direction: ``"higher"`` or ``"lower"`` is better, or ``"neither"`` (a similarity whose reading
            depends on its use); a tuple gives one direction per returned value, in order.
        needs: a subset of :data:`NEEDS`.
    """

    name: str
    family: Family
    direction: Direction | tuple[Direction, ...]
    needs: frozenset[str]


def _check(family: str, direction: object, needs: tuple[str, ...]) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    directions = direction if isinstance(direction, tuple) else (direction,)
    if not directions or any(d not in ("higher", "lower", "neither") for d in directions):
        raise ValueError(f"direction must be 'higher', 'lower', 'neither' or a tuple of them, got {direction!r}")
    unknown = set(needs) - NEEDS
    if unknown:
        raise ValueError(f"needs must be a subset of {sorted(NEEDS)}, got unknown {sorted(unknown)}")


def score(family: Family, direction: Direction | tuple[Direction, ...], *, needs: tuple[str, ...] = ()
          ) -> Callable[[F], F]:
    """Declare a function a score: its :class:`ScoreInfo` goes on it (``score_info``) and, for lwcam's
    own scores (those defined in the family modules of :mod:`lwcam.scoring`), into :data:`SCORES`.

    Args:
        family: one of :data:`FAMILIES`.
        direction: ``"higher"``, ``"lower"``, ``"neither"``, or a tuple of them (one per returned value).
        needs: what the score needs besides the map, a subset of :data:`NEEDS`.

    Returns:
        A decorator that returns the function itself, unchanged but for the attribute.
    """
    _check(family, direction, needs)

    def declare(fn: F) -> F:
        info = ScoreInfo(getattr(fn, "__name__", repr(fn)), family, direction, frozenset(needs))
        fn.score_info = info  # type: ignore[attr-defined]
        module = getattr(fn, "__module__", "")
        if module.startswith("lwcam.scoring.") and module != __name__:  # not this module's example
            _REGISTRY[info.name] = info
        return fn

    return declare
