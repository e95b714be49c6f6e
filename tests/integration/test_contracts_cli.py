"""Contracts through the CLI (issue 12): every example row of seeds 003 and 004, each date and
amount as `devmeter charges list` and `devmeter contracts show` print them; the edges; the
refusals, which change nothing; two processes issuing the same term, one charge."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, InProcessCli

CATALOG = """
[plans.cal]
currency = "JPY"
base_fee = "1000"
annual_price = "10000"
contract_policy = "calendar"

[plans.cal.classes.lte-m]
mode = "graduated"
tiers = [ { up_to = 10, price = "100" }, { price = "80" } ]

[plans.cal-pro]
currency = "JPY"
base_fee = "3000"
annual_price = "34000"
contract_policy = "calendar"

[plans.cal-pro.classes.lte-m]
mode = "graduated"
tiers = [ { price = "90" } ]

[plans.cal-monthly]
currency = "JPY"
base_fee = "1000"
contract_policy = "calendar"

[plans.cal-monthly.classes.lte-m]
mode = "graduated"
tiers = [ { price = "100" } ]

[plans.ann]
currency = "JPY"
base_fee = "1000"
annual_price = "11000"
contract_policy = "anniversary"

[plans.ann.classes.lte-m]
mode = "graduated"
tiers = [ { price = "100" } ]

[plans.ann-pro]
currency = "JPY"
base_fee = "3000"
annual_price = "33000"
contract_policy = "anniversary"

[plans.ann-pro.classes.lte-m]
mode = "graduated"
tiers = [ { price = "100" } ]

[plans.ann-free]
currency = "JPY"
base_fee = "0"
annual_price = "0"
contract_policy = "anniversary"

[plans.ann-free.classes.lte-m]
mode = "graduated"
tiers = [ { price = "100" } ]

[plans.cal-required]
currency = "JPY"
base_fee = "1000"
contract_policy = "calendar"
contract_required = true

[plans.cal-required.classes.lte-m]
mode = "graduated"
tiers = [ { price = "100" } ]

[plans.metered]
currency = "JPY"

[plans.metered.classes.lte-m]
mode = "graduated"
tiers = [ { price = "100" } ]

[tax.JP]
rates = [
    { from = "2014-04-01", rate = "0.08", rounding = "down" },
    { from = "2019-10-01", rate = "0.10", rounding = "down" },
]

[tax.US]
rates = [ { from = "2000-01-01", rate = "0", rounding = "down" } ]
"""


@pytest.fixture
def dm_process(cli: Cli, tmp_path: Path) -> Cli:
    """The CLI with the contract plans above as its catalog, a process per command."""
    path = tmp_path / "contracts.toml"
    path.write_text(CATALOG, encoding="utf-8")
    return Cli({**cli.env, "DEVMETER_CATALOG": str(path)}, cli.cwd)


@pytest.fixture
def dm(dm_process: Cli) -> Cli:
    """The same, run in this process (the same entry point; tests/conftest.py says why)."""
    return InProcessCli(dm_process.env, dm_process.cwd)


def ok(result: Any) -> dict[str, Any]:
    assert result.code == 0, result.stderr
    body = result.json()
    assert isinstance(body, dict)
    return body


def refused(result: Any, field: str) -> str:
    assert result.code == 2, (result.code, result.stdout, result.stderr)
    assert result.stdout == ""
    assert field in result.stderr, result.stderr
    return str(result.stderr)


def account(dm: Cli, plan: str, signed_up: str, tz: str = "Asia/Tokyo", ref: str = "acme") -> None:
    country = "US" if tz.startswith("America/") else "JP"
    ok(dm("accounts", "create", "--ref", ref, "--name", "A", "--plan", plan, "--country", country,
          "--tz", tz, "--signed-up", signed_up))  # fmt: skip


def charges(dm: Cli, until: str, ref: str = "acme") -> list[dict[str, Any]]:
    ok(dm("charges", "issue", "--until", until, "--account", ref))
    found = ok(dm("charges", "list", "--account", ref))["charges"]
    assert isinstance(found, list)
    return found


def row(charge: dict[str, Any]) -> tuple[str, ...]:
    """kind, invoice day, due date, period, amount: the seeds' columns."""
    return (
        charge["kind"],
        charge["issued_on"],
        charge["due_date"],
        charge["period_start"],
        charge["period_end"],
        charge["amount"],
    )


