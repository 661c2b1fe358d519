"""The DICOM Conformance Statement against the code: docs/conformance.md is what `rtnode conformance` prints;
the SOP classes and transfer syntaxes the Storage SCP accepts, asked of a running SCP with every one pynetdicom
knows, are those it lists; what the sender proposes, seen by a peer, is what it lists; and every attribute of the
RT Structure Set and Segmentation the node writes is in its annex."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RTStructureSetStorage,
    SegmentationStorage,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from node.config import parse_config
from node.db.engine import open_database
from node.destinations import DeliveryOrder, Destination
from node.harness import LOOPBACK, free_port
from node.imaging.volume import load_series_dir
from node.outputs import OutputPaths, write_outputs
from node.pipeline.confidence import StructureConfidence
from node.rtstruct.builder import Algorithm
from node.scp import StorageSCP
from node.sender import send
from node.store import InstanceStore
from node.synth.ct_series import write_cylinder_ct
from node.vocabulary import OutputKind
from tests.conftest import REPO, rtnode

DOCUMENT = REPO / "docs" / "conformance.md"
MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2: odd IDs 1 to 255)
_UID = re.compile(r"`([0-9.]+)`")


def section(heading: str) -> str:
    """The statement's text under `heading` (a whole heading line's start), to the next heading of its level or above."""
    text = DOCUMENT.read_text()
    start = text.index(f"\n{heading}")
    level = heading.split(" ")[0]
    ends = [m.start() for m in re.finditer(r"\n(#+) ", text[start + 1:]) if len(m.group(1)) <= len(level)]
    return text[start: start + 1 + ends[0]] if ends else text[start:]


def tables(text: str) -> dict[str, list[list[str]]]:
    """Each Markdown table in `text` by its header row (cells joined by " | "), as rows of cells."""
    found: dict[str, list[list[str]]] = {}
    for block in re.findall(r"(?:^\|.*\|\n?)+", text, re.M):
        rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in block.strip().splitlines()]
        found.setdefault(" | ".join(rows[0]), []).extend(rows[2:])  # the header, then the --- row
    return found


def documented_uids(rows: list[list[str]], column: int) -> list[str]:
    return [_UID.fullmatch(row[column]).group(1) for row in rows]


def test_docs_conformance_md_is_what_rtnode_conformance_prints():
    printed = rtnode("conformance")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == DOCUMENT.read_text(), "docs/conformance.md is stale: `rtnode conformance > docs/conformance.md`"


@pytest.fixture
def scp(tmp_path) -> Iterator[StorageSCP]:
    """The node's Storage SCP, listening on loopback."""
    config = parse_config(
        f'[node]\nhost = "{LOOPBACK}"\nport = {free_port()}\ndata_dir = "{tmp_path / "data"}"\nfsync = false\n'
    )
    engine = open_database(config.node.database_url, fsync=False)
    receiver = StorageSCP(config, InstanceStore(engine, config.incoming_dir, fsync=False))
    receiver.start()
    yield receiver
    receiver.stop(grace_seconds=0)
    engine.dispose()


def accepted(port: int, contexts: list[PresentationContext]) -> set[tuple[str, str]]:
    """(SOP class, transfer syntax) of each context the SCP accepts, proposed in associations of MAX_CONTEXTS each."""
    found = set()
    for start in range(0, len(contexts), MAX_CONTEXTS):
        ae = AE(ae_title="CONFORMANCE")
        ae.requested_contexts = contexts[start: start + MAX_CONTEXTS]
        assoc = ae.associate(LOOPBACK, port, ae_title="RTNODE")
        if not assoc.is_established:  # the SCP accepted none of them, so pynetdicom aborted it
            assert assoc.is_aborted and not assoc.is_rejected
            continue
        found |= {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        assoc.release()
    return found


def test_the_sop_classes_the_scp_accepts_are_those_the_statement_lists(scp):
    candidates = [Verification, *(cx.abstract_syntax for cx in AllStoragePresentationContexts)]
    contexts = [build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) for sop_class in candidates]

    taken = {sop_class for sop_class, _ in accepted(scp.port, contexts)}

    listed = tables(section("#### 4.2.1"))["SOP Class | UID | Role"]
    assert taken == set(documented_uids(listed, 1))
    assert {row[2] for row in listed} == {"SCP"}


