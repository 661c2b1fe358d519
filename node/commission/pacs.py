"""Talking to a `[[pacs]]` as a query/retrieve SCU: C-FIND at the study and series levels (Study Root), and
retrieving one series into a folder by C-GET (the instances come back on the same association) or by C-MOVE
to the `[commissioning]` listener, its own AE title and port, which takes only the series asked for.

Nothing here touches the database, a job or a destination. A PACS that cannot be reached, drops the association
or answers a retrieval with a failure raises `PacsGone`, in words that name the PACS.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, Association, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    RTStructureSetStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import STATUS_PENDING, STATUS_SUCCESS, STATUS_WARNING, code_to_category

from node.config import CommissioningSection, PacsEntry, TlsSection
from node.errors import UserError
from node.imaging.dicomfile import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.transport import client_context

log = logging.getLogger(__name__)

# The query/retrieve models it calls the PACS with: one association per operation.
QUERY_RETRIEVE_MODELS = (
    StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
STORAGE_CLASSES = (CTImageStorage, RTStructureSetStorage)
# What a retrieval accepts the images in: the uncompressed syntaxes and the common lossless and lossy ones.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless, JPEGBaseline8Bit, JPEG2000,
]  # fmt: skip
_FAILURE_NOT_ASKED_FOR = 0xC001  # a C-STORE of something no retrieval asked for: refused (PS3.4 "cannot understand")


class PacsGone(UserError):
    """The PACS cannot be reached, dropped the association, or failed a retrieval."""


@dataclass(frozen=True)
class StudyFound:
    study_instance_uid: str
    patient_id: str
    study_date: str
    study_description: str


@dataclass(frozen=True)
class SeriesFound:
    series_instance_uid: str
    modality: str
    series_description: str
    manufacturer: str
    instances: int | None  # NumberOfSeriesRelatedInstances, when the PACS says


class _Inbox:
    """Where the instances of the retrieval under way go: one series into one folder. C-STOREs of anything else
    are refused; the count is what arrived."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: str | None = None
        self._folder: Path | None = None
        self.received = 0

    def expect(self, series_instance_uid: str | None, folder: Path | None) -> None:
        with self._lock:
            self._series, self._folder, self.received = series_instance_uid, folder, 0
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)

    def on_store(self, event: evt.Event) -> int:
        with self._lock:
            dataset = event.dataset
            if self._folder is None or str(dataset.get("SeriesInstanceUID", "")) != self._series:
                log.warning("refused a C-STORE from %s of an instance no retrieval asked for", event.assoc.requestor.ae_title)
                return _FAILURE_NOT_ASKED_FOR
            name = str(event.request.AffectedSOPInstanceUID).replace("/", "_")
            (self._folder / f"{name}.dcm").write_bytes(event.encoded_dataset())
            self.received += 1
            return 0x0000


