"""What every destination is, whatever its type: a name, the address its deliveries record, one send attempt
and its outcome, and a warning at start-up; and the registry of the types, by the name in their `type`.

A `[[destinations]]` table, validated as a `Destination` (a field of the configuration), becomes the type its
`type` names (C-STORE without one); so does `Destination(**settings)`. Each type validates only its own keys, and
names the type when a key of another type is set on it. Nothing here touches the configuration, the database or
the lifecycle: a send gets what it needs of the configuration as `SenderConfig`, and the sender records its outcome.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, TypeAdapter, model_validator

from node.transport import TlsFiles
from node.vocabulary import OutputKind

# A table without `type`: every destination was C-STORE before there were types.
DEFAULT_TYPE = "c-store"
_TYPES: dict[str, type[Destination]] = {}  # filled by `register`, in node/destinations/__init__.py


@dataclass(frozen=True)
class DeliveryOrder:
    """One pending delivery as a send needs it: what to send, and where its row recorded it goes."""

    id: int
    destination: str
    ae_title: str
    host: str
    port: int
    kind: OutputKind
    path: Path


@dataclass(frozen=True)
class SendOutcome:
    """How one send attempt ended."""

    delivered: bool
    retry: bool  # only meaningful when not delivered: would waiting help?
    detail: str


@dataclass(frozen=True)
class EchoOutcome:
    """Whether a destination answered a check that it is there and would take outputs (`rtnode doctor`)."""

    answered: bool
    detail: str


class _CallingNode(Protocol):
    ae_title: str


class SenderConfig(Protocol):
    """What a send needs of the node's configuration (`node.config.Config` has it): the AE title the node calls
    as, and the TLS identity and trust it sends with. A protocol, so destinations need not import the
    configuration that lists them."""

    node: _CallingNode
    tls: TlsFiles


class Destination(BaseModel, ABC):
    """Where outputs are sent. One subclass per type, in its own module: its settings as fields (`type` the
    literal of its name), where its deliveries go, and how it sends."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1)]
    type: str

    def __new__(cls, **settings: Any) -> Destination:
        """`Destination(**settings)` makes the type `settings` name, as a `[[destinations]]` table does."""
        return super().__new__(_type_named(settings) if cls is Destination else cls)

    @model_validator(mode="wrap")
    @classmethod
    def _of_its_type(cls, data: Any, handler: ModelWrapValidatorHandler[Destination]) -> Destination:
        """A table is validated as the type it names, with that type's keys only: a key of another type would be
        silently ignored, so it is refused, naming the type."""
        if not isinstance(data, dict):
            return handler(data)
        if cls is Destination:
            return _type_named(data).model_validate(data)
        others = [key for kind in _TYPES.values() for key in kind.model_fields if key not in cls.model_fields]
        misplaced = [key for key in dict.fromkeys(others) if key in data]
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)}: not a key of a {cls.type_name()} destination")
        return handler(data)

    @classmethod
    def type_name(cls) -> str:
        """The name a table gives in `type` for this type: the default of its `type` field."""
        return cls.model_fields["type"].default

    @property
    @abstractmethod
    def address(self) -> tuple[str, str, int]:
        """AE title, host and port, as a delivery row records where it went."""

    @abstractmethod
    def send(self, config: SenderConfig, order: DeliveryOrder) -> SendOutcome:
        """One attempt to send `order`; it never raises: the outcome says whether waiting would help."""

    @abstractmethod
    def echo(self, config: SenderConfig) -> EchoOutcome:
        """Whether it answers as a send would reach it, storing nothing; it never raises."""

    def takes(self, order: DeliveryOrder) -> bool:
        """Whether it can send `order`, queued under its name, perhaps when that name was another type's. Any, unless
        a type sends to what the row recorded rather than to its settings at each attempt."""
        return True

    @classmethod
    @abstractmethod
    def orphan_detail(cls, order: DeliveryOrder) -> str | None:
        """Why a delivery recorded for this type is not sent once no configured destination takes it (removed from
        the configuration, or now of another type): what its row lacks. None for one recorded for another type."""

    def warning(self) -> str | None:
        """What to warn of about these settings at start-up; None: nothing."""
        return None


def register(*types: type[Destination]) -> None:
    """Makes each type known, by the name in its `type`, to the configuration and to `Destination(...)`."""
    for kind in types:
        _TYPES[kind.type_name()] = kind


def _type_named(settings: dict[str, Any]) -> type[Destination]:
    """The type a table names; an unknown one is reported on its `type` key, as pydantic reports a bad literal."""
    named = settings.get("type", DEFAULT_TYPE)
    TypeAdapter(dict[Literal["type"], Literal[tuple(_TYPES)]]).validate_python({"type": named})
    return _TYPES[named]


def orphaned(order: DeliveryOrder) -> SendOutcome:
    """A delivery no configured destination takes fails for good, in the words of the type it was recorded for:
    sent as recorded, it could go without the TLS or the credentials its destination had."""
    return SendOutcome(False, False, next(why for kind in _TYPES.values() if (why := kind.orphan_detail(order)) is not None))
