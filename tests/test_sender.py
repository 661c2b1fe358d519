"""The sender against a real pynetdicom planning-system stand-in that is slow to answer: the
destination's DIMSE timeout decides whether it waits."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import RTStructureSetStorage
from pynetdicom import AE, evt
from pynetdicom.status import Status

from node.config import Config, Destination
from node.harness import LOOPBACK, free_port
from node.imaging.volume import load_series_dir
from node.lifecycle import DeliveryOrder
from node.outputs import OutputPaths, write_outputs
from node.rtstruct.builder import Algorithm
from node.sender import c_store
from node.synth.ct_series import write_cylinder_ct
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


@pytest.fixture
def rtstruct(tmp_path) -> Path:
    volume = load_series_dir(write_cylinder_ct(tmp_path / "ct", slices=4, rows=16, columns=16)[0].parent)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[1:3, 4:10, 4:10] = True
    path = tmp_path / "rtstruct.dcm"
    write_outputs(volume, mask, OutputPaths(rtstruct=path), Algorithm("test", "1"))
    return path


@pytest.mark.parametrize(("dimse_timeout", "delivered"), [(1.0, False), (10.0, True)])
def test_the_destination_dimse_timeout_decides_how_long_the_sender_waits(slow_tps, rtstruct, dimse_timeout, delivered):
    destination = Destination(name="tps", ae_title="TPS", host=LOOPBACK, port=slow_tps, dimse_timeout_seconds=dimse_timeout)
    config = Config(destinations=[destination])
    start = time.monotonic()
    outcome = c_store(config, DeliveryOrder(1, "tps", "TPS", LOOPBACK, slow_tps, OutputKind.RTSTRUCT, rtstruct))
    elapsed = time.monotonic() - start
    assert outcome.delivered is delivered, outcome
    if not delivered:
        assert outcome.retry and outcome.detail == "no C-STORE response from tps" and elapsed < 2.9
