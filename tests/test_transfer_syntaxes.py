"""Every compressed transfer syntax README says the node accepts, received over the network and decoded: a phantom
CT slice compressed here (DCMTK's dcmcjpeg, dcmcjpls, dcmcrle and dcmconv; pydicom's JPEG 2000 encoder), sent by a
C-STORE that proposes only that syntax, stored byte for byte as sent, and decoded to the right pixels."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pynetdicom
import pytest
from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from node.harness import LOOPBACK, NodeProcess, free_port
from node.scp import TRANSFER_SYNTAXES
from node.synth.ct_series import write_cylinder_ct
from tests.conftest import assert_log_clean, require_module, require_tool, run_tool
from tests.test_durability import dataset_bytes

ROWS, COLUMNS = 64, 48  # not square: a decoder that swaps them shows

Compress = Callable[[Path, Path], None]


def dcmtk(tool: str, *options: str) -> Compress:
    def compress(source: Path, target: Path) -> None:
        result = run_tool(require_tool(tool), *options, str(source), str(target))
        assert result.returncode == 0, result.stderr

    return compress


def pydicom_encoder(transfer_syntax: str, **options) -> Compress:
    """pydicom's encoder for `transfer_syntax`, through pylibjpeg-openjpeg (DCMTK has no JPEG 2000 encoder)."""

    def compress(source: Path, target: Path) -> None:
        require_module("openjpeg")
        ds = dcmread(source)
        ds.compress(transfer_syntax, **options)
        ds.save_as(target, enforce_file_format=True)

    return compress


# (transfer syntax, how to make it, how far a decoded pixel may be from the original: 0 lossless, None any)
COMPRESSIONS = [
    pytest.param(JPEGBaseline8Bit, dcmtk("dcmcjpeg", "+eb"), None, id="jpeg-baseline"),
    pytest.param(JPEGLossless, dcmtk("dcmcjpeg", "+el"), 0, id="jpeg-lossless-57"),
    pytest.param(JPEGLosslessSV1, dcmtk("dcmcjpeg", "+e1"), 0, id="jpeg-lossless-sv1-70"),
    pytest.param(JPEGLSLossless, dcmtk("dcmcjpls", "+el"), 0, id="jpeg-ls-lossless"),
    pytest.param(JPEGLSNearLossless, dcmtk("dcmcjpls", "+en", "+md", "2"), 2, id="jpeg-ls-near-lossless"),
    pytest.param(JPEG2000Lossless, pydicom_encoder(JPEG2000Lossless), 0, id="jpeg2000-lossless"),
    pytest.param(JPEG2000, pydicom_encoder(JPEG2000, j2k_cr=[10]), None, id="jpeg2000"),
    pytest.param(RLELossless, dcmtk("dcmcrle"), 0, id="rle"),
    pytest.param(DeflatedExplicitVRLittleEndian, dcmtk("dcmconv", "+td"), 0, id="deflated"),
]


def test_every_accepted_compressed_syntax_is_tested():
    tested = {param.values[0] for param in COMPRESSIONS}
    assert tested == set(TRANSFER_SYNTAXES) - {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # the two native ones


@pytest.fixture(scope="module")
def receiving_node(tmp_path_factory):
    """One node for the module: each test sends an instance of its own."""
    node = NodeProcess(root=tmp_path_factory.mktemp("node"), port=free_port(), extra_config="local_worker = false").start()
    yield node
    node.stop()
    assert_log_clean(node)


def c_store(port: int, path: Path, transfer_syntax: str) -> int:
    """The status answered to a C-STORE of the file's dataset bytes as they are, on an association that proposes
    `transfer_syntax` alone."""
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, transfer_syntax)
    assoc = ae.associate(LOOPBACK, port, ae_title="RTNODE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(path).Status
    finally:
        assoc.release()


@pytest.mark.parametrize(("transfer_syntax", "compress", "tolerance"), COMPRESSIONS)
def test_compressed_slice_stored_as_sent_and_decoded(receiving_node, tmp_path, monkeypatch, transfer_syntax, compress, tolerance):
    original = write_cylinder_ct(tmp_path / "ct", slices=1, rows=ROWS, columns=COLUMNS)[0]
    sent = tmp_path / "compressed.dcm"
    compress(original, sent)
    header = dcmread(sent, stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == transfer_syntax  # the encoder made what this test is about

    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)  # the file's dataset bytes, as they are
    assert c_store(receiving_node.port, sent, transfer_syntax) == 0x0000

    series = receiving_node.data_dir / "incoming" / header.StudyInstanceUID / header.SeriesInstanceUID
    stored = series / f"{header.SOPInstanceUID}.dcm"
    assert dataset_bytes(stored) == dataset_bytes(sent)
    with sqlite3.connect(receiving_node.database) as connection:
        row = connection.execute(
            "select path, size_bytes, transfer_syntax_uid, times_received from instances where sop_instance_uid = ?",
            (header.SOPInstanceUID,),
        ).fetchall()
    assert row == [(str(stored), stored.stat().st_size, transfer_syntax, 1)]

    received = dcmread(stored)
    assert received.file_meta.TransferSyntaxUID == transfer_syntax
    pixels = received.pixel_array
    assert pixels.shape == (ROWS, COLUMNS)
    if tolerance is not None:
        difference = np.abs(pixels.astype(np.int32) - dcmread(original).pixel_array.astype(np.int32))
        assert difference.max() <= tolerance
