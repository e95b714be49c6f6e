"""The reasons people read about (console glossary, docs/protocol.md) are the ones ingest uses."""

from __future__ import annotations

from pathlib import Path

from ingest.processor import Reason
from ingest.rejections import REASON_HELP, REASONS

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def test_every_reason_is_explained() -> None:
    assert set(REASON_HELP) == set(Reason)
    assert tuple(r.value for r in Reason) == REASONS
    table = PROTOCOL.read_text(encoding="utf-8")
    for reason in Reason:
        assert f"| `{reason.value}` |" in table, reason
