"""The words the database stores and the job log shows: job and delivery statuses, event
kinds and output kinds. StrEnums, so a row's plain string compares equal to its member."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SENDING = "sending"  # contoured; deliveries pending
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"  # not a series rtnode contours (not CT, a localizer, too few slices)


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # a newer version of the job's series made it pointless


class EventKind(StrEnum):
    QUEUED = "queued"
    INPUTS_UPDATED = "inputs updated"
    REPEAT = "repeat"  # the same instances again: no new version
    RERUN = "rerun"  # a new version with the same instances, asked for by hand
    REJECTED = "rejected"
    STARTED = "started"
    REQUEUED = "requeued"
    CONTOURED = "contoured"
    SENDING = "sending"
    DELIVERED = "delivered"
    SEND_FAILED = "send failed"
    SEND_INTERRUPTED = "send interrupted"  # a restart cut an attempt off; it counts
    RESEND = "resend"
    SUPERSEDED = "superseded"
    DONE = "done"
    FAILED = "failed"


class OutputKind(StrEnum):
    RTSTRUCT = "rtstruct"
    MASK = "mask"
    SEG = "seg"
    QA = "qa"
