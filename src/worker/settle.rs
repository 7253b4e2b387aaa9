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
