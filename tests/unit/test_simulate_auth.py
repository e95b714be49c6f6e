"""How `devmeter simulate` picks its MQTT identity, and whose identity a message goes out as."""

from __future__ import annotations

import pytest

from ingest.protocol import device_topic, gateway_topic
from ingest.simulate import BadKind, Fleet, Traffic, choose_auth, fleet_ids, speaker_of


def _never(_url: str) -> bool:
    raise AssertionError("no probe expected")


@pytest.mark.parametrize(
    ("url", "requested", "refused", "mode"),
    [
        ("mqtt://127.0.0.1:1883", "auto", True, "device"),
        ("mqtt://127.0.0.1:1883", "auto", False, "anonymous"),
        ("mqtt://devmeter-ingest:pw@127.0.0.1:1883", "auto", None, "device"),
        ("mqtt://127.0.0.1:1883", "device", None, "device"),
        ("mqtt://127.0.0.1:1883", "anonymous", None, "anonymous"),
    ],
)
def test_choose_auth(url: str, requested: str, refused: bool | None, mode: str) -> None:
    probe = _never if refused is None else (lambda _url: refused)
    assert choose_auth(url, requested, probe) == mode


def test_every_message_names_its_speaker_in_its_topic() -> None:
    gateways, sims = fleet_ids("t", 12, 2, 0.5)
    fleet = Fleet(tuple(sims), tuple(gateways), "acme")
    traffic = Traffic(fleet, bad_share=0.5, seed=3, as_devices=True)
    speakers = {*fleet.direct(), *fleet.gateways}
    for _ in range(400):
        topic, payload = next(traffic)
        assert speaker_of(topic) in speakers, topic
        if b"ghost" in payload:
            # With a gateway, an unknown device is a gateway's unknown child: the broker
            # lets the gateway through and the worker quarantines it as unknown_device.
            assert topic == gateway_topic("acme", gateways[0])
    assert set(traffic.tally.bad) == {k.value for k in BadKind}
    assert speaker_of(device_topic("acme", "d1")) == "d1"
