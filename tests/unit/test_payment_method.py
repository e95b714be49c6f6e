"""The payment-method checks (SPEC A2): kinds, invoice in Japan only, never a card number."""

from __future__ import annotations

import pytest

from devmeter.errors import InvalidError
from metering.accounts import check_payment_method, looks_like_card_number


@pytest.mark.parametrize(
    ("reference", "card_like"),
    [
        ("4242424242424242", True),
        ("4242 4242 4242 4242", True),
        ("4242-4242-4242-4242", True),
        ("378282246310005", True),  # 15 digits (Amex)
        ("4222222222222", True),  # 13 digits, the shortest PAN
        ("6011000990139424123", True),  # 19 digits, the longest
        ("pm_4242424242424242", True),  # inside a token too
        ("tok 4242 4242 4242 4242 x", True),
        ("pm_1NqXyzAbc", False),
        ("422222222222", False),  # 12 digits
        ("60110009901394241234", True),  # 20 digits: may hold one
        ("4242--4242-4242-4242", True),
        ("4242.4242.4242.4242", True),
        ("4242_4242_4242_4242", True),
        ("4242a4242b4242c4242", False),  # letters end a run
        ("inv-2026-10-0042", False),  # 12 digits over separators
        ("cus_123456789012", False),
        ("", False),
    ],
)
def test_what_looks_like_a_card_number(reference: str, card_like: bool) -> None:
    assert looks_like_card_number(reference) is card_like


@pytest.mark.parametrize(
    ("kind", "reference", "country"),
    [
        ("card", "pm_1NqXyzAbc", "JP"),
        ("card", "pm_1", "US"),
        ("invoice", "inv-0042", "JP"),
        ("convenience_store", "konbini:cus_9", "US"),
        ("card", "a" * 200, "JP"),
    ],
)
def test_accepted(kind: str, reference: str, country: str) -> None:
    assert check_payment_method(kind, reference, country) == kind


@pytest.mark.parametrize(
    ("kind", "reference", "country", "field", "message"),
    [
        ("invoice", "inv-1", "US", "kind", "only for accounts in Japan"),
        ("konbini", "x", "JP", "kind", "one of card, invoice, convenience_store"),
        ("Card", "x", "JP", "kind", "invalid payment method kind"),
        ("card", "4242 4242 4242 4242", "JP", "reference", "looks like a card number"),
        ("card", "", "JP", "reference", "invalid reference"),
        ("card", "a" * 201, "JP", "reference", "1 to 200"),
        ("card", "pm 1", "JP", "reference", "invalid reference"),
        ("card", "_pm", "JP", "reference", "starting with a letter or digit"),
        ("card", "pm_1\n", "JP", "reference", "invalid reference"),
        ("card", "pm_\x00", "JP", "reference", "invalid reference"),
    ],
)
def test_refused(kind: str, reference: str, country: str, field: str, message: str) -> None:
    with pytest.raises(InvalidError, match=message) as refused:
        check_payment_method(kind, reference, country)
    assert refused.value.field == field
    assert "4242" not in refused.value.message, "a card number is never repeated"
