"""What ``load_into`` did: every key loaded, missing, unexpected, mismatched, cast or renamed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Cast", "LoadReport", "Mismatch"]


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


@dataclass(frozen=True)
class Mismatch:
    """A key present on both sides whose shapes differ."""

    key: str
    expected_shape: tuple[int, ...]
    expected_dtype: str
    found_shape: tuple[int, ...]
    found_dtype: str

    def __str__(self) -> str:
        return (
            f"{self.key}: expected {_shape(self.expected_shape)} {self.expected_dtype}, "
            f"found {_shape(self.found_shape)} {self.found_dtype}"
        )


@dataclass(frozen=True)
class Cast:
    """A tensor converted to the target's dtype while loading."""

    key: str
    from_dtype: str
    to_dtype: str


@dataclass
class LoadReport:
    """The outcome of :func:`torchkeep.load_into`.

    Attributes:
        loaded: target keys that received data.
        missing: target keys the source does not have (left as they were).
        unexpected: source keys the target does not have (ignored).
        mismatched: keys on both sides whose shapes differ.
        skipped: mismatched keys left out because ``on_mismatch="skip"``.
        cast: tensors converted to the target's dtype.
        renamed: ``(source key, target key)`` for every key that was renamed.
        notes: what was decided on the way (prefixes removed, for example).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    cast: list[Cast] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every target key was loaded and nothing was left over or mismatched."""
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> list[str]:
        """One line per problem, every one of them."""
        lines = [f"missing in the source: {k}" for k in self.missing]
        lines += [f"unexpected in the source: {k}" for k in self.unexpected]
        lines += [f"shape mismatch: {m}" + (" (skipped)" if m.key in self.skipped else "") for m in self.mismatched]
        return lines

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (lists, dicts, strings), ready for JSON."""
        out: dict[str, Any] = _lists(asdict(self))
        out["ok"] = self.ok
        return out

    def __str__(self) -> str:
        rows: list[tuple[str, str, str]] = []
        rows += [("loaded", k, "") for k in self.loaded]
        rows += [("missing", k, "kept its current value") for k in self.missing]
        rows += [("unexpected", k, "ignored") for k in self.unexpected]
        for m in self.mismatched:
            action = "skipped" if m.key in self.skipped else "not loaded"
            detail = f"{_shape(m.found_shape)} → {_shape(m.expected_shape)}, {action}"
            rows.append(("mismatched", m.key, detail))
        cast = {c.key: c for c in self.cast}
        renamed = {target: source for source, target in self.renamed}
        summary = (
            f"LoadReport: {len(self.loaded)} loaded, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} mismatched, {len(self.cast)} cast, {len(self.renamed)} renamed"
        )
        lines = [summary, *(f"  note: {n}" for n in self.notes)]
        if rows:
            width = max(len(k) for _, k, _ in rows)
            for status, key, detail in rows:
                extras = [detail] if detail else []
                if key in cast:
                    extras.append(f"cast {cast[key].from_dtype} → {cast[key].to_dtype}")
                if key in renamed:
                    extras.append(f"from {renamed[key]}")
                lines.append(f"  {status:<10}  {key:<{width}}  {'; '.join(extras)}".rstrip())
        return "\n".join(lines)
