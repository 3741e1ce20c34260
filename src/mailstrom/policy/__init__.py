"""Delivery policy (pure): what a reply means, why it failed, and when to try again.

>>> from mailstrom.policy import Stage, classify, next_attempt, RetryPolicy
>>> from mailstrom.policy import classify_reply, advice_for
"""

from mailstrom.policy.backoff import backoff_delay, next_attempt
from mailstrom.policy.classify import Stage, classify, classify_exception, is_positive
from mailstrom.policy.reasons import Advice, advice, advice_for, classify_local, classify_reply
from mailstrom.policy.retry import RetryPolicy

__all__ = [
    "Advice",
    "RetryPolicy",
    "Stage",
    "advice",
    "advice_for",
    "backoff_delay",
    "classify",
    "classify_exception",
    "classify_local",
    "classify_reply",
    "is_positive",
    "next_attempt",
]
