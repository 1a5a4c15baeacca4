//! Sends a batch to a destination over its intake protocol and says what the answer means:
//! delivered, retry later (5xx, 408, 429 with its `Retry-After`, a timeout, a refused or reset
//! connection), or misconfigured (any other 4xx, a redirect: the stream stops in `error`).
//! Destinations resolving to private, loopback or link-local addresses are refused unless the
//! operator allows them (`streams.allow_private_destinations`), and redirects are not followed:
//! a stream is not a way to reach the cluster's own network.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::signing;
use super::spec::{Destination, Secrets};

/// Longest destination answer kept in `lastError`.
const MAX_REASON_CHARS: usize = 200;

/// One event of a batch: its id and time, and its payload in the stream's form.
#[derive(Debug, Clone)]
pub struct DeliveryEvent {
    pub id: String,
    pub occurred_at_ms: i64,
    pub event_type: String,
    /// The event as JSON text.
    pub payload: Box<serde_json::value::RawValue>,
}

#[derive(serde::Serialize)]
struct WebhookBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    timestamp: String,
    data: WebhookData<'a>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct WebhookData<'a> {
    stream_id: &'a str,
    events: Vec<&'a serde_json::value::RawValue>,
}

#[derive(serde::Serialize)]
struct HecEvent<'a> {
    time: f64,
    source: &'a str,
    sourcetype: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a str>,
    event: &'a serde_json::value::RawValue,
}

#[derive(serde::Serialize)]
struct DatadogLog<'a> {
    ddsource: &'a str,
    service: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    ddtags: &'a str,
    hostname: &'static str,
    timestamp: i64,
    evt: DatadogEvt<'a>,
    /// Datadog parses a JSON message into the log's attributes.
    message: &'a str,
}

#[derive(serde::Serialize)]
struct DatadogEvt<'a> {
    id: &'a str,
    name: &'a str,
}

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered {
        status: u16,
    },
    /// Try again later; `retry_after` when the destination said when.
    Retry {
        status: Option<u16>,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The destination refuses the stream's settings or data: stop until they change.
    Misconfigured {
        status: u16,
        reason: String,
    },
}

impl Outcome {
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Delivered { status } | Outcome::Misconfigured { status, .. } => Some(*status),
            Outcome::Retry { status, .. } => *status,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Outcome::Delivered { .. } => "",
            Outcome::Retry { reason, .. } | Outcome::Misconfigured { reason, .. } => reason,
        }
    }
}

/// Per-batch limits of each intake: (events, bytes of the request body).
pub fn limits(destination: &Destination) -> (usize, usize) {
    match destination {
        Destination::Webhook { .. } => (1_000, 4 * 1024 * 1024),
        // HEC: Splunk Cloud's recommended maximum request size is 1 MB.
        Destination::SplunkHec { .. } => (1_000, 1_000_000),
        // Datadog Logs intake v2: at most 1,000 entries and 5 MB uncompressed per request.
        Destination::Datadog { .. } => (1_000, 5_000_000),
    }
}

#[derive(Clone)]
pub struct Sender {
    http: reqwest::Client,
    /// How long a HEC acknowledgement may take before the batch is sent again.
    ack_timeout: Duration,
    allow_private: bool,
}

impl Sender {
    pub fn new(request_timeout: Duration, allow_private: bool) -> Self {
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .connect_timeout(request_timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver { allow_private }))
            .user_agent(concat!("audit-logs-streams/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client with rustls");
        Self {
            http,
            ack_timeout: Duration::from_secs(60),
            allow_private,
        }
    }

