//! How an outcome is told to RabbitMQ: which outcomes are acked, rejected or requeued, and
//! the frame that carries a run of them; and the rule that keeps every received job's final
//! state in the ledger: a job is never handed back to the queue past its deadline or its
//! expiration (RabbitMQ would drop it with no final state recorded anywhere), it ends
//! `expired` here instead ([`in_time`]).

use crate::ack_window::Disposition;
use crate::config::ShedAction;
use crate::handler::estimate::TypeSlot;
use crate::job;
use crate::ledger::Outcome;
use amiquip::{AmqpProperties, Consumer, Delivery};

/// A delivery the consumer thread holds until it is settled.
pub(super) struct Held {
    pub(super) delivery: Delivery,
    /// Its job type's slot, for counting its outcome.
    pub(super) slot: TypeSlot,
    /// Until when it may be handed back to the queue ([`job::keep_until_ms`]); `None`: any
    /// time.
    pub(super) keep_until_ms: Option<u64>,
}

impl Held {
    /// A delivery to hold, with its hand-back limit.
    pub(super) fn new(delivery: Delivery, slot: TypeSlot, keep_until_ms: Option<u64>) -> Held {
        Held {
            delivery,
            slot,
            keep_until_ms,
        }
    }
}

/// What `outcome` becomes when the worker lets go of a job at `now_ms`: a hand-back
/// (`retried`, `requeued`) of a job whose deadline or expiration has passed is `expired`,
/// settled as the shed action says; any other outcome stays.
pub(super) fn in_time(outcome: Outcome, keep_until_ms: Option<u64>, now_ms: u64) -> Outcome {
    match outcome {
        Outcome::Retried | Outcome::Requeued if past(keep_until_ms, now_ms) => Outcome::Expired,
        other => other,
    }
}

/// Whether a job that may be handed back until `keep_until_ms` may no longer be at `now_ms`.
pub(super) fn past(keep_until_ms: Option<u64>, now_ms: u64) -> bool {
    keep_until_ms.is_some_and(|until| now_ms >= until)
}

/// A quorum queue's count of a job's earlier deliveries.
const HEADER_DELIVERY_COUNT: &str = "x-delivery-count";

/// How the broker is told about an outcome.
pub(super) fn disposition(outcome: Outcome, shed_action: ShedAction) -> Disposition {
    match outcome {
        Outcome::Done | Outcome::Late => Disposition::Ack,
        Outcome::Failed | Outcome::Malformed | Outcome::TimedOut => Disposition::Reject,
        Outcome::Skipped | Outcome::Expired | Outcome::Doomed => match shed_action {
            ShedAction::Ack => Disposition::Ack,
            ShedAction::Reject => Disposition::Reject,
        },
        Outcome::Requeued | Outcome::Retried => Disposition::Requeue,
    }
}

/// A quorum queue's `x-delivery-count` (earlier deliveries of this job); 0 without one.
pub(super) fn delivery_count(properties: &AmqpProperties) -> u32 {
    let count = job::header_ms(properties.headers().as_ref(), HEADER_DELIVERY_COUNT);
    u32::try_from(count.ok().flatten().unwrap_or(0)).unwrap_or(u32::MAX)
}

/// What of a running job's properties the consumer thread still reads once the pool has the
/// rest: its `message_id` and, on a quorum queue, its delivery count.
pub(super) fn kept_for_settling(properties: &AmqpProperties) -> AmqpProperties {
    let mut kept = AmqpProperties::default();
    if let Some(id) = properties.message_id() {
        kept = kept.with_message_id(id.clone());
    }
    if let Some(count) = properties
        .headers()
        .as_ref()
        .and_then(|h| h.get(HEADER_DELIVERY_COUNT))
    {
        let mut headers = amiquip::FieldTable::new();
        headers.insert(HEADER_DELIVERY_COUNT.to_owned(), count.clone());
        kept = kept.with_headers(headers);
    }
    kept
}

/// One ack, reject or nack frame; `multiple` settles every delivery up to this one.
pub(super) fn send_frame(
    consumer: &Consumer<'_>,
    delivery: Delivery,
    disposition: Disposition,
    multiple: bool,
) -> amiquip::Result<()> {
    match (disposition, multiple) {
        (Disposition::Ack, false) => consumer.ack(delivery),
        (Disposition::Ack, true) => consumer.ack_multiple(delivery),
        (Disposition::Reject, false) => consumer.reject(delivery, false),
        (Disposition::Reject, true) => consumer.nack_multiple(delivery, false),
        (Disposition::Requeue, false) => consumer.reject(delivery, true),
        (Disposition::Requeue, true) => consumer.nack_multiple(delivery, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settling_keeps_the_id_and_the_delivery_count_only() {
        let mut headers = amiquip::FieldTable::new();
        headers.insert(
            HEADER_DELIVERY_COUNT.to_owned(),
            amiquip::AmqpValue::LongLongInt(3),
        );
        headers.insert("x-work-ms".to_owned(), amiquip::AmqpValue::LongLongInt(9));
        let full = AmqpProperties::default()
            .with_message_id("job-1".into())
            .with_type_("thumbnail".into())
            .with_headers(headers);
        let kept = kept_for_settling(&full);
        assert_eq!(kept.message_id().as_deref(), Some("job-1"));
        assert_eq!(delivery_count(&kept), 3);
        assert_eq!(kept.type_(), &None);
        assert_eq!(kept.headers().as_ref().map(|h| h.len()), Some(1));
        assert_eq!(
            delivery_count(&kept_for_settling(&AmqpProperties::default())),
            0
        );
    }

    #[test]
    fn a_hand_back_past_the_keep_until_is_expired_and_nothing_else_changes() {
        for outcome in [Outcome::Retried, Outcome::Requeued] {
            assert_eq!(in_time(outcome, Some(100), 100), Outcome::Expired);
            assert_eq!(in_time(outcome, Some(100), 99), outcome);
            assert_eq!(in_time(outcome, None, u64::MAX), outcome);
        }
        for outcome in Outcome::ALL.into_iter().filter(|o| o.is_final()) {
            assert_eq!(in_time(outcome, Some(1), 100), outcome);
        }
    }

    #[test]
    fn retry_and_timeout_map_to_their_dispositions() {
        assert_eq!(
            disposition(Outcome::Retried, ShedAction::Ack),
            Disposition::Requeue
        );
        assert_eq!(
            disposition(Outcome::TimedOut, ShedAction::Ack),
            Disposition::Reject
        );
    }
}
