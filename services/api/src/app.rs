//! Builds the service from its configuration and runs it: migrations, the key snapshot, the
//! freshness watermark, the HTTP listener, and a graceful stop that lets in-flight streams
//! finish up to `shutdown_timeout_ms`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use audit_store::migrations;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::auth::KeyRateLimiter;
use crate::config::ApiConfig;
use crate::keys::KeyStore;
use crate::log_streams::manage::StreamAdmin;
use crate::metrics::ApiMetrics;
use crate::read_events::ReadEventPublisher;
use crate::retention::RetentionSnapshot;
use crate::routes;
use crate::store::AuditLogStore;

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: AuditLogStore,
    pub keys: KeyStore,
    pub rate_limiter: KeyRateLimiter,
    pub read_events: ReadEventPublisher,
    pub streams: Arc<StreamAdmin>,
    /// Every organization's retention and holds: which events each read may show.
    pub retention: RetentionSnapshot,
    pub metrics: ApiMetrics,
    /// Ingest time of the newest stored event, epoch ms (0 = unknown).
    pub newest_ingested_at: Arc<AtomicU64>,
    /// One permit per running export (`query.max_concurrent_exports`), held by its body.
    pub exports: Arc<Semaphore>,
    pub shutdown: CancellationToken,
}

impl AppState {
    pub fn new(config: &ApiConfig) -> Result<Self, AppError> {
        let metrics = ApiMetrics::new();
        let store = AuditLogStore::new(&config.clickhouse, &config.query, metrics.clone());
        let read_events = ReadEventPublisher::new(&config.read_events, metrics.clone())?;
        let streams =
            StreamAdmin::new(store.client().clone(), &config.streams, read_events.clone())
                .map_err(|err| AppError::Streams(err.to_string()))?;
        Ok(Self {
            store,
            keys: KeyStore::new(),
            rate_limiter: KeyRateLimiter::new(&config.rate_limit),
            read_events,
            streams: Arc::new(streams),
            retention: RetentionSnapshot::new(config.retention.default_days),
            metrics,
            newest_ingested_at: Arc::new(AtomicU64::new(0)),
            exports: Arc::new(Semaphore::new(match config.query.max_concurrent_exports {
                0 => Semaphore::MAX_PERMITS,
                n => n,
            })),
            shutdown: CancellationToken::new(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("clickhouse schema: {0}")]
    Schema(#[from] audit_store::StoreError),
    #[error("kafka producer for read events: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("kafka producer for read events: {0}")]
    KafkaSettings(#[from] audit_runtime::kafka::ProbeError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("http server: {0}")]
    Serve(#[source] std::io::Error),
    #[error("log streams: {0}")]
    Streams(String),
}

pub struct Application {
    state: AppState,
    config: ApiConfig,
    listener: tokio::net::TcpListener,
}

impl Application {
    /// Applies (or checks) migrations, binds the listener and loads the keys once.
    pub async fn build(config: ApiConfig) -> Result<Self, AppError> {
        migrations::prepare(&config.clickhouse, config.migrate_on_start).await?;
        let state = AppState::new(&config)?;
        if config.read_events.enabled {
            let settings = config.read_events.clone();
            tokio::task::spawn_blocking(move || {
                audit_runtime::kafka::probe(&settings.connection(), Duration::from_secs(5))
            })
            .await
            .unwrap_or(Ok(()))?;
        }
        if let Err(err) = state.keys.refresh(state.store.client()).await {
            warn!(error = %err, "could not load api keys yet; /readyz stays 503 until it can");
        }
        if let Err(err) = state.retention.refresh(state.store.client()).await {
            warn!(error = %err, "could not load retention yet; reads answer 503 until it can");
        }
        let address = config.http_listen;
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| AppError::Listen { address, source })?;
        Ok(Self {
            state,
            config,
            listener,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    /// Serves until the shutdown token is cancelled, then lets in-flight requests finish for up
    /// to `shutdown_timeout_ms`.
    pub async fn run(self) -> Result<(), AppError> {
        let Self {
            state,
            config,
            listener,
        } = self;
        let shutdown = state.shutdown.clone();
        let background = CancellationToken::new();
        let keys = tokio::spawn(state.keys.clone().maintain(
            state.store.client().clone(),
            config.keys.refresh_interval(),
            Duration::from_millis(config.keys.usage_flush_interval_ms),
            background.clone(),
        ));
        tokio::spawn(watch_freshness(state.clone(), background.clone()));
        tokio::spawn(state.retention.clone().maintain(
            state.store.client().clone(),
            Duration::from_millis(config.retention.refresh_interval_ms),
            background.clone(),
        ));
        if let Ok(bound) = listener.local_addr() {
            info!(%bound, "audit-api listening");
        }
        let read_events = state.read_events.clone();
        let app = routes::router(state);
        let graceful = shutdown.clone();
        let server = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { graceful.cancelled().await });
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(config.shutdown_timeout()).await;
        };
        let result = tokio::select! {
            result = server => result.map_err(AppError::Serve),
            () = deadline => {
                warn!("in-flight requests outlived the shutdown timeout; closing them");
                Ok(())
            }
        };
        background.cancel();
        let _ = keys.await;
        read_events.flush(Duration::from_secs(2));
        info!("audit-api stopped");
        result
    }
}

/// Keeps `newest_ingested_at` current: one cheap query per interval, whatever the traffic.
async fn watch_freshness(state: AppState, stop: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {
                if let Ok(Some(newest)) = state.store.newest_ingested_at().await {
                    state.newest_ingested_at.store(newest, Ordering::Relaxed);
                }
            }
        }
    }
}
