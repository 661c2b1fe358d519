"""Destination types: where outputs are sent, one module per type, found by the `type` of a `[[destinations]]`
table. Each module holds its type's validated settings (a `Destination` subclass) and its send.

A new type is one module: a `Destination` subclass with `type: Literal["name"] = "name"`, its settings as fields,
its `address`, `send`, `echo` and `orphan_detail` (`takes` and `warning` when it needs them); and its class in
`register(...)` below. The configuration, the sender and the lifecycle need no change.
"""

from node.destinations.base import DeliveryOrder, Destination, SendOutcome, orphaned, register
from node.destinations.cstore import CStoreDestination
from node.destinations.stowrs import StowRsDestination

register(CStoreDestination, StowRsDestination)

__all__ = ["DeliveryOrder", "Destination", "SendOutcome", "orphaned"]
