"""The sender against a real pynetdicom planning-system stand-in that is slow to answer: the
destination's DIMSE timeout decides whether it waits."""

from __future__ import annotations

import time

import pytest
from pydicom.uid import RTStructureSetStorage
from pynetdicom import AE, evt
from pynetdicom.status import Status

from node.config import Config
from node.destinations import DeliveryOrder, Destination
from node.harness import LOOPBACK, free_port
from node.sender import send
from node.vocabulary import OutputKind


@pytest.fixture
def slow_tps():
    """Answers each C-STORE after 3 s, as a planning system importing a large structure set may."""
    ae = AE(ae_title="TPS")
    ae.add_supported_context(RTStructureSetStorage)

    def store(event) -> int:
        time.sleep(3)
        return Status.SUCCESS

    port = free_port()
    server = ae.start_server((LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    yield port
    server.shutdown()


@pytest.mark.parametrize(("dimse_timeout", "delivered"), [(1.0, False), (10.0, True)])
def test_the_destination_dimse_timeout_decides_how_long_the_sender_waits(slow_tps, rtstruct, dimse_timeout, delivered):
    destination = Destination(name="tps", ae_title="TPS", host=LOOPBACK, port=slow_tps, dimse_timeout_seconds=dimse_timeout)
    config = Config(destinations=[destination])
    start = time.monotonic()
    outcome = send(config, DeliveryOrder(1, "tps", "TPS", LOOPBACK, slow_tps, OutputKind.RTSTRUCT, rtstruct))
    elapsed = time.monotonic() - start
    assert outcome.delivered is delivered, outcome
    if not delivered:
        assert outcome.retry and outcome.detail == "no C-STORE response from tps" and elapsed < 2.9


def test_a_delivery_to_a_destination_no_longer_configured_is_not_sent(slow_tps, rtstruct):
    """Sent as recorded, it could go without the TLS the destination had: it fails in words instead."""
    outcome = send(Config(), DeliveryOrder(1, "tps", "TPS", LOOPBACK, slow_tps, OutputKind.RTSTRUCT, rtstruct))
    assert not outcome.delivered and not outcome.retry
    assert outcome.detail.startswith("tps is no longer a configured destination, so its TLS and timeouts are unknown")
