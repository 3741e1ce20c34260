"""mailstrom: background email delivery straight to each recipient's MX servers.

>>> from mailstrom import Mailstrom, Config, Email
>>> with Mailstrom(Config(helo_name="mail.example.com"), store="mail.db") as ms:
...     mid = ms.send_email(Email(from_="app@example.com", to=["bob@example.org"], text="Hi"))
...     print(ms.query_status(mid).state)  # doctest: +SKIP

mailstrom logs on the ``mailstrom`` logger and its children (``mailstrom.attempts``: one
record per delivery attempt) and, as a library, prints nothing unless the application
configures logging.
"""

import logging as _logging
from typing import TYPE_CHECKING

from mailstrom._lazy import lazy_exports
from mailstrom._version import __version__ as __version__

if TYPE_CHECKING:
    from mailstrom.client import AsyncMailstrom, Mailstrom
    from mailstrom.config import (
        DEFAULT_LANES,
        Config,
        DNSConfig,
        HookConfig,
        Lane,
        MTASTSConfig,
        RelayConfig,
        RelayTLS,
        Timeouts,
        TLSPolicy,
    )
    from mailstrom.dkim import DKIMAlgorithm, DKIMConfig, DKIMKey, DKIMSignature
    from mailstrom.errors import (
        AmbiguousMessageId,
        ConfigError,
        DeliveryError,
        ForbiddenCharacter,
        HeaderInjection,
        HeaderTooLong,
        InvalidAddress,
        InvalidArgument,
        InvalidAttachment,
        InvalidHeaderValue,
        InvalidMessage,
        InvalidMessageType,
        InvalidMetadata,
        InvalidQueueAttribute,
        InvalidShapingRule,
        InvalidStoreURL,
        InvalidSuppression,
        InvalidTag,
        LineTooLong,
        MailstromError,
        MessageTooLarge,
        MissingFrom,
        MultipleFromWithoutSender,
        NestingTooDeep,
        NoDKIMKey,
        NoRecipients,
        PermanentFailure,
        RequireTLSFailure,
        StoreAccessDenied,
        StoreCorrupt,
        StoreError,
        StoreLocked,
        StoreRefusedData,
        StoreUnreachable,
        TemporaryFailure,
        TooManyHeaderFields,
        TooManyParts,
        TooManyRecipients,
        UnencodableHeader,
        UnknownContentID,
        UnknownMessage,
        UnreadableRow,
        WorkerError,
    )
    from mailstrom.message import Attachment, Email, PreparedMessage, downgrade_to_7bit
    from mailstrom.message.attributes import QueueAttributes
    from mailstrom.message.dsn import DSN, Notify, Return
    from mailstrom.message.preparation import prepare
    from mailstrom.policy.retry import RetryPolicy
    from mailstrom.policy.shaping import DestinationRule, ShapingConfig
    from mailstrom.status import (
        Attempt,
        AttemptOutcome,
        DestinationThrottle,
        DKIMStatus,
        Histogram,
        MessageStatus,
        MetricsSnapshot,
        QueueStats,
        ReasonClass,
        RecipientState,
        RecipientStatus,
        SMTPReply,
        WorkerMetrics,
        WorkerStatus,
    )
    from mailstrom.stores.base import QueueFilter
    from mailstrom.stores.operator import ShapeRow, Suspension
    from mailstrom.suppression import Suppression, SuppressionSource


__all__ = [
    "DSN",
    "AmbiguousMessageId",
    "AsyncMailstrom",
    "Attachment",
    "Attempt",
    "AttemptOutcome",
    "Config",
    "ConfigError",
    "DKIMAlgorithm",
    "DKIMConfig",
    "DKIMKey",
    "DKIMSignature",
    "DKIMStatus",
    "DNSConfig",
    "DeliveryError",
    "DestinationRule",
    "DestinationThrottle",
    "Email",
    "ForbiddenCharacter",
    "HeaderInjection",
    "HeaderTooLong",
    "Histogram",
    "HookConfig",
    "InvalidAddress",
    "InvalidArgument",
    "InvalidAttachment",
    "InvalidHeaderValue",
    "InvalidMessage",
    "InvalidMessageType",
    "InvalidShapingRule",
    "InvalidStoreURL",
    "InvalidSuppression",
    "LineTooLong",
    "MTASTSConfig",
    "Mailstrom",
    "MailstromError",
    "MessageStatus",
    "MessageTooLarge",
    "MetricsSnapshot",
    "MissingFrom",
    "MultipleFromWithoutSender",
    "NestingTooDeep",
    "NoDKIMKey",
    "NoRecipients",
    "Notify",
    "PermanentFailure",
    "PreparedMessage",
    "QueueStats",
    "ReasonClass",
    "RecipientState",
    "RecipientStatus",
    "RelayConfig",
    "RelayTLS",
    "RequireTLSFailure",
    "RetryPolicy",
    "Return",
    "SMTPReply",
    "ShapeRow",
    "ShapingConfig",
    "StoreAccessDenied",
    "StoreCorrupt",
    "StoreError",
    "StoreLocked",
    "StoreRefusedData",
    "StoreUnreachable",
    "Suppression",
    "SuppressionSource",
    "Suspension",
    "TLSPolicy",
    "TemporaryFailure",
    "Timeouts",
    "TooManyHeaderFields",
    "TooManyParts",
    "TooManyRecipients",
    "UnencodableHeader",
    "UnknownContentID",
    "UnknownMessage",
    "UnreadableRow",
    "WorkerError",
    "WorkerMetrics",
    "WorkerStatus",
    "downgrade_to_7bit",
    "prepare",
]

