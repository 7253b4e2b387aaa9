//! How an outcome is told to RabbitMQ: which outcomes are acked, rejected or requeued, and
//! the frame that carries a run of them.

use crate::ack_window::Disposition;
use crate::config::ShedAction;
use crate::job;
use crate::ledger::Outcome;
use amiquip::{AmqpProperties, Consumer, Delivery};

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
