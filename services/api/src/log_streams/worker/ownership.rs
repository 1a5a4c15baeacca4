//! Which partitions of the stored-events topic (and so which organizations' streams) this
//! replica delivers: a Kafka consumer group (`streams.group_id`, cooperative-sticky) decides,
//! no protocol of our own. The member never reads through the group: it pauses every partition
//! it is given (each stream reads at its own position with a reader of its own) and only polls
//! to keep its membership and to hear of rebalances. A revocation waits (up to a limit) until
//! the manager has stopped the partitions' streams and written their positions, so the next
//! owner starts where this one stopped: no event is sent twice in a normal rebalance.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use audit_runtime::kafka::LoggingContext;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::TopicPartitionList;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// What the group told this member.
#[derive(Debug)]
pub enum Ownership {
    Assigned(Vec<i32>),
    /// Stop these partitions' streams, write their positions, then answer on the channel.
    Revoked(Vec<i32>, std::sync::mpsc::Sender<()>),
}

pub struct OwnershipContext {
    logging: LoggingContext,
    topic: String,
    events: mpsc::UnboundedSender<Ownership>,
    revoke_wait: Duration,
}

impl ClientContext for OwnershipContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.logging.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.logging.error(error, reason);
    }
}

fn partitions(list: &TopicPartitionList, topic: &str) -> Vec<i32> {
    list.elements_for_topic(topic)
        .iter()
        .map(|e| e.partition())
        .collect()
}

impl ConsumerContext for OwnershipContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked = partitions(list, &self.topic);
            if revoked.is_empty() {
                return;
            }
            info!(partitions = ?revoked, "stored-events partitions revoked: stopping their streams");
            let (done, wait) = std::sync::mpsc::channel();
            if self.events.send(Ownership::Revoked(revoked, done)).is_ok()
                && wait.recv_timeout(self.revoke_wait).is_err()
            {
                warn!("streams of revoked partitions did not stop in time; the next owner may send their last batch again");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                // Never fetched through the group: each stream reads on its own.
                if let Err(err) = consumer.pause(list) {
                    warn!(error = %err, "cannot pause the group's partitions");
                }
                let assigned = partitions(list, &self.topic);
                info!(partitions = ?assigned, "stored-events partitions assigned");
                let _ = self.events.send(Ownership::Assigned(assigned));
            }
            Rebalance::Error(err) => warn!(error = %err, "stream group rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// The membership: a thread polling the group member until `stop`, then leaving the group
/// (which revokes its partitions through the same path).
pub struct Membership {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Membership {
    pub fn join(
        config: rdkafka::ClientConfig,
        topic: &str,
        revoke_wait: Duration,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Ownership>), KafkaError> {
        let (events, receiver) = mpsc::unbounded_channel();
        let context = OwnershipContext {
            logging: LoggingContext::default(),
            topic: topic.to_owned(),
            events,
            revoke_wait,
        };
        let consumer: BaseConsumer<OwnershipContext> = config.create_with_context(context)?;
        consumer.subscribe(&[topic])?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("stream-group".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    // Paused partitions deliver nothing; polling serves the rebalance callbacks.
                    if let Some(Err(err)) = consumer.poll(Duration::from_millis(200)) {
                        warn!(error = %err, "stream group consumer error");
                    }
                }
                consumer.unsubscribe();
                // Serve the revocation the unsubscribe causes.
                for _ in 0..10 {
                    let _ = consumer.poll(Duration::from_millis(100));
                }
                drop(consumer);
            })
            .expect("a thread");
        Ok((
            Self {
                stop,
                thread: Some(thread),
            },
            receiver,
        ))
    }

    /// Leaves the group (revoking this member's partitions) and waits for the thread. Blocking.
    pub fn leave(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
