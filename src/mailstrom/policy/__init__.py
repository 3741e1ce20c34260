"""Delivery policy (pure): what a reply means, and when to try again.

>>> from mailstrom.policy import Stage, classify, next_attempt, RetryPolicy
"""

from mailstrom.policy.backoff import backoff_delay, next_attempt
from mailstrom.policy.classify import Stage, classify, classify_exception, is_positive
from mailstrom.policy.retry import RetryPolicy

__all__ = [
    "RetryPolicy",
    "Stage",
    "backoff_delay",
    "classify",
    "classify_exception",
    "is_positive",
    "next_attempt",
]
