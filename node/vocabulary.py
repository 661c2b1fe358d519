"""The words the database stores and the job log shows: job, delivery and review statuses,
event kinds, output kinds and review kinds. StrEnums, so a row's plain string compares equal to its member."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SENDING = "sending"  # contoured; deliveries pending
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"  # not a series rtnode contours (not CT, a localizer, too few slices)
    HELD = "held"  # contoured, but a structure's confidence is below confidence.min_to_send: an admin releases or discards it


class RouteMode(StrEnum):
    LIVE = "live"  # contoured and sent to the route's destinations
    SHADOW = "shadow"  # contoured and kept; nothing sent until the route is live


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
    CONTOUR_SIMPLIFIED = "contour simplified"  # too long for one element: fewer points, within a stated tolerance
    STRUCTURE_NOT_FOUND = "structure not found"  # a model found nothing of one of its structures: left out of the set
    SENDING = "sending"
    DELIVERED = "delivered"
    SEND_FAILED = "send failed"
    SEND_INTERRUPTED = "send interrupted"  # a restart cut an attempt off; it counts
    RESEND = "resend"
    SUPERSEDED = "superseded"
    DONE = "done"
    FAILED = "failed"
    REVIEW_RECEIVED = "review received"  # a structure set came back for this job (a review, or why not)
    OUTPUTS_REMOVED = "outputs removed"  # retention marked the job's output files removed (then deleted them)
    HELD = "held"  # contoured below confidence.min_to_send: nothing sent until an admin releases it
    RELEASED = "released"  # a held job let go by an admin: sent
    DISCARDED = "discarded"  # a held job an admin will not send


class OutputKind(StrEnum):
    RTSTRUCT = "rtstruct"
    MASK = "mask"
    SEG = "seg"
    QA = "qa"


class ReviewStatus(StrEnum):
    PENDING = "pending"  # received; the worker has not looked at it yet
    DONE = "done"  # classified, and measured when it is a review


class ReviewKind(StrEnum):
    """What a structure set that came back turned out to be."""

    REVIEW = "review"  # a human's edit (or approval) of an auto-contour: measured against it
    NOT_A_REVIEW = "not a review"  # rtnode's own output, or another automatic contour nobody approved
    UNMATCHED = "unmatched"  # no auto-contour of the CT it references, or one of another patient or study
    UNREADABLE = "unreadable"  # matched, but it cannot be read or compared (the reason says why)