def show(dm: Cli, at: str, ref: str = "acme") -> dict[str, Any]:
    return ok(dm("contracts", "show", "--account", ref, "--at", at))


# --- seed 003: calendar ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("term", "first_end", "fee", "tax"),
    [
        # 例:月額契約の請求サイクル
        ("monthly", "2017-11-30", "1000", "80"),
        # 例:年額契約の請求サイクル
        ("annual", "2018-10-31", "10000", "800"),
    ],
)
def test_calendar_sign_up(dm: Cli, term: str, first_end: str, fee: str, tax: str) -> None:
    """初回申込日 2017/10/03, 無償利用期間 2017/10/03 - 2017/10/31, 請求書送信日 2017/11/01,
    支払期限 2017/12末, 初回契約期間 2017/11/01 - (one month or one year)."""
    account(dm, "cal", "2017-10-03")
    started = ok(dm("contracts", "start", "--account", "acme", "--term", term,
                    "--at", "2017-10-03T14:30"))  # fmt: skip
    contract = started["contract"]
    assert contract["status"] == "free_period"
    assert contract["free_period"] == {"start": "2017-10-03", "end": "2017-10-31"}
    assert (contract["term_start"], contract["term_end"]) == ("2017-11-01", first_end)
    assert contract["next_invoice_on"] == "2017-11-01"
    assert started["issued"] == []
    assert charges(dm, "2017-10-31T23:59:59") == []
    issued = charges(dm, "2017-11-01")
    assert [row(c) for c in issued] == [
        ("term_fee", "2017-11-01", "2017-12-31", "2017-11-01", first_end, fee)
    ]
    first = issued[0]
    assert first["issued_at"] == "2017-11-01T00:00:00+09:00"
    assert (first["tax_rate"], first["tax"], first["amount_due"]) == (
        "0.08",
        tax,
        str(int(fee) + int(tax)),
    )
    # Issuing again issues nothing.
    assert charges(dm, "2017-11-01") == issued


def test_calendar_increase_in_an_annual_term(dm: Cli) -> None:
    """契約期間 2017/10/01 - 2018/09/30, 変更日 2018/03/20, 変更適用日 2018/04/01, 支払期限
    2018/5末, 変更適用期間 2018/04/01 - 2018/09/30 (6か月分)."""
    account(dm, "cal", "2017-09-15")
    ok(dm("contracts", "start", "--account", "acme", "--term", "annual", "--commit", "lte-m=10",
          "--at", "2017-09-15T10:00"))  # fmt: skip
    # What it would cost, before making it: nothing changes.
    quote = ok(dm("contracts", "change", "--account", "acme", "--commit", "lte-m=20",
                  "--at", "2018-03-20T10:00", "--dry-run"))  # fmt: skip
    assert quote["dry_run"] is True
    # 10 devices: 10,000 + 12 x 1,000 = 22,000 a year; 20: 10,000 + 12 x 1,800 = 31,600.
    expected = ("proration", "2018-04-01", "2018-05-31", "2018-04-01", "2018-09-30", "4800")
    assert [row(c) for c in quote["charges"]] == [expected]
    assert show(dm, "2018-03-21")["commitments"] == {"lte-m": 10}
    changed = ok(dm("contracts", "change", "--account", "acme", "--commit", "lte-m=20",
                    "--at", "2018-03-20T10:00"))  # fmt: skip
    assert changed["request"]["effect"] == "now"
    assert changed["request"]["effective_on"] == "2018-03-20"  # the service, at once
    assert [row(c) for c in changed["charges"]] == [expected]
    listed = charges(dm, "2018-10-01")
    assert [row(c) for c in listed] == [
        ("term_fee", "2017-10-01", "2017-11-30", "2017-10-01", "2018-09-30", "22000"),
        expected,
        ("term_fee", "2018-10-01", "2018-11-30", "2018-10-01", "2019-09-30", "31600"),
    ]
    assert listed[1]["share"] == {"part": 6, "whole": 12, "unit": "months"}
    assert (listed[1]["tax"], listed[1]["amount_due"]) == ("384", "5184")