def test_the_transfer_syntaxes_the_scp_accepts_are_those_the_statement_lists_in_its_order(scp):
    storage_and_verification = [
        build_context(sop_class, [syntax]) for sop_class in (CTImageStorage, Verification) for syntax in ALL_TRANSFER_SYNTAXES
    ]

    taken = accepted(scp.port, storage_and_verification)

    listed = section("#### 4.2.1").split("Verification is accepted")
    storage = documented_uids(tables(listed[0])["Transfer Syntax | UID"], 1)
    verification = documented_uids(tables(listed[1])["Transfer Syntax | UID"], 1)
    assert {syntax for sop_class, syntax in taken if sop_class == CTImageStorage} == set(storage)
    assert {syntax for sop_class, syntax in taken if sop_class == Verification} == set(verification)
    # Of the syntaxes proposed in one context, the first in the statement's order is taken.
    for first in range(len(storage)):
        assert accepted(scp.port, [build_context(CTImageStorage, storage[first:][::-1])]) == {(CTImageStorage, storage[first])}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[OutputKind, Path]:
    """An RT Structure Set and a Segmentation as the worker writes them, from a CT with a Specific Character Set."""
    folder = tmp_path_factory.mktemp("outputs")
    volume = load_series_dir(write_cylinder_ct(folder / "ct", slices=4, rows=16, columns=16)[0].parent)
    assert "SpecificCharacterSet" in volume.headers[0] and "StudyDescription" in volume.headers[0]
    mask = np.zeros(volume.shape, dtype=bool)
    mask[1:3, 4:10, 4:10] = True
    paths = OutputPaths(rtstruct=folder / "rtstruct.dcm", seg=folder / "seg.dcm")
    # with a confidence, as the worker and `rtnode contour` write it: the ROI observation's description
    write_outputs(volume, mask, paths, Algorithm("test", "1"), confidence=StructureConfidence(0.9, (1,)))
    return {OutputKind.RTSTRUCT: paths.rtstruct, OutputKind.SEG: paths.seg}


class ProposalsSeen:
    """A pynetdicom Storage and Verification SCP that accepts everything and notes each presentation context
    proposed to it."""

    def __init__(self) -> None:
        self.proposed: list[tuple[str, tuple[str, ...]]] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="TPS")
        for sop_class in (RTStructureSetStorage, SegmentationStorage, Verification):
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        handlers = [(evt.EVT_REQUESTED, self._note), (evt.EVT_C_STORE, lambda event: 0x0000)]
        self.port = free_port()
        self._server = ae.start_server((LOOPBACK, self.port), block=False, evt_handlers=handlers)

    def _note(self, event) -> None:
        with self._lock:
            self.proposed += [
                (str(cx.abstract_syntax), tuple(str(ts) for ts in cx.transfer_syntax))
                for cx in event.assoc.requestor.requested_contexts
            ]

    def stop(self) -> None:
        self._server.shutdown()


def test_what_the_sender_proposes_is_what_the_statement_lists(outputs):
    peer = ProposalsSeen()
    try:
        destination = Destination(name="tps", ae_title="TPS", host=LOOPBACK, port=peer.port)
        config = parse_config(f'[[destinations]]\nname = "tps"\nae_title = "TPS"\nhost = "{LOOPBACK}"\nport = {peer.port}\n')
        for kind, path in outputs.items():
            assert send(config, DeliveryOrder(1, "tps", "TPS", LOOPBACK, peer.port, kind, path)).delivered, kind
        assert destination.echo(config).answered
    finally:
        peer.stop()

    [listed] = tables(section("##### SOP classes and transfer syntaxes")).values()
    syntaxes = {UID(syntax).name: syntax for syntax in ALL_TRANSFER_SYNTAXES}
    documented = [
        (uid, tuple(syntaxes[name] for name in row[3].split(", ")))
        for row, uid in zip(listed, documented_uids(listed, 2), strict=True)
    ]
    assert sorted(peer.proposed) == sorted(documented)


def attribute_tags(dataset: Dataset, nested: bool) -> set[str]:
    """Each attribute's tag as the statement writes it, `(0010,0010)`; with `nested`, those in sequence items too."""
    tags = set()
    for element in dataset:
        tags.add(f"({element.tag.group:04X},{element.tag.element:04X})")
        if nested and element.VR == "SQ":
            for item in element.value:
                tags |= attribute_tags(item, nested)
    return tags


def test_the_annex_lists_every_attribute_of_the_rt_structure_set_and_no_other(outputs):
    rtstruct = dcmread(outputs[OutputKind.RTSTRUCT])
    annex = section("#### 8.1.1")
    documented = {f"({tag})" for tag in re.findall(r"`\(([0-9A-F]{4},[0-9A-F]{4})\)`", annex)}

    assert rtstruct.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and "Explicit VR\nLittle Endian" in annex
    assert attribute_tags(rtstruct, nested=True) == documented


def test_the_annex_lists_every_attribute_of_the_segmentation(outputs):
    seg = dcmread(outputs[OutputKind.SEG])
    annex = section("#### 8.1.2")
    documented = {f"({tag})" for tag in re.findall(r"`\(([0-9A-F]{4},[0-9A-F]{4})\)`", annex)}

    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and "Explicit VR Little Endian" in annex
    assert attribute_tags(seg, nested=False) - documented == set()
    assert attribute_tags(seg.SegmentSequence[0], nested=False) - documented <= {"(0062,0004)"}  # the segment's number
