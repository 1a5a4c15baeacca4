//! Telemetry, set up once: `tracing` logs (JSON or human-readable) filtered by `RUST_LOG`-style
//! directives, and OpenTelemetry trace export over OTLP/HTTP when configured.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use serde::Deserialize;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::tls::{TlsError, TlsSettings};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line, for log shippers.
    #[default]
    Json,
    /// Human-readable, for a terminal.
    Pretty,
}

/// The `telemetry` section of each service's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `tracing` filter directives, e.g. `info` or `audit_ingest=debug,rdkafka=warn`.
    pub log_filter: String,
    pub log_format: LogFormat,
    /// OTLP/HTTP traces endpoint, e.g. `http://127.0.0.1:4318/v1/traces`; none disables export.
    pub otlp_endpoint: Option<String>,
    /// With an `https://` endpoint: the CA to trust instead of the system's roots, and an
    /// optional client certificate.
    pub otlp_tls: TlsSettings,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_filter: "info".to_owned(),
            log_format: LogFormat::Json,
            otlp_endpoint: None,
            otlp_tls: TlsSettings::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid telemetry.log_filter {filter:?}: {source}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot build the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot build the OTLP HTTP client: {0}")]
    HttpClient(String),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Flushes pending spans when dropped; keep it alive for the life of the process.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(err) = provider.shutdown() {
                eprintln!("trace export shutdown failed: {err}");
            }
        }
    }
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(
    service_name: &'static str,
    config: &TelemetryConfig,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter =
        EnvFilter::try_new(&config.log_filter).map_err(|source| TelemetryError::Filter {
            filter: config.log_filter.clone(),
            source,
        })?;
    let fmt_layer = match config.log_format {
        // Logs on stderr: stdout stays for what a command prints (a new API key, a replay summary).
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .compact()
            .boxed(),
    };

    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let (otel_layer, provider) = match &config.otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(otlp_client(endpoint, &config.otlp_tls)?)
                .with_endpoint(endpoint)
                .build()
                .map_err(|source| TelemetryError::Exporter {
                    endpoint: endpoint.clone(),
                    source,
                })?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(Resource::builder().with_service_name(service_name).build())
                .build();
            let tracer = provider.tracer(service_name);
            opentelemetry::global::set_tracer_provider(provider.clone());
            (
                Some(tracing_opentelemetry::layer().with_tracer(tracer)),
                Some(provider),
            )
        }
        None => (None, None),
    };

    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { provider })
}

/// How long one export request may take (the exporter's own default).
const OTLP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The exporter's HTTP client, with the configured TLS. reqwest's blocking client runs a runtime
/// of its own, which cannot be created inside the caller's: it is built on a thread of its own.
fn otlp_client(
    endpoint: &str,
    tls: &TlsSettings,
) -> Result<reqwest::blocking::Client, TelemetryError> {
    let tls = if endpoint.starts_with("https://") {
        Some(tls.client_config("telemetry.otlp_tls")?)
    } else {
        None
    };
    std::thread::spawn(move || {
        let builder = reqwest::blocking::Client::builder().timeout(OTLP_TIMEOUT);
        match tls {
            Some(tls) => builder.use_preconfigured_tls((*tls).clone()),
            None => builder,
        }
        .build()
        .map_err(|err| TelemetryError::HttpClient(err.to_string()))
    })
    .join()
    .map_err(|_| TelemetryError::HttpClient("the builder thread panicked".to_owned()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_https_exporter_client_takes_the_tls_configuration() {
        // reqwest accepts a preconfigured rustls configuration only of its own rustls version:
        // a mismatch would surface here, not at the first export.
        otlp_client(
            "https://collector.example:4318/v1/traces",
            &TlsSettings::default(),
        )
        .expect("an HTTPS client with the system's roots");
        let missing = TlsSettings {
            ca_file: Some("/nonexistent/otel-ca.pem".into()),
            ..TlsSettings::default()
        };
        let err = otlp_client("https://collector.example:4318/v1/traces", &missing)
            .unwrap_err()
            .to_string();
        assert!(err.contains("telemetry.otlp_tls.ca_file"), "{err}");
    }

    #[test]
    fn a_bad_filter_is_reported_with_its_text() {
        let config = TelemetryConfig {
            log_filter: "audit=notalevel".to_owned(),
            ..TelemetryConfig::default()
        };
        let err = init("test", &config).err().expect("must fail");
        assert!(err.to_string().contains("audit=notalevel"), "{err}");
    }
}