    pub fn with_ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Sends `events` (within [`limits`]) as one request. `message_id` is the same for every
    /// attempt of one batch (the webhook's `webhook-id`).
    pub async fn send(
        &self,
        stream_id: &str,
        destination: &Destination,
        secrets: &Secrets,
        message_id: &str,
        events: &[DeliveryEvent],
    ) -> Outcome {
        let url = destination.endpoint();
        if let Some(refused) = self.refused_literal(&url) {
            return refused;
        }
        let (body, headers) = match request(stream_id, destination, secrets, message_id, events) {
            Ok(request) => request,
            Err(reason) => {
                return Outcome::Misconfigured { status: 0, reason };
            }
        };
        let scrub = |text: String| scrub(text, secrets);
        let response = match self
            .http
            .post(&url)
            .headers(headers)
            .body(body)
            .send()
            .await
        {
            Ok(response) => response,
            Err(err) => {
                return Outcome::Retry {
                    status: None,
                    reason: scrub(transport_reason(&err)),
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let text = response.text().await.unwrap_or_default();
        let outcome = classify(status, retry_after, scrub(short(&text)));
        match (destination, &outcome) {
            (
                Destination::SplunkHec {
                    acknowledgements: true,
                    url,
                    ..
                },
                Outcome::Delivered { status },
            ) => {
                self.await_ack(url, secrets, stream_id, &text, *status)
                    .await
            }
            _ => outcome,
        }
    }

    /// An IP-literal URL skips the resolver: its address is checked here.
    fn refused_literal(&self, url: &str) -> Option<Outcome> {
        if self.allow_private {
            return None;
        }
        let parsed = reqwest::Url::parse(url).ok()?;
        let host = parsed.host_str()?;
        let ip: IpAddr = host.trim_matches(['[', ']']).parse().ok()?;
        (!is_public(ip)).then(|| Outcome::Misconfigured {
            status: 0,
            reason: PRIVATE_REFUSED.to_owned(),
        })
    }

    /// HEC with indexer acknowledgement: the batch counts once its ack id reads `true` at
    /// `/services/collector/ack`; not within the ack timeout, it is sent again.
    async fn await_ack(
        &self,
        base: &str,
        secrets: &Secrets,
        stream_id: &str,
        answer: &str,
        status: u16,
    ) -> Outcome {
        let Some(ack_id) = serde_json::from_str::<Value>(answer)
            .ok()
            .and_then(|v| v["ackId"].as_u64())
        else {
            return Outcome::Misconfigured {
                status,
                reason: "HEC answered without an ackId: indexer acknowledgement is off for this \
                         token; set acknowledgements to false"
                    .to_owned(),
            };
        };
        let url = format!("{}/services/collector/ack", base.trim_end_matches('/'));
        let deadline = tokio::time::Instant::now() + self.ack_timeout;
        let mut delay = Duration::from_millis(200);
        loop {
            let Ok(headers) = splunk_headers(secrets, stream_id, true) else {
                return Outcome::Misconfigured {
                    status: 0,
                    reason: "no HEC token".into(),
                };
            };
            let body = json!({ "acks": [ack_id] }).to_string();
            match self
                .http
                .post(&url)
                .headers(headers)
                .body(body)
                .send()
                .await
            {
                Ok(response) if response.status().is_success() => {
                    let acked = response
                        .bytes()
                        .await
                        .ok()
                        .and_then(|body| serde_json::from_slice::<Value>(&body).ok())
                        .and_then(|v| v["acks"][ack_id.to_string()].as_bool())
                        .unwrap_or(false);
                    if acked {
                        return Outcome::Delivered { status };
                    }
                }
                Ok(response) => {
                    let code = response.status();
                    let retry = retry_after(response.headers());
                    let text = response.text().await.unwrap_or_default();
                    let outcome = classify(code, retry, scrub(short(&text), secrets));
                    if !matches!(outcome, Outcome::Retry { .. }) {
                        return outcome;
                    }
                }
                Err(_) => {}
            }
            if tokio::time::Instant::now() + delay > deadline {
                return Outcome::Retry {
                    status: Some(status),
                    reason: format!(
                        "HEC did not acknowledge ack id {ack_id} within {} s",
                        self.ack_timeout.as_secs()
                    ),
                    retry_after: None,
                };
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

const PRIVATE_REFUSED: &str = "the destination resolves only to private, loopback or link-local \
     addresses, which this server does not deliver to (streams.allow_private_destinations)";

/// The body and headers of one request.
fn request(
    stream_id: &str,
    destination: &Destination,
    secrets: &Secrets,
    message_id: &str,
    events: &[DeliveryEvent],
) -> Result<(Vec<u8>, HeaderMap), String> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let body = match destination {
        Destination::Webhook { .. } => {
            let now = chrono::Utc::now();
            let body = serde_json::to_vec(&WebhookBody {
                kind: "audit_log.events",
                timestamp: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                data: WebhookData {
                    stream_id,
                    events: events.iter().map(|e| &*e.payload).collect(),
                },
            })
            .expect("JSON");
            let timestamp = now.timestamp();
            let in_force = secrets.signing_at(now.timestamp_millis());
            if in_force.is_empty() {
                return Err("the webhook has no signing secret in force".to_owned());
            }
            let signature = signing::signature_header(&in_force, message_id, timestamp, &body);
            let value = |text: &str| HeaderValue::from_str(text).map_err(|_| "bad header");
            headers.insert("webhook-id", value(message_id)?);
            headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
            headers.insert("webhook-signature", value(&signature)?);
            body
        }
        Destination::SplunkHec {
            index,
            source,
            sourcetype,
            host,
            acknowledgements,
            ..
        } => {
            headers.extend(splunk_headers(secrets, stream_id, *acknowledgements)?);
            let mut body = Vec::new();
            for event in events {
                let object = HecEvent {
                    // HEC's time: epoch seconds, milliseconds as decimals.
                    time: event.occurred_at_ms as f64 / 1000.0,
                    source,
                    sourcetype,
                    index: index.as_deref(),
                    host: host.as_deref(),
                    event: &event.payload,
                };
                serde_json::to_writer(&mut body, &object).expect("JSON");
                body.push(b'\n');
            }
            body
        }
        Destination::Datadog {
            ddsource,
            service,
            ddtags,
            ..
        } => {
            let key = secrets
                .api_key
                .as_deref()
                .ok_or("the Datadog stream has no API key")?;
            headers.insert(
                "DD-API-KEY",
                HeaderValue::from_str(key)
                    .map_err(|_| "the Datadog API key is not a header value")?,
            );
            let entries: Vec<DatadogLog<'_>> = events
                .iter()
                .map(|event| DatadogLog {
                    ddsource,
                    service,
                    ddtags,
                    hostname: "audit-logs",
                    timestamp: event.occurred_at_ms,
                    evt: DatadogEvt {
                        id: &event.id,
                        name: &event.event_type,
                    },
                    message: event.payload.get(),
                })
                .collect();
            serde_json::to_vec(&entries).expect("JSON")
        }
    };
    Ok((body, headers))
}

fn splunk_headers(
    secrets: &Secrets,
    stream_id: &str,
    acknowledgements: bool,
) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    let token = secrets
        .token
        .as_deref()
        .ok_or("the Splunk HEC stream has no token")?;
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Splunk {token}"))
            .map_err(|_| "the HEC token is not a header value")?,
    );
    if acknowledgements {
        headers.insert(
            "X-Splunk-Request-Channel",
            HeaderValue::from_str(&channel_of(stream_id)).expect("a GUID"),
        );
    }
    Ok(headers)
}

/// The HEC channel of a stream: a GUID made from its id, the same on every replica.
pub fn channel_of(stream_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let hex = hex::encode(&Sha256::digest(stream_id.as_bytes())[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// What an HTTP answer means.
pub fn classify(status: StatusCode, retry_after: Option<Duration>, body: String) -> Outcome {
    let code = status.as_u16();
    let reason = if body.is_empty() {
        format!("HTTP {code}")
    } else {
        format!("HTTP {code}: {body}")
    };
    if status.is_success() {
        Outcome::Delivered { status: code }
    } else if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        Outcome::Retry {
            status: Some(code),
            reason,
            retry_after,
        }
    } else if status.is_redirection() {
        Outcome::Misconfigured {
            status: code,
            reason: format!(
                "HTTP {code}: the destination redirects, which streams do not follow; \
                 configure its final URL"
            ),
        }
    } else {
        Outcome::Misconfigured {
            status: code,
            reason,
        }
    }
}

/// `Retry-After` in seconds or as an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.timestamp_millis() - chrono::Utc::now().timestamp_millis();
    Some(Duration::from_millis(wait.max(0) as u64))
}

fn transport_reason(err: &reqwest::Error) -> String {
    use std::error::Error;
    if err.is_timeout() {
        return "no answer within the request timeout".to_owned();
    }
    let mut source = err.source();
    let mut innermost = None;
    while let Some(cause) = source {
        innermost = Some(cause.to_string());
        source = cause.source();
    }
    let detail = innermost.unwrap_or_else(|| err.to_string());
    if detail.contains(PRIVATE_REFUSED) {
        return PRIVATE_REFUSED.to_owned();
    }
    if err.is_connect() {
        format!("cannot connect: {}", short(&detail))
    } else {
        format!("request failed: {}", short(&detail))
    }
}

/// The first characters of a destination's answer, on one line.
fn short(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_REASON_CHARS)
        .collect()
}

/// A destination's answer with any of the stream's secrets removed.
fn scrub(mut text: String, secrets: &Secrets) -> String {
    let values = secrets
        .signing
        .iter()
        .map(|s| s.secret.as_str())
        .chain(secrets.token.as_deref())
        .chain(secrets.api_key.as_deref());
    for value in values {
        if !value.is_empty() {
            text = text.replace(value, "[redacted]");
        }
    }
    text
}

/// Resolves a destination's host, keeping only public addresses unless private ones are allowed.
struct GuardedResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|addr| allow_private || is_public(addr.ip()))
                .collect();
            if found.is_empty() {
                return Err(PRIVATE_REFUSED.into());
            }
            Ok(Box::new(found.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Not loopback, private, link-local, shared (CGNAT), unspecified, documentation or multicast.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_as_the_issue_specifies() {
        let retry = |code: u16| {
            matches!(
                classify(StatusCode::from_u16(code).unwrap(), None, String::new()),
                Outcome::Retry { .. }
            )
        };
        for code in [500, 502, 503, 504, 408, 429] {
            assert!(retry(code), "{code}");
        }
        for code in [400, 401, 403, 404, 413, 301] {
            assert!(
                matches!(
                    classify(StatusCode::from_u16(code).unwrap(), None, "x".into()),
                    Outcome::Misconfigured { .. }
                ),
                "{code}"
            );
        }
        assert_eq!(
            classify(StatusCode::ACCEPTED, None, String::new()),
            Outcome::Delivered { status: 202 }
        );
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let later = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let wait = retry_after(&headers).unwrap();
        assert!(wait > Duration::from_secs(25) && wait <= Duration::from_secs(30));
    }

    #[test]
    fn private_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn answers_never_carry_the_secrets() {
        let secrets = Secrets {
            token: Some("hec-123".into()),
            ..Secrets::default()
        };
        assert_eq!(
            scrub("invalid token hec-123".into(), &secrets),
            "invalid token [redacted]"
        );
    }

    #[test]
    fn hec_channels_are_guids() {
        let channel = channel_of("ls_1");
        assert_eq!(channel.len(), 36);
        assert_eq!(channel, channel_of("ls_1"));
        assert_ne!(channel, channel_of("ls_2"));
    }
}