# Queue attributes: tags, metadata, priority lanes, scheduling, idempotency.

__all__ += [
    "DEFAULT_LANES",
    "InvalidMetadata",
    "InvalidQueueAttribute",
    "InvalidTag",
    "Lane",
    "QueueAttributes",
    "QueueFilter",
]

# A library must not print through logging's last-resort handler when the application has
# not configured logging (it would write a bare line per deferred attempt on stderr).
_logging.getLogger("mailstrom").addHandler(_logging.NullHandler())

# Loaded on first use (PEP 562): importing the package costs only what is touched.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "mailstrom.client": (
            "AsyncMailstrom",
            "Mailstrom",
        ),
        "mailstrom.config": (
            "Config",
            "DNSConfig",
            "HookConfig",
            "MTASTSConfig",
            "RelayConfig",
            "RelayTLS",
            "Timeouts",
            "TLSPolicy",
            "DEFAULT_LANES",
            "Lane",
        ),
        "mailstrom.dkim": (
            "DKIMAlgorithm",
            "DKIMConfig",
            "DKIMKey",
            "DKIMSignature",
        ),
        "mailstrom.errors": (
            "AmbiguousMessageId",
            "ConfigError",
            "DeliveryError",
            "ForbiddenCharacter",
            "HeaderInjection",
            "HeaderTooLong",
            "InvalidAddress",
            "InvalidArgument",
            "InvalidAttachment",
            "InvalidHeaderValue",
            "InvalidMessage",
            "InvalidMessageType",
            "InvalidShapingRule",
            "InvalidStoreURL",
            "InvalidSuppression",
            "LineTooLong",
            "MailstromError",
            "MessageTooLarge",
            "MissingFrom",
            "MultipleFromWithoutSender",
            "NestingTooDeep",
            "NoDKIMKey",
            "NoRecipients",
            "PermanentFailure",
            "RequireTLSFailure",
            "StoreAccessDenied",
            "StoreCorrupt",
            "StoreError",
            "StoreLocked",
            "StoreRefusedData",
            "StoreUnreachable",
            "TemporaryFailure",
            "TooManyHeaderFields",
            "TooManyParts",
            "TooManyRecipients",
            "UnencodableHeader",
            "UnknownContentID",
            "UnknownMessage",
            "UnreadableRow",
            "WorkerError",
            "InvalidMetadata",
            "InvalidQueueAttribute",
            "InvalidTag",
        ),
        "mailstrom.message": (
            "Attachment",
            "Email",
            "PreparedMessage",
            "downgrade_to_7bit",
        ),
        "mailstrom.message.preparation": ("prepare",),
        "mailstrom.message.dsn": (
            "DSN",
            "Notify",
            "Return",
        ),
        "mailstrom.policy.retry": ("RetryPolicy",),
        "mailstrom.policy.shaping": (
            "DestinationRule",
            "ShapingConfig",
        ),
        "mailstrom.status": (
            "Attempt",
            "AttemptOutcome",
            "DestinationThrottle",
            "DKIMStatus",
            "Histogram",
            "MessageStatus",
            "MetricsSnapshot",
            "QueueStats",
            "ReasonClass",
            "RecipientState",
            "RecipientStatus",
            "SMTPReply",
            "WorkerMetrics",
            "WorkerStatus",
        ),
        "mailstrom.stores.operator": (
            "ShapeRow",
            "Suspension",
        ),
        "mailstrom.suppression": (
            "Suppression",
            "SuppressionSource",
        ),
        "mailstrom.message.attributes": ("QueueAttributes",),
        "mailstrom.stores.base": ("QueueFilter",),
    },
)
