"""What a diagnosis returns: one observation with its evidence and the flags to try next."""

from __future__ import annotations

from dataclasses import dataclass

SEVERITIES = ("critical", "warning", "info")


@dataclass
class Finding:
    code: str
    severity: str  # one of SEVERITIES
    evidence: str
    recommendation: str