@pytest.mark.parametrize(
    ("signed_up", "start_term", "requested", "to", "switched", "due", "term_end", "next_invoice"),
    [
        # 月額契約中(満了日:2017/11/30)に年額契約へ変更: 変更申込日 2017/10/20, 変更日
        # 2017/12/01, 支払期限 2018/01末, 年額切替後 2017/12/01 - 2018/11/30, 次 2018/12/01
        ("2017-10-03", "monthly", "2017-10-20T12:00", "annual", "2017-12-01", "2018-01-31",
         "2018-11-30", "2018-12-01"),
        # 年額契約中(満了日:2017/12/31)に月額契約へ変更: 変更申込日 2017/11/20, 変更日
        # 2018/01/01, 支払期限 2018/02末, 月額切替後 2018/01/01 - 2018/01/31, 次 2018/02/01
        ("2016-12-05", "annual", "2017-11-20T12:00", "monthly", "2018-01-01", "2018-02-28",
         "2018-01-31", "2018-02-01"),
    ],
)  # fmt: skip
def test_calendar_term_switch(
    dm: Cli,
    signed_up: str,
    start_term: str,
    requested: str,
    to: str,
    switched: str,
    due: str,
    term_end: str,
    next_invoice: str,
) -> None:
    account(dm, "cal", signed_up)
    ok(dm("contracts", "start", "--account", "acme", "--term", start_term, "--at", signed_up))
    result = ok(dm("contracts", "switch-term", "--account", "acme", "--term", to,
                   "--at", requested))  # fmt: skip
    assert result["request"]["effect"] == "term_end"
    assert result["request"]["effective_on"] == switched
    assert result["contract"]["scheduled_changes"][0]["effective_on"] == switched
    assert result["contract"]["next_term"]["term"] == to
    assert (result["contract"]["next_term"]["start"], result["contract"]["next_term"]["end"]) == (
        switched,
        term_end,
    )
    listed = charges(dm, next_invoice)
    fee = "10000" if to == "annual" else "1000"
    assert row(listed[-2]) == ("term_fee", switched, due, switched, term_end, fee)
    assert listed[-1]["issued_on"] == next_invoice
    after = show(dm, switched)
    assert (after["term"], after["term_start"], after["term_end"]) == (to, switched, term_end)
    assert after["renews_at"].startswith(next_invoice)
    assert after["next_invoice_on"] == next_invoice


