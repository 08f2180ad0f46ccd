"""Negotiated size limits, announced in ``welcome`` and enforced on both sides."""

from __future__ import annotations

from dataclasses import asdict, dataclass

KiB = 1024
MiB = 1024 * KiB

#: Bytes a frame needs beyond its chunk payload (keys, ids, msgpack headers).
FRAME_OVERHEAD = 64 * KiB


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame: int = 2 * MiB
    max_chunk: int = 1 * MiB
    max_partition: int = 16 * MiB
    max_parts: int = 10_000
    window: int = 8 * MiB

    def validate(self) -> None:
        """Reject combinations under which a conforming client could not make progress."""
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"limits.{name} must be a positive integer")
        if self.max_frame < self.max_chunk + FRAME_OVERHEAD:
            raise ValueError("limits.max_frame must exceed max_chunk by at least 64 KiB")
        if self.window < self.max_chunk:
            raise ValueError("limits.window must hold at least one chunk")

    def as_map(self) -> dict[str, int]:
        return asdict(self)
