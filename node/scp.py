"""The receiving side: a pynetdicom Verification and Storage SCP.

Small event handlers, the AE configured declaratively (after pynetdicom's
`apps/storescp`). Every decision about an association or an instance is logged
with the peer's AE title and address so an admin can tell who sent what.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    RTDoseStorage,
    RTImageStorage,
    RTIonPlanStorage,
    RTPlanStorage,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    SpatialRegistrationStorage,
    Verification,
)
from pynetdicom.status import Status
from pynetdicom.transport import ThreadedAssociationServer

from node.config import Config
from node.store import CallingPeer, InstanceStore, StoreRefused

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = [
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    PositronEmissionTomographyImageStorage,
    EnhancedPETImageStorage,
    RTStructureSetStorage,
    RTPlanStorage,
    RTIonPlanStorage,
    RTDoseStorage,
    RTImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    SpatialRegistrationStorage,
]

TRANSFER_SYNTAXES = [
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLossless,  # .57, non-hierarchical
    JPEGLosslessSV1,  # .70, first-order prediction
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, with the reason (PS3.8 9.3.4).
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)

class SeriesObserver(Protocol):
    """Told what arrived on which association (the series-completion tracker)."""

    def instance_stored(self, association_id: int, series_uid: str) -> None: ...

    def association_released(self, association_id: int) -> None: ...

    def association_aborted(self, association_id: int) -> None: ...


class StorageSCP:
    """Accepts associations from allowed callers and stores what they send."""

    def __init__(self, config: Config, store: InstanceStore, observer: SeriesObserver | None = None) -> None:
        self._config = config
        self._store = store
        self._observer = observer
        self._server: ThreadedAssociationServer | None = None
        self._ae = self._make_ae()

    def _make_ae(self) -> AE:
        node = self._config.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.network_timeout = node.network_timeout_seconds
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        return self._server.server_address[1]

    def start(self) -> None:
        """Listen in background threads; returns once the port is bound."""
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_RELEASED, self._on_released),
        ]
        address = (self._config.node.host, self._config.node.port)
        self._server = self._ae.start_server(address, block=False, evt_handlers=handlers)
        log.info(
            "listening as %s on %s:%d (%d storage SOP classes)",
            self._config.node.ae_title,
            address[0],
            self.port,
            len(STORAGE_SOP_CLASSES),
        )

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop accepting, let in-flight associations finish, then abort what is left."""
        if self._server is None:
            return
        grace = self._config.node.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        self._server.shutdown()
        self._server = None
        deadline = time.monotonic() + grace
        while self._established() and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._established():
            log.warning("aborting association from %s after %.0f s shutdown grace", assoc.requestor.ae_title, grace)
        # Also drops connections that never completed negotiation: they carry no stores.
        self._ae.shutdown()

    def _established(self) -> list:
        return [assoc for assoc in self._ae.active_associations if assoc.is_established]

    def _on_requested(self, event: Event) -> None:
        requestor = event.assoc.requestor
        calling = requestor.primitive.calling_ae_title.strip()
        called = requestor.primitive.called_ae_title.strip()
        address = requestor.address
        if called != self._config.node.ae_title:
            log.warning(
                "rejected association from %s@%s: called AE title %r is not ours (%r)",
                calling,
                address,
                called,
                self._config.node.ae_title,
            )
            self._reject(event, _REJECT_CALLED_AE)
        elif not self._config.security.admits(calling, address):
            log.warning("rejected association from %s@%s: caller not in security.allowed_callers", calling, address)
            self._reject(event, _REJECT_CALLING_AE)
        else:
            log.debug("association requested by %s@%s", calling, address)

    @staticmethod
    def _reject(event: Event, reason: tuple[int, int, int]) -> None:
        # As pynetdicom's own ACSE does: kill() waits until the A-ASSOCIATE-RJ has gone out.
        event.assoc.acse.send_reject(*reason)
        event.assoc.kill()

    def _on_c_echo(self, event: Event) -> int:
        log.debug("C-ECHO from %s@%s", event.assoc.requestor.ae_title, event.assoc.requestor.address)
        return Status.SUCCESS

    def _on_aborted(self, event: Event) -> None:
        requestor = event.assoc.requestor
        log.warning("association from %s@%s aborted", requestor.ae_title, requestor.address)
        if self._observer:
            self._observer.association_aborted(id(event.assoc))

    def _on_released(self, event: Event) -> None:
        if self._observer:
            try:
                self._observer.association_released(id(event.assoc))
            except Exception:
                log.exception("series completion check failed after association release")

    def _on_c_store(self, event: Event) -> int:
        requestor = event.assoc.requestor
        peer = CallingPeer(ae_title=requestor.ae_title.strip(), address=requestor.address)
        try:
            stored = self._store.save(event.encoded_dataset(), event.context.transfer_syntax, peer)
        except StoreRefused as exc:
            log.error(
                "refused instance %s from %s@%s: %s (status 0x%04X)",
                event.request.AffectedSOPInstanceUID,
                peer.ae_title,
                peer.address,
                exc,
                exc.status,
            )
            return exc.status
        except Exception:
            log.exception("unexpected error storing an instance from %s@%s", peer.ae_title, peer.address)
            return Status.OUT_OF_RESOURCES
        if self._observer:
            self._observer.instance_stored(id(event.assoc), stored.header.series_instance_uid)
        return Status.SUCCESS

