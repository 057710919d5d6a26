"""Sending an operator's review from the dashboard: validated, published to the `reviews`
topic, acknowledged, and never sent twice from one page.

The dashboard never writes DuckDB (the sink is the only writer, docs/architecture.md), so a
review leaves as a :class:`linewatch.messages.Review` on Kafka and the sink appends it. Why the
desk below: a Streamlit button can be pressed twice, and a send can fail or time out while the
broker did take it. Each distinct review gets one ``review_id`` for the life of the page; a
repeat of an acknowledged review is answered "already recorded" without sending, and a retry
after a failure resends the *same* id, which the sink stores once. Nothing is lost either: a
review the broker did not acknowledge stays on the page until it is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from linewatch.messages import Review
from linewatch.settings import Settings


@dataclass
class Outcome:
    """What the page says after a submit: ``level`` is success, info (a repeat) or error."""

    level: str
    message: str
    review: Review | None = None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def publish(settings: Settings, review: Review) -> None:
    """Send one review and wait for the broker's acknowledgement (idempotent, acks=all
    producer); raises KafkaIOError (BrokerUnavailable, DeliveryError) with a one-line reason."""
    from linewatch.kafka.io import make_producer, send_checked

    timeout_s = settings.dashboard.review_timeout_s
    wait_ms = int(timeout_s * 1000)
    producer = make_producer(settings, client_id=f"{settings.kafka.client_id}-dashboard", linger_ms=0,
                             bootstrap_timeout_ms=wait_ms, max_block_ms=wait_ms,
                             request_timeout_ms=wait_ms, delivery_timeout_ms=wait_ms + 1000)
    try:
        send_checked(producer, settings.topics.reviews, review.to_bytes(), key=review.frame_id,
                     timeout=timeout_s + 2, what=f"review {review.review_id}")
    finally:
        producer.close(timeout=2)


@dataclass
class ReviewDesk:
    """One page's reviews: acknowledged ones by content, and the one still to send."""

    sent: dict[tuple, str] = field(default_factory=dict)  # content -> review_id
    unsent: Review | None = None

    def submit(self, *, frame_id: str, product: str | None, verdict: str, category: str | None, reviewer: str,
               note: str | None, send: Callable[[Review], None]) -> Outcome:
        """Validate, refuse what cannot be stored, and send at most once per distinct review.
        ``product`` is None when the database has no such frame."""
        if product is None:
            return Outcome("error", f"No frame {frame_id!r} in the database: nothing was sent.")
        category = category if verdict == "confirm" else None
        key = (frame_id, product, verdict, category, (reviewer or "").strip(), (note or "").strip() or None)
        if key in self.sent:
            return Outcome("info", f"Already recorded (review {self.sent[key]}); not sent again.")
        if self.unsent is not None and self._key(self.unsent) == key:
            review = self.unsent  # a retry: the same review_id, stored once even if the first did arrive
        else:
            try:
                review = Review(frame_id=frame_id, product=product, verdict=verdict, category=category,
                                reviewer=reviewer or "", note=note)
            except ValidationError as exc:
                return Outcome("error", f"Review not sent: {_first_error(exc)}.")
        try:
            send(review)
        except Exception as exc:  # KafkaIOError and anything else: say it, keep the review
            self.unsent = review
            reason = " ".join(str(exc).split())
            return Outcome("error", f"Review not sent — the broker did not acknowledge it ({reason}). It is kept "
                                    "on this page: submit again once the broker is back; it will be stored once.",
                           review)
        self.unsent = None
        self.sent[key] = review.review_id
        return Outcome("success", f"Review recorded ({verdict.replace('_', ' ')}"
                                  f"{', ' + category if category else ''}, by {review.reviewer}); "
                                  "it appears here once the sink has stored it.", review)

    @staticmethod
    def _key(r: Review) -> tuple:
        return (r.frame_id, r.product, r.verdict, r.category, r.reviewer, r.note)
