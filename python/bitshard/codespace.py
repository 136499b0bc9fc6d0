"""The code space of a segment: what two segments must share to be merged,
committed together or searched together.

A segment's codes mean something only against its dimension, column,
metric, bit width, rotation and IVF centroids. :class:`CodeSpace` holds those
six values and :meth:`CodeSpace.differences` is the one comparison every
check uses (merge, commit, the open-time check of a search, ``verify``), so
each mismatch message names the field that differs and both values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, List, NamedTuple, Optional

from .errors import ArtifactMismatchError

__all__ = ["CodeSpace", "Difference"]

#: The word a message uses for each field: the fingerprints are named by the
#: artifact they identify (``rotation differs: ...``), as the C library does.
LABELS = {
    "dimension": "dimension",
    "column": "column",
    "metric": "metric",
    "num_bits": "num_bits",
    "rotation_fingerprint": "rotation",
    "ivf_fingerprint": "centroids",
}


class Difference(NamedTuple):
    """One field two code spaces disagree on: ``ours`` is the value of the
    space :meth:`CodeSpace.differences` was called on, ``theirs`` the other's."""

    field: str
    label: str
    ours: Any
    theirs: Any

    def describe(self) -> str:
        """``"<label> differs: <ours> vs <theirs>"`` (values as repr)."""
        return f"{self.label} differs: {self.ours!r} vs {self.theirs!r}"


@dataclass(frozen=True)
class CodeSpace:
    """Dimension, column, metric, bit width and the two artifact fingerprints.

    Attributes:
        dimension: the vector dimension d.
        column: the vector column the codes were built from.
        metric: ``"l2"``, ``"cosine"`` or ``"dot"``.
        num_bits: bits per dimension of the codes (1..9).
        rotation_fingerprint: 32 hex digits identifying the rotation.
        ivf_fingerprint: 32 hex digits identifying the IVF centroids.
    """

    dimension: int
    column: str
    metric: str
    num_bits: int
    rotation_fingerprint: str
    ivf_fingerprint: str

    @classmethod
    def of(cls, segment: Any) -> "CodeSpace":
        """The code space of anything carrying the six attributes (a
        :class:`~bitshard.index.SegmentHandle`)."""
        return cls(**{f.name: getattr(segment, f.name) for f in fields(cls)})

    def differences(self, other: "CodeSpace") -> List[Difference]:
        """Every field on which ``other`` differs, in a fixed order (dimension,
        column, metric, num_bits, rotation, centroids); empty if the spaces
        are the same."""
        out = []
        for f in fields(self):
            ours, theirs = getattr(self, f.name), getattr(other, f.name)
            if ours != theirs:
                out.append(Difference(f.name, LABELS[f.name], ours, theirs))
        return out

    def first_difference(self, other: "CodeSpace") -> Optional[Difference]:
        """The first of :meth:`differences`, or None."""
        diff = self.differences(other)
        return diff[0] if diff else None

    def require_same(self, other: "CodeSpace", context: str) -> None:
        """Raise ArtifactMismatchError ``"<context>: <label> differs: <ours>
        vs <theirs>"`` naming the first field that differs; else nothing."""
        d = self.first_difference(other)
        if d is not None:
            raise ArtifactMismatchError(f"{context}: {d.describe()}")
