//! Builds the service from its configuration and runs it: migrations, Kafka clients, the ops
//! listener and the consume loop, stopping cleanly on SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use audit_store::migrations;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::IngestConfig;
use crate::dead_letter::DeadLetterProducer;
use crate::directory::Directory;
use crate::duplicates::{self, DuplicateWatch};
use crate::fence::Fencing;
use crate::flush::Flusher;
use crate::http::{self, OpsState};
use crate::kafka::{self, IngestContext};
use crate::liveness::{self, LivenessState};
use crate::metrics::IngestMetrics;
use crate::pipeline::Pipeline;
use crate::retry::Retry;
use crate::sink::ClickHouseSink;
use crate::stored_events::{StoredEventPublisher, StoredEventsError};
use audit_store::retention::ErasedSubjects;

/// Why the service could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("clickhouse schema: {0}")]
    Schema(#[from] audit_store::StoreError),
    #[error("kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    KafkaSettings(#[from] audit_runtime::kafka::ProbeError),
    #[error(transparent)]
    StoredEvents(#[from] StoredEventsError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
}

/// Applies pending migrations, or checks there are none when `migrate_on_start` is off.
pub async fn prepare_schema(config: &IngestConfig) -> Result<(), AppError> {
    Ok(migrations::prepare(&config.clickhouse, config.migrate_on_start).await?)
}

/// Everything a flush writes to: ClickHouse, the directory projection, the dead-letter topic.
pub async fn build_flusher(
    config: &IngestConfig,
    metrics: &IngestMetrics,
) -> Result<Flusher, AppError> {
    let client = config.clickhouse.client();
    let uncollapsed = audit_store::has_setting(&client, "optimize_on_insert").await?;
    let retry = Retry::new(config.retry.clone(), metrics.clone());
    let sink = ClickHouseSink::new(client, retry.clone(), metrics.clone())
        .uncollapsed_inserts(uncollapsed);
    let dead_letters = DeadLetterProducer::new(
        kafka::producer(&config.kafka)?,
        config.dead_letter.topic.clone(),
        metrics.clone(),
        retry.clone(),
    );
    let stored_events =
        StoredEventPublisher::connect(&config.kafka, &config.stored_events, metrics.clone(), retry)
            .await?;
    let directory = config.directory.enrich.then(|| {
        Directory::new(
            sink.clone(),
            config.directory.cache_entries,
            Duration::from_millis(config.directory.cache_ttl_ms),
            metrics.clone(),
        )
    });
    let erasures = ErasedSubjects::new(config.retention.pseudonym_key.as_ref())
        .with_later_events(config.retention.pseudonymize_later_events);
    // Known before the first flush: a re-delivered event of an erased person must not be
    // stored as sent.
    erasures.refresh(sink.client()).await.map_err(|source| {
        AppError::Schema(audit_store::StoreError::ClickHouse {
            doing: "reading the erasures".to_owned(),
            source,
        })
    })?;
    warn_unkeyed(&erasures);
    Ok(Flusher {
        erasures,
        fencing: Fencing::new(sink.clone(), &config.clickhouse),
        duplicates: Arc::new(DuplicateWatch::default()),
        sink,
        directory,
        dead_letters,
        metrics: metrics.clone(),
        stored_events,
    })
}

/// Says so when persons are erased and this ingest has no key to pseudonymize them.
fn warn_unkeyed(erasures: &ErasedSubjects) {
    if erasures.unkeyed() {
        tracing::warn!(
            "persons are erased but retention.pseudonym_key is not set: their re-delivered \
             events are stored as sent"
        );
    }
}

pub struct Application {
    pipeline: Pipeline,
    ops: OpsState,
    config: IngestConfig,
    duplicates: Arc<DuplicateWatch>,
}

impl Application {
    /// Applies (or checks) migrations and creates every client; nothing is consumed yet.
    pub async fn build(config: IngestConfig) -> Result<Self, AppError> {
        prepare_schema(&config).await?;
        let metrics = IngestMetrics::new();
        let client = config.clickhouse.client();
        let consumer = Arc::new(kafka::consumer(
            &config.kafka,
            &config.kafka.group_id,
            kafka::Membership::Group(&config.kafka),
            IngestContext::new(metrics.clone()),
        )?);
        kafka::probe(&config.kafka).await?;
        let flusher = Arc::new(build_flusher(&config, &metrics).await?);
        let duplicates = Arc::clone(&flusher.duplicates);
        let liveness = Arc::new(LivenessState::default());
        let pipeline = Pipeline {
            consumer: Arc::clone(&consumer),
            flusher,
            metrics: metrics.clone(),
            batch: config.batch.clone(),
            dead_letter: config.dead_letter.clone(),
            topics: config.kafka.topics.clone(),
            shutdown_timeout: Duration::from_millis(config.shutdown_timeout_ms),
            final_commit: Default::default(),
            liveness: Arc::clone(&liveness),
        };
        let ops = OpsState {
            metrics,
            consumer,
            clickhouse: client,
            liveness,
            shutdown: CancellationToken::new(),
        };
        Ok(Self {
            pipeline,
            ops,
            config,
            duplicates,
        })
    }

    /// Cancelling this token stops the service gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.ops.shutdown.clone()
    }

    /// Runs until the token is cancelled or a fatal error occurs.
    pub async fn run(self) -> Result<(), AppError> {
        let shutdown = self.ops.shutdown.clone();
        let address = self.config.http_listen;
        let watchdog = tokio::spawn(liveness::watch(
            Arc::clone(&self.ops.consumer),
            self.ops.clickhouse.clone(),
            Arc::clone(&self.ops.liveness),
            self.ops.metrics.clone(),
            self.config.liveness.clone(),
            shutdown.clone(),
        ));
        let duplicates = tokio::spawn(duplicates::watch(
            self.duplicates,
            self.config.clickhouse.clone(),
            self.ops.metrics.clone(),
            shutdown.clone(),
        ));
        let erasures = tokio::spawn(self.pipeline.flusher.erasures.clone().maintain(
            self.ops.clickhouse.clone(),
            Duration::from_millis(self.config.retention.refresh_interval_ms),
            shutdown.clone(),
        ));
        let (bound, server) = http::serve(address, self.ops)
            .await
            .map_err(|source| AppError::Listen { address, source })?;
        info!(%bound, "ops listener up (/healthz, /readyz, /metrics)");
        let server = tokio::spawn(server);
        let result = self.pipeline.run(shutdown.clone()).await;
        shutdown.cancel();
        let _ = server.await;
        let _ = watchdog.await;
        let _ = duplicates.await;
        let _ = erasures.await;
        result.map_err(AppError::from)
    }
}