class Pacs:
    """One `[[pacs]]`, called as the `[commissioning]` AE title. With `retrieve = "c-move"` the listener runs
    from `open()` to `close()` (a context manager)."""

    def __init__(self, entry: PacsEntry, commissioning: CommissioningSection, tls: TlsSection) -> None:
        self.entry, self._commissioning, self._tls = entry, commissioning, tls
        self._inbox = _Inbox()
        self._listener = None
        self._lock = threading.Lock()  # one association at a time from this side

    @property
    def peer(self) -> str:
        return f"PACS {self.entry.name} ({self.entry.ae_title}@{self.entry.host}:{self.entry.port})"

    def __enter__(self) -> Pacs:
        if self.entry.retrieve == "c-move":
            ae = self._ae()
            for sop_class in STORAGE_CLASSES:
                ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
            ae.require_calling_aet = [self.entry.ae_title]  # only the PACS moves to it
            address = (self._commissioning.host, self._commissioning.port)
            try:
                self._listener = ae.start_server(address, block=False, evt_handlers=[(evt.EVT_C_STORE, self._inbox.on_store)])
            except OSError as exc:
                raise UserError(
                    f"cannot listen for C-MOVE on {address[0]}:{address[1]} ([commissioning] host and port): {exc.strerror}"
                ) from exc
        return self

    def __exit__(self, *exc_info) -> None:
        if self._listener is not None:
            self._listener.shutdown()
            self._listener = None

    def _ae(self) -> AE:
        ae = AE(ae_title=self._commissioning.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.connection_timeout = self.entry.acse_timeout_seconds
        ae.acse_timeout = self.entry.acse_timeout_seconds
        ae.dimse_timeout = self.entry.dimse_timeout_seconds
        ae.network_timeout = self.entry.network_timeout_seconds
        return ae

    def _associate(self, model: str) -> Association:
        ae = self._ae()
        ae.add_requested_context(model)
        roles, handlers = [], []
        if model == StudyRootQueryRetrieveInformationModelGet:
            for sop_class in STORAGE_CLASSES:
                ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
                roles.append(build_role(sop_class, scp_role=True))
            handlers.append((evt.EVT_C_STORE, self._inbox.on_store))
        tls_args = None
        if self.entry.tls:
            try:
                tls_args = (client_context(self._tls), self.entry.host)
            except OSError as exc:
                raise PacsGone(f"cannot reach {self.peer} over TLS: [tls] files cannot be used: {exc}") from exc
        assoc = ae.associate(
            self.entry.host, self.entry.port, ae_title=self.entry.ae_title, ext_neg=roles or None, evt_handlers=handlers,
            tls_args=tls_args,
        )
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            reason = getattr(assoc.acceptor.primitive, "reason_str", "") or "rejected"
            raise PacsGone(f"{self.peer} rejected the association: {reason} (does it know AE title "
                           f"{self._commissioning.ae_title}?)")
        raise PacsGone(f"cannot reach {self.peer}" + (" over TLS" if tls_args else ""))

    def _find(self, query: Dataset) -> list[Dataset]:
        with self._lock:
            assoc = self._associate(StudyRootQueryRetrieveInformationModelFind)
            found, final = [], None
            try:
                for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                    code = getattr(status, "Status", None)
                    if code is None:
                        break
                    if code_to_category(code) == STATUS_PENDING:
                        if identifier is not None:
                            found.append(identifier)
                    else:
                        final = code
            finally:
                if assoc.is_established:
                    assoc.release()
            if final is None or code_to_category(final) not in (STATUS_SUCCESS, STATUS_WARNING):
                said = "no final answer (the association ended)" if final is None else f"status 0x{final:04X}"
                raise PacsGone(f"{self.peer} did not complete a C-FIND: {said}")
            return found

    def find_studies(self, patient_id: str = "", study_date: str = "") -> list[StudyFound]:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        query.PatientID = patient_id
        query.StudyDate = study_date
        query.StudyDescription = ""
        return [
            StudyFound(str(ds.StudyInstanceUID), str(ds.get("PatientID", "")), str(ds.get("StudyDate", "")),
                       str(ds.get("StudyDescription", "")))
            for ds in self._find(query)
            if ds.get("StudyInstanceUID")
        ]

    def find_series(self, study_instance_uid: str) -> list[SeriesFound]:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_instance_uid
        query.SeriesInstanceUID = ""
        query.Modality = ""
        query.SeriesDescription = ""
        query.Manufacturer = ""
        query.NumberOfSeriesRelatedInstances = ""
        series = []
        for ds in self._find(query):
            count = ds.get("NumberOfSeriesRelatedInstances")
            series.append(SeriesFound(
                str(ds.get("SeriesInstanceUID", "")), str(ds.get("Modality", "")).upper(), str(ds.get("SeriesDescription", "")),
                str(ds.get("Manufacturer", "")), int(count) if count not in (None, "") else None,
            ))
        return [s for s in series if s.series_instance_uid]

    def retrieve_series(self, study_instance_uid: str, series_instance_uid: str, folder: Path) -> int:
        """Every instance of the series into `folder`; the number received. Raises PacsGone when the PACS fails it."""
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_instance_uid
        query.SeriesInstanceUID = series_instance_uid
        move = self.entry.retrieve == "c-move"
        model = StudyRootQueryRetrieveInformationModelMove if move else StudyRootQueryRetrieveInformationModelGet
        with self._lock:
            self._inbox.expect(series_instance_uid, folder)
            try:
                assoc = self._associate(model)
                final, failed = None, 0
                try:
                    responses: Callable = (
                        (lambda: assoc.send_c_move(query, self._commissioning.ae_title, model))
                        if move else (lambda: assoc.send_c_get(query, model))
                    )
                    for status, _ in responses():
                        code = getattr(status, "Status", None)
                        if code is None:
                            break
                        if code_to_category(code) != STATUS_PENDING:
                            final = code
                            failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
                finally:
                    if assoc.is_established:
                        assoc.release()
                received = self._inbox.received
            finally:
                self._inbox.expect(None, None)
        how = "C-MOVE" if move else "C-GET"
        if final is None:
            raise PacsGone(f"{self.peer} ended the {how} of series {series_instance_uid} without a final answer "
                           f"({received} instances had arrived)")
        if code_to_category(final) not in (STATUS_SUCCESS, STATUS_WARNING) or failed:
            raise PacsGone(f"{self.peer} answered the {how} of series {series_instance_uid} with status 0x{final:04X}"
                           f" ({failed} instances failed, {received} arrived)")
        if not received:
            raise PacsGone(f"{self.peer} sent no instance of series {series_instance_uid} for the {how}")
        return received