@pytest.mark.parametrize(
    ("signed_up", "start_term", "requested", "last_month", "ends", "last_charge"),
    [
        # 月額契約中で 2019/3月の解約を希望: 解約申請日 2018/11/20, 最終請求日 2019/03/01,
        # 支払期限 2019/04末, 最終契約期間 2019/03/01 - 2019/03/31
        ("2018-09-10", "monthly", "2018-11-20T17:00", "2019-03", "2019-04-01",
         ("term_fee", "2019-03-01", "2019-04-30", "2019-03-01", "2019-03-31", "1000")),
        # 年額契約中(満了日:2018/11/30)で 2018/12月の解約を希望: 解約申請日 2018/10/20,
        # 最終請求日 2018/12/01, 支払期限 2019/01末, 最終契約期間 2018/12/01 - 2018/12/31
        ("2017-11-10", "annual", "2018-10-20T17:00", "2018-12", "2019-01-01",
         ("term_fee", "2018-12-01", "2019-01-31", "2018-12-01", "2018-12-31", "1000")),
    ],
)  # fmt: skip
def test_calendar_cancellation(
    dm: Cli,
    signed_up: str,
    start_term: str,
    requested: str,
    last_month: str,
    ends: str,
    last_charge: tuple[str, ...],
) -> None:
    account(dm, "cal", signed_up)
    ok(dm("contracts", "start", "--account", "acme", "--term", start_term, "--at", signed_up))
    result = ok(dm("contracts", "cancel", "--account", "acme", "--end-after", last_month,
                   "--at", requested))  # fmt: skip
    assert result["contract"]["status"] == "ending"
    assert result["contract"]["ends_at"] == f"{ends}T00:00:00+09:00"
    listed = charges(dm, "2019-12-01")
    assert row(listed[-1]) == last_charge
    assert all(c["issued_on"] <= last_charge[1] for c in listed)
    final = show(dm, ends)
    assert final["status"] == "ended"
    assert (final["term"], final["term_start"], final["term_end"]) == (
        "monthly",
        last_charge[3],
        last_charge[4],
    )
    # Nothing more can be asked of an ended contract.
    refused(dm("contracts", "change", "--account", "acme", "--plan", "cal-pro", "--at", ends),
            "contract")  # fmt: skip


