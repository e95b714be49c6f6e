"""The NumPy peak path's guards: where its answer could be wrong, it refuses (``Unusable``)
and the caller computes in SQL. Its answers are checked against compute_peaks in
tests/integration/test_peak_sql.py."""

from __future__ import annotations

import numpy as np
import pytest

from metering.peak_frame import Unusable, _Dictionary, _parse

HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
TRAILER = b"\xff\xff"


def row(device: int, time: int, event_id: int, active: bool) -> bytes:
    def field(value: int, width: int) -> bytes:
        return width.to_bytes(4, "big") + value.to_bytes(width, "big", signed=True)

    return (
        (4).to_bytes(2, "big")
        + field(device, 8)
        + field(time, 8)
        + field(event_id, 8)
        + field(int(active), 1)
    )


def test_two_devices_with_one_hash_are_refused() -> None:
    with pytest.raises(Unusable, match="same 64-bit hash"):
        _Dictionary([("a", 1, "lte-m", 42), ("b", 1, "lte-m", 42)])


def test_devices_out_of_hash_order_are_refused() -> None:
    with pytest.raises(Unusable, match="sorted by hash"):
        _Dictionary([("a", 1, "lte-m", 7), ("b", 2, "wifi", -3)])


def test_an_unknown_hash_is_refused() -> None:
    dictionary = _Dictionary([("b", 2, "wifi", -3), ("a", 1, "lte-m", 7)])
    assert dictionary.ids_of(np.array([7, -3, 7], np.int64)) == ["a", "b", "a"]
    assert dictionary.group_of(np.array([7, -3], np.int64)).tolist() == [1, 0]
    assert dictionary.groups == [(2, "wifi"), (1, "lte-m")]
    with pytest.raises(Unusable, match="devices table does not have"):
        dictionary.group_of(np.array([7, 8], np.int64))
    with pytest.raises(Unusable, match="devices table does not have"):
        _Dictionary([]).group_of(np.array([7], np.int64))


def test_copy_rows_are_read_in_place() -> None:
    data = bytearray(HEADER + row(-5, 10**12, 3, True) + row(9, -1, 4, False) + TRAILER)
    rows = _parse(data)
    assert rows["device"].tolist() == [-5, 9]
    assert rows["time"].tolist() == [10**12, -1]
    assert rows["id"].tolist() == [3, 4]
    assert rows["active"].tolist() == [1, 0]
    assert len(_parse(bytearray(HEADER + TRAILER))) == 0


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"COPY" + bytes(20), "no binary signature"),
        (HEADER + row(1, 2, 3, True)[:-1] + TRAILER, "expected width"),
        # A row of the right width whose fields are laid out otherwise (a NULL, say).
        (
            HEADER
            + row(1, 2, 3, True).replace(b"\x00\x00\x00\x08", b"\x00\x00\x00\x09", 1)
            + TRAILER,
            "expected widths",
        ),
    ],
)
def test_an_unexpected_stream_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(Unusable, match=reason):
        _parse(bytearray(data))
