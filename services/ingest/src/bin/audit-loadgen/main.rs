//! Publishes realistic audit events to the three upstream topics, at full speed or at a fixed
//! rate: demo data for `make run`, load for `make bench`.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use generator::{stream_of, EventGenerator, Stream};

mod generator;

#[derive(Debug, Parser)]
#[command(
    name = "audit-loadgen",
    about = "Publish realistic audit events to Kafka"
)]
struct Args {
    #[arg(long, env = "AUDIT_LOADGEN_BROKERS", default_value = "127.0.0.1:19092")]
    brokers: String,
    /// Events to publish.
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// Events per second; 0 publishes as fast as the broker takes them.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Organizations to spread events over (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "org_acme,org_globex,org_initech"
    )]
    orgs: Vec<String>,
    #[arg(long, default_value = audit_event::topics::USERS)]
    users_topic: String,
    #[arg(long, default_value = audit_event::topics::TEAMS)]
    teams_topic: String,
    #[arg(long, default_value = audit_event::topics::AUTH)]
    auth_topic: String,
    /// Spread occurredAt evenly over this many past days (0: the time of publishing).
    #[arg(long, default_value_t = 0)]
    spread_days: u32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Makes event ids unique per run (default: the current time). With --spread-days, a given
    /// run id also fixes the times (the spread ends at today's UTC midnight).
    #[arg(long)]
    run_id: Option<String>,
    /// A librdkafka property, as kcat takes them: `-X security.protocol=SASL_SSL
    /// -X sasl.mechanism=SCRAM-SHA-512 ...` (repeat; set after the defaults, so it overrides
    /// them, e.g. `-X compression.type=zstd`).
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = property)]
    properties: Vec<(String, String)>,
}

fn property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.to_owned()))
        }
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
}

struct Counting(Arc<Deliveries>);

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        if let Err((err, _)) = result {
            if self.0.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!("audit-loadgen: delivery failed: {err}");
            }
        }
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("audit-loadgen: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let deliveries = Arc::new(Deliveries::default());
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &args.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "10")
        .set("batch.num.messages", "10000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "500000");
    for (key, value) in &args.properties {
        config.set(key, value);
    }
    let producer: ThreadedProducer<Counting> = config
        .create_with_context(Counting(Arc::clone(&deliveries)))
        .context("creating the Kafka producer")?;
    let run_id = args
        .run_id
        .clone()
        .unwrap_or_else(|| Utc::now().format("%Y%m%d%H%M%S").to_string());
    let mut generator = EventGenerator::new(args.seed, &args.orgs, &run_id);
    let spread = chrono::Duration::days(i64::from(args.spread_days));
    // With a fixed run id, spread events end at today's UTC midnight: publishing the same run
    // again the same day produces the very same events (same ids and times), which the ingest
    // collapses. A different occurredAt under the same id would be a different row.
    let started_at = match (&args.run_id, args.spread_days) {
        (Some(_), 1..) => Utc::now()
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .map(|midnight| midnight.and_utc())
            .unwrap_or_else(Utc::now),
        _ => Utc::now(),
    };
    let started = Instant::now();

    for sent in 0..args.count {
        if args.rate > 0 {
            // Pace against the clock so that short stalls are caught up, not accumulated.
            let due = started + Duration::from_secs_f64(sent as f64 / args.rate as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let at = if args.spread_days > 0 {
            let step = spread.num_milliseconds() * sent as i64 / args.count.max(1) as i64;
            started_at - spread + chrono::Duration::milliseconds(step)
        } else {
            Utc::now()
        };
        let event = generator.next_event(at);
        let payload = serde_json::to_vec(&event).context("serialising an event")?;
        let key = event["id"].as_str().unwrap_or_default().to_owned();
        let topic = match stream_of(event["type"].as_str().unwrap_or_default()) {
            Stream::Users => &args.users_topic,
            Stream::Teams => &args.teams_topic,
            Stream::Auth => &args.auth_topic,
        };
        let mut record = BaseRecord::to(topic).key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((err, _)) => return Err(err).context("publishing an event"),
            }
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .context("waiting for the broker to acknowledge every event")?;
    let failed = deliveries.failed.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "published {} events in {elapsed:.1} s ({:.0}/s){}",
        args.count - failed,
        (args.count - failed) as f64 / elapsed.max(f64::EPSILON),
        if failed > 0 {
            format!(", {failed} FAILED")
        } else {
            String::new()
        }
    );
    if failed > 0 {
        anyhow::bail!("{failed} events were not acknowledged");
    }
    Ok(())
}