# --- seed 004: anniversary ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("term", "until", "days", "fee"),
    [
        # 2020年10月13日に申し込み → 2020年10月13日、11月13日、12月13日
        ("monthly", "2020-12-13T09:00", ["2020-10-13", "2020-11-13", "2020-12-13"], "1000"),
        # → 2020年10月13日、2021年10月13日、2022年10月13日
        ("annual", "2022-10-13T09:00", ["2020-10-13", "2021-10-13", "2022-10-13"], "11000"),
    ],
)
def test_anniversary_payment_days(
    dm: Cli, term: str, until: str, days: list[str], fee: str
) -> None:
    account(dm, "ann", "2020-10-13")
    started = ok(dm("contracts", "start", "--account", "acme", "--term", term,
                    "--at", "2020-10-13T09:00"))  # fmt: skip
    # Charged at once, at the purchase.
    assert [c["issued_at"] for c in started["issued"]] == ["2020-10-13T09:00:00+09:00"]
    listed = charges(dm, until)
    assert [c["issued_on"] for c in listed] == days
    assert [c["due_date"] for c in listed] == days  # paid by card when charged
    assert {c["amount"] for c in listed} == {fee}
    assert {c["tax"] for c in listed} == {str(int(fee) // 10)}


@pytest.mark.parametrize(
    ("term", "period_end", "amount", "renewal", "next_end", "full"),
    [
        # 月次契約で2020年10月13日〜11月12日の契約期間中、11月1日にアップグレード:
        # (3,000 - 1,000) x 12 days / 31 days = 774.19
        ("monthly", "2020-11-12", "774", "2020-11-13T00:00", "2020-12-12", "3000"),
        # 年次契約で2020年10月13日〜2021年10月12日、2020年11月1日にアップグレード:
        # (33,000 - 11,000) x 346 days / 365 days = 20,854.79
        ("annual", "2021-10-12", "20854", "2021-10-13T00:00", "2022-10-12", "33000"),
    ],
)
def test_anniversary_upgrade(
    dm: Cli, term: str, period_end: str, amount: str, renewal: str, next_end: str, full: str
) -> None:
    account(dm, "ann", "2020-10-13")
    ok(dm("contracts", "start", "--account", "acme", "--term", term, "--at", "2020-10-13"))
    result = ok(dm("contracts", "change", "--account", "acme", "--plan", "ann-pro",
                   "--at", "2020-11-01"))  # fmt: skip
    expected = ("proration", "2020-11-01", "2020-11-01", "2020-11-01", period_end, amount)
    assert [row(c) for c in result["issued"]] == [expected]  # charged at once
    # The account's plan follows at once (its history says why).
    plans = ok(dm("accounts", "plans", "--account", "acme"))
    assert plans["plan"] == "ann-pro"
    assert plans["history"][-1]["changed_by"] == f"contract:{result['request']['id']}"
    listed = charges(dm, renewal)
    assert [row(c) for c in listed[1:]] == [
        expected,
        ("term_fee", renewal[:10], renewal[:10], renewal[:10], next_end, full),
    ]


@pytest.mark.parametrize(
    ("term", "effective", "until", "fee"),
    [
        # 月次契約で2020年10月13日〜11月12日、11月1日に一部プロダクトを解約 → 2020年11月13日〜
        # 12月12日の契約から反映され2020年11月13日の請求から減額
        ("monthly", "2020-11-13", "2020-11-13", "1000"),
        # 年次契約: 2021年10月13日〜2022年10月12日の契約から反映
        ("annual", "2021-10-13", "2021-10-13", "11000"),
    ],
)
def test_anniversary_downgrade(dm: Cli, term: str, effective: str, until: str, fee: str) -> None:
    account(dm, "ann-pro", "2020-10-13")
    ok(dm("contracts", "start", "--account", "acme", "--term", term, "--at", "2020-10-13"))
    result = ok(dm("contracts", "change", "--account", "acme", "--plan", "ann",
                   "--at", "2020-11-01"))  # fmt: skip
    assert result["request"]["effect"] == "term_end"
    assert result["request"]["effective_on"] == effective
    assert result["issued"] == result["charges"] == []  # no refund
    assert ok(dm("accounts", "show", "--account", "acme"))["account"]["plan"] == "ann-pro"
    listed = charges(dm, until)
    assert {c["kind"] for c in listed} == {"term_fee"}
    assert (listed[-1]["issued_on"], listed[-1]["amount"]) == (effective, fee)
    # Once it has taken effect, the account's plan follows.
    assert ok(dm("accounts", "show", "--account", "acme"))["account"]["plan"] == "ann"


def test_anniversary_monthly_to_annual(dm: Cli) -> None:
    """2020年10月11日〜11月10日(月次)で10月15日に年次へ: 2020年10月15日〜2021年10月14日(年次);
    2020年10月15日〜11月10日の未使用分は日割りで返金."""
    account(dm, "ann", "2020-10-11")
    ok(dm("contracts", "start", "--account", "acme", "--term", "monthly", "--at", "2020-10-11"))
    result = ok(dm("contracts", "switch-term", "--account", "acme", "--term", "annual",
                   "--at", "2020-10-15"))  # fmt: skip
    assert [row(c) for c in result["issued"]] == [
        # 1,000 x 27 / 31 days = 870.97, refunded rounded down.
        ("refund", "2020-10-15", "2020-10-15", "2020-10-15", "2020-11-10", "-870"),
        ("term_fee", "2020-10-15", "2020-10-15", "2020-10-15", "2021-10-14", "11000"),
    ]
    assert result["issued"][0]["tax"] == "-87"  # taxed too: 10 % of -870
    contract = result["contract"]
    assert (contract["term"], contract["term_start"], contract["term_end"]) == (
        "annual",
        "2020-10-15",
        "2021-10-14",
    )
    assert contract["renews_at"] == "2021-10-15T00:00:00+09:00"


def test_anniversary_annual_to_monthly(dm: Cli) -> None:
    """2020年10月11日〜2021年10月10日(年次)で2020年10月15日に月次へ: 月額料金は10月15日から
    (the seed prints the term's end as 2021年11月14日, a year off for a monthly term);
    年額料金の未使用分は返金されません."""
    account(dm, "ann", "2020-10-11")
    ok(dm("contracts", "start", "--account", "acme", "--term", "annual", "--at", "2020-10-11"))
    result = ok(dm("contracts", "switch-term", "--account", "acme", "--term", "monthly",
                   "--at", "2020-10-15"))  # fmt: skip
    assert [row(c) for c in result["issued"]] == [
        ("term_fee", "2020-10-15", "2020-10-15", "2020-10-15", "2020-11-14", "1000")
    ]
    assert [row(c)[1] for c in charges(dm, "2020-11-15")] == [
        "2020-10-11",
        "2020-10-15",
        "2020-11-15",
    ]


def test_anniversary_upgrade_from_a_contract_worth_nothing(dm: Cli) -> None:
    """Freeプランのみのご契約等、契約金額が0円の状態で有償プランにアップグレードした場合には、
    有償プラン申込日から契約期間が新たに開始され、有償プラン申込日に満額の契約金額を請求."""
    account(dm, "ann-free", "2020-10-13")
    ok(dm("contracts", "start", "--account", "acme", "--term", "monthly", "--at", "2020-10-13"))
    result = ok(dm("contracts", "change", "--account", "acme", "--plan", "ann",
                   "--at", "2020-11-01T12:00"))  # fmt: skip
    assert result["request"]["effect"] == "restart"
    assert [row(c) for c in result["issued"]] == [
        ("term_fee", "2020-11-01", "2020-11-01", "2020-11-01", "2020-11-30", "1000")
    ]
    assert result["contract"]["renews_at"] == "2020-12-01T12:00:00+09:00"


# --- edges ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "ends"),
    [
        ("2018-09-20T23:59:59", "2018-10-01T00:00:00+09:00"),  # the 20th's last second
        ("2018-09-21T00:00:00", "2018-11-01T00:00:00+09:00"),  # the 21st's first instant
    ],
)
def test_a_request_around_the_20th(dm: Cli, requested: str, ends: str) -> None:
    account(dm, "cal", "2018-08-10")
    ok(dm("contracts", "start", "--account", "acme", "--term", "monthly", "--at", "2018-08-10"))
    before = show(dm, requested)
    assert before["cancellation_deadline"] == "2018-09-20"
    assert before["cancellation_deadline_at"] == "2018-09-21T00:00:00+09:00"
    result = ok(dm("contracts", "cancel", "--account", "acme", "--at", requested))
    assert result["contract"]["ends_at"] == ends
    months = ["2018-09-01"] + (["2018-10-01"] if ends.startswith("2018-11") else [])
    assert [c["issued_on"] for c in charges(dm, "2018-12-01")] == months


def test_an_anniversary_term_on_the_31st_and_february_in_a_leap_year(dm: Cli) -> None:
    account(dm, "ann", "2020-01-31")
    ok(
        dm(
            "contracts",
            "start",
            "--account",
            "acme",
            "--term",
            "monthly",
            "--at",
            "2020-01-31T10:00",
        )
    )
    listed = charges(dm, "2020-05-31T10:00")
    # The 31st falls back to February's 29th and comes back in March.
    assert [(c["issued_on"], c["period_end"]) for c in listed] == [
        ("2020-01-31", "2020-02-28"),
        ("2020-02-29", "2020-03-30"),
        ("2020-03-31", "2020-04-29"),
        ("2020-04-30", "2020-05-30"),
        ("2020-05-31", "2020-06-29"),
    ]
    assert listed[1]["starts_at"] == "2020-02-29T10:00:00+09:00"


def test_an_upgrade_in_the_last_second_of_a_term(dm: Cli) -> None:
    account(dm, "ann", "2020-10-13")
    ok(dm("contracts", "start", "--account", "acme", "--term", "monthly", "--at", "2020-10-13"))
    result = ok(dm("contracts", "change", "--account", "acme", "--plan", "ann-pro",
                   "--at", "2020-11-12T23:59:59"))  # fmt: skip
    # (3,000 - 1,000) x 1 / 2,678,400 seconds: rounded down to nothing, still a charge.
    assert [(c["kind"], c["amount"], c["share"]) for c in result["issued"]] == [
        ("proration", "0", {"part": 1, "whole": 2678400, "unit": "seconds"})
    ]
    assert charges(dm, "2020-11-13")[-1]["amount"] == "3000"


def test_a_calendar_increase_in_the_last_second_of_a_term_is_in_the_next_fee(dm: Cli) -> None:
    account(dm, "cal", "2018-08-10")
    ok(dm("contracts", "start", "--account", "acme", "--term", "monthly", "--at", "2018-08-10"))
    result = ok(dm("contracts", "change", "--account", "acme", "--plan", "cal-pro",
                   "--at", "2018-09-30T23:59:59"))  # fmt: skip
    assert result["charges"] == []
    assert [row(c)[-1] for c in charges(dm, "2018-10-01")] == ["1000", "3000"]


def test_dst_in_new_york_for_a_calendar_account(dm: Cli) -> None:
    account(dm, "cal", "2021-02-14", tz="America/New_York")
    ok(
        dm(
            "contracts",
            "start",
            "--account",
            "acme",
            "--term",
            "monthly",
            "--at",
            "2021-02-14T23:00",
        )
    )
    # 23:59:59 on the 20th in New York is already the 21st in UTC: still in time.
    result = ok(dm("contracts", "cancel", "--account", "acme", "--at", "2021-03-20T23:59:59"))
    assert result["contract"]["ends_at"] == "2021-04-01T00:00:00-04:00"
    listed = charges(dm, "2021-06-01")
    assert [(c["issued_at"], c["ends_at"], c["due_date"]) for c in listed] == [
        ("2021-03-01T00:00:00-05:00", "2021-04-01T00:00:00-04:00", "2021-04-30")
    ]


# --- refusals -------------------------------------------------------------------------------


def test_refusals_change_nothing(dm: Cli) -> None:
    account(dm, "metered", "2018-08-01")
    refused(dm("contracts", "start", "--account", "acme", "--term", "monthly",
               "--at", "2018-08-10"), "contract_policy")  # fmt: skip
    ok(dm("accounts", "set-plan", "--account", "acme", "--plan", "cal-monthly",
          "--at", "2018-08-05"))  # fmt: skip
    refused(dm("contracts", "start", "--account", "acme", "--term", "annual",
               "--at", "2018-08-10"), "annual price")  # fmt: skip
    refused(dm("contracts", "start", "--account", "acme", "--term", "monthly",
               "--commit", "wifi=2", "--at", "2018-08-10"), "wifi")  # fmt: skip
    refused(dm("contracts", "start", "--account", "acme", "--term", "monthly",
               "--commit", "lte-m=two", "--at", "2018-08-10"), "--commit")  # fmt: skip
    refused(dm("contracts", "start", "--account", "acme", "--term", "monthly",
               "--at", "2999-01-01"), "future")  # fmt: skip
    assert show(dm, "2018-09-01")["contract"] is None
    ok(dm("contracts", "start", "--account", "acme", "--term", "monthly", "--at", "2018-08-10"))
    before = show(dm, "2018-09-10")
    refused(dm("contracts", "start", "--account", "acme", "--term", "monthly",
               "--at", "2018-08-11"), "has a contract")  # fmt: skip
    refused(dm("contracts", "cancel", "--account", "acme", "--end-after", "2018-08",
               "--at", "2018-09-10"), "end-after")  # fmt: skip
    refused(dm("contracts", "cancel", "--account", "acme", "--end-after", "2018-13",
               "--at", "2018-09-10"), "end-after")  # fmt: skip
    refused(dm("contracts", "change", "--account", "acme", "--at", "2018-09-10"), "--plan")
    refused(dm("contracts", "change", "--account", "acme", "--plan", "ann",
               "--at", "2018-09-10"), "anniversary")  # fmt: skip
    refused(dm("contracts", "switch-term", "--account", "acme", "--term", "annual",
               "--at", "2018-09-10"), "annual price")  # fmt: skip
    refused(dm("contracts", "switch-term", "--account", "acme", "--term", "weekly",
               "--at", "2018-09-10"), "--term")  # fmt: skip
    refused(dm("contracts", "show", "--account", "nobody"), "unknown account")
    # The plan of an account under contract changes only through the contract.
    refused(dm("accounts", "set-plan", "--account", "acme", "--plan", "metered",
               "--at", "2018-09-10"), "contracts change")  # fmt: skip
    assert show(dm, "2018-09-10") == before
    # Charges issued to 1 October: a request before then would change them.
    charges(dm, "2018-10-01")
    refused(dm("contracts", "cancel", "--account", "acme", "--at", "2018-09-30"), "at")
    assert len(charges(dm, "2018-10-01")) == 2


def test_a_dry_run_changes_nothing(dm: Cli) -> None:
    account(dm, "ann", "2020-10-13")
    ok(dm("contracts", "start", "--account", "acme", "--term", "monthly", "--at", "2020-10-13"))
    before = show(dm, "2020-11-02")
    quote = ok(dm("contracts", "switch-term", "--account", "acme", "--term", "annual",
                  "--at", "2020-11-01", "--dry-run"))  # fmt: skip
    assert [c["kind"] for c in quote["charges"]] == ["refund", "term_fee"]
    assert quote["issued"] == []
    assert show(dm, "2020-11-02") == before
    assert [c["kind"] for c in charges(dm, "2020-11-02")] == ["term_fee"]


# --- two issuers ----------------------------------------------------------------------------


def test_two_processes_issuing_the_same_term_make_one_charge(dm_process: Cli) -> None:
    dm = dm_process
    account(dm, "cal", "2017-10-03")
    account(dm, "cal", "2017-10-03", ref="beta")
    for ref in ("acme", "beta"):
        ok(dm("contracts", "start", "--account", ref, "--term", "monthly", "--at", "2017-10-03"))
    results: list[Any] = []

    def issue(*extra: str) -> None:
        results.append(dm("charges", "issue", "--until", "2018-03-01", *extra, timeout=120))

    threads = [
        threading.Thread(target=issue),
        threading.Thread(target=issue),
        threading.Thread(target=issue, args=("--account", "acme")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert [r.code for r in results] == [0, 0, 0], [r.stderr for r in results]
    issued = [c for r in results for c in r.json()["issued"]]
    # November to March, each once, whichever process issued it.
    assert len(issued) == 2 * 5
    assert len({(c["contract"], c["issued_on"]) for c in issued}) == 10
    for ref in ("acme", "beta"):
        listed = ok(dm("charges", "list", "--account", ref))["charges"]
        assert [c["issued_on"] for c in listed] == [
            "2017-11-01", "2017-12-01", "2018-01-01", "2018-02-01", "2018-03-01",
        ]  # fmt: skip


def test_a_plan_that_requires_a_contract_registers_devices_only_under_one(
    dm: Cli, tmp_path: Path
) -> None:
    account(dm, "cal-required", "2026-01-01")
    register = ("devices", "register", "--account", "acme", "--class", "lte-m", "--id", "d1")
    refused(dm(*register), "requires a contract")
    assert ok(dm("devices", "list", "--account", "acme"))["devices"] == []
    ok(dm("contracts", "start", "--account", "acme", "--term", "monthly",
          "--at", "2026-06-10T12:00:00+09:00"))  # fmt: skip
    assert ok(dm(*register))["id"] == "d1"
    # An import too: a device registered before the contract began is refused, and with it
    # the whole file; one registered under it is imported.
    devices = tmp_path / "devices.csv"
    devices.write_text(
        "device_id,account,class,registered_at\n"
        "d2,acme,lte-m,2026-06-10T12:00:01+09:00\n"
        "d3,acme,lte-m,2026-06-10T11:59:59+09:00\n"
    )
    refused(dm("import", "--devices", str(devices)), "requires a contract")
    assert [d["id"] for d in ok(dm("devices", "list", "--account", "acme"))["devices"]] == ["d1"]
    devices.write_text(
        "device_id,account,class,registered_at\nd2,acme,lte-m,2026-06-10T12:00:01+09:00\n"
    )
    ok(dm("import", "--devices", str(devices)))
    listed = ok(dm("devices", "list", "--account", "acme"))["devices"]
    assert sorted(d["id"] for d in listed) == ["d1", "d2"]
