"""The node's DICOM Conformance Statement (PS3.2), as `rtnode conformance` prints it and docs/conformance.md holds
it: the prose is a template shipped in the package (`conformance_template.md`); the SOP classes, transfer syntaxes,
statuses, identity and defaults are filled in from the lists and settings the code runs by, so the statement
cannot claim what the node does not do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from string import Template

from pydantic import BaseModel
from pydicom.uid import UID
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.sop_class import Verification

from node import __version__
from node.commission.pacs import QUERY_RETRIEVE_MODELS, STORAGE_CLASSES
from node.commission.pacs import TRANSFER_SYNTAXES as RETRIEVED_TRANSFER_SYNTAXES
from node.config import CommissioningSection, DeliverySection, NodeSection, SecuritySection, TlsSection
from node.destinations.cstore import PROPOSED_TRANSFER_SYNTAXES, SOP_CLASSES, CStoreDestination
from node.destinations.stowrs import StowRsDestination
from node.imaging.dicomfile import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.instance_check import Status  # pynetdicom's, with the C-STORE statuses the store answers added
from node.scp import DIMSE_TIMEOUT_SECONDS, STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from node.transport import MINIMUM_TLS_VERSION

TEMPLATE = Path(__file__).resolve().parent / "conformance_template.md"



@dataclass(frozen=True)
class StoreStatus:
    """A C-STORE response status the Storage SCP answers: its name in pynetdicom's `Status` (node.instance_check adds
    rtnode's), its meaning in PS3.4 B.2.3 and when it is answered."""

    name: str
    meaning: str
    when: str

    @property
    def code(self) -> int:
        return getattr(Status, self.name)


STORE_STATUSES = (
    StoreStatus("SUCCESS", "Success", "the instance is written durably to disk and recorded, or repeats one held"),
    StoreStatus("DUPLICATE_SOP_INSTANCE", "Failure: Duplicate SOP Instance", "its SOP Instance UID is held with other "
                "content, or in another study or series: kept aside as a conflict, not received"),
    StoreStatus("OUT_OF_RESOURCES", "Refused: Out of Resources", "the disk or the database failed: a retry may succeed"),
    StoreStatus("CANNOT_DECODE", "Error: Cannot Understand", "the data set cannot be decoded (corrupt, nested too deeply, "
                "no transfer syntax)"),
    StoreStatus("MISSING_UID", "Error: Cannot Understand", "the SOP Class, SOP Instance, Study or Series Instance UID is "
                "missing"),
    StoreStatus("INVALID_UID", "Error: Cannot Understand", "a UID is malformed"),
    StoreStatus("INSTANCE_TOO_LARGE", "Error: Cannot Understand", "the instance, decoded (inflated), is larger than "
                "node.max_instance_mb"),
    StoreStatus("INCOMPLETE_PIXEL_DATA", "Error: Cannot Understand", "the pixel data is shorter than its attributes "
                "declare, or its fragments are not whole"),
)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _uid_rows(uids: list[str]) -> list[tuple[str, str]]:
    return [(UID(uid).name, f"`{uid}`") for uid in uids]


def _value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _defaults(prefix: str, section: type[BaseModel]) -> dict[str, str]:
    """`{prefix}_{key}` -> the default of each setting of a configuration section, as the template names them."""
    return {f"{prefix}_{key}": _value(field.default) for key, field in section.model_fields.items()}


def _placeholders() -> dict[str, str]:
    tls_version = MINIMUM_TLS_VERSION.name.replace("TLSv", "TLS ").replace("_", ".")
    allowed = SecuritySection().allowed_callers
    proposed = ", ".join(UID(syntax).name for syntax in PROPOSED_TRANSFER_SYNTAXES)
    return {
        **_defaults("node", NodeSection),
        **_defaults("tls", TlsSection),
        **_defaults("delivery", DeliverySection),
        **_defaults("cstore", CStoreDestination),
        **_defaults("stowrs", StowRsDestination),
        **_defaults("commissioning", CommissioningSection),
        "version": __version__,
        "implementation_class_uid": IMPLEMENTATION_CLASS_UID,
        "implementation_version_name": IMPLEMENTATION_VERSION_NAME,
        "scp_dimse_timeout_seconds": _value(DIMSE_TIMEOUT_SECONDS),
        "sender_max_pdu_bytes": _value(AE().maximum_pdu_size),
        "minimum_tls_version": tls_version,
        "default_allowed_callers": ", ".join(f"AE title `{c.ae_title}` from {c.host or 'any address'}" for c in allowed),
        "verification_uid": f"`{Verification}`",
        "scp_sop_classes": _table(
            ("SOP Class", "UID", "Role"), [(*row, "SCP") for row in _uid_rows([Verification, *STORAGE_SOP_CLASSES])]
        ),
        "scp_transfer_syntaxes": _table(("Transfer Syntax", "UID"), _uid_rows(TRANSFER_SYNTAXES)),
        "verification_transfer_syntaxes": _table(("Transfer Syntax", "UID"), _uid_rows(DEFAULT_TRANSFER_SYNTAXES)),
        "scu_sop_classes": _table(
            ("What is sent", "SOP Class", "UID", "Transfer Syntaxes proposed"),
            [
                (f"{kind.name} output", *row, proposed)
                for kind, row in zip(SOP_CLASSES, _uid_rows([*SOP_CLASSES.values()]), strict=True)
            ]
            + [("C-ECHO of `rtnode doctor`", *_uid_rows([Verification])[0], proposed)],
        ),
        "qr_sop_classes": _table(
            ("SOP Class", "UID", "Role"), [(*row, "SCU") for row in _uid_rows(list(QUERY_RETRIEVE_MODELS))]
        ),
        "qr_storage_sop_classes": _table(
            ("SOP Class", "UID", "Role"), [(*row, "SCP (sub-operations)") for row in _uid_rows(list(STORAGE_CLASSES))]
        ),
        "qr_transfer_syntaxes": _table(("Transfer Syntax", "UID"), _uid_rows(RETRIEVED_TRANSFER_SYNTAXES)),
        "store_statuses": _table(
            ("Status", "Code", "When"), [(status.meaning, f"`{status.code:04X}H`", status.when) for status in STORE_STATUSES]
        ),
    }


def conformance_statement() -> str:
    """The statement in Markdown; a placeholder of the template that the code does not fill raises KeyError."""
    return Template(TEMPLATE.read_text(encoding="utf-8")).substitute(_placeholders())
