//! The operations on an organization's streams, shared by the HTTP API and the CLI: list, read,
//! create, update, delete, rotate a webhook's secret, request a replay, send a test event. Every
//! operation is scoped to one organization; every change is published as an audit event of that
//! organization (`audit_log_stream.*`) and never carries a secret.

use std::time::{Duration, Instant};

use audit_store::{clickhouse, AuditEventRow};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tracing::warn;

use super::deliver::{DeliveryEvent, Outcome, Sender};
use super::payload;
use super::secret_box::{SecretBox, SecretBoxError};
use super::signing;
use super::spec::{
    check_name, check_secret, invalid, Destination, Filters, InvalidField, PayloadFormat, Secrets,
    Settings, SigningSecret, MAX_STREAMS_PER_ORGANIZATION,
};
use super::table::{self, StateRow, StreamRow};
use crate::config::StreamsConfig;
use crate::read_events::ReadEventPublisher;
use crate::store::ReadError;
use crate::time::format_timestamp;

/// Longest overlap of a rotated webhook secret.
pub const MAX_OVERLAP_SECONDS: u64 = 7 * 24 * 3600;
const DEFAULT_OVERLAP_SECONDS: u64 = 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    #[error("no log stream with this id in your organization")]
    NotFound,
    #[error("an organization may have at most {MAX_STREAMS_PER_ORGANIZATION} log streams")]
    TooMany,
    #[error("this stream is not a webhook: it has no signing secret")]
    NotAWebhook,
    #[error("log streams are not configured on this server (streams.secret_key is not set)")]
    NotConfigured,
    #[error(transparent)]
    Store(#[from] ReadError),
    #[error("stream {0}: {1}")]
    Secrets(String, SecretBoxError),
}

impl From<clickhouse::error::Error> for ManageError {
    fn from(err: clickhouse::error::Error) -> Self {
        ManageError::Store(ReadError::from(&err))
    }
}

/// Who changes a stream, for its audit event.
#[derive(Debug, Clone)]
pub struct Actor {
    pub id: String,
    /// `api_key` (the management API) or `system` (the operator's CLI).
    pub actor_type: &'static str,
    pub name: Option<String>,
    pub request_id: Option<String>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

/// The body of a create request.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateStream {
    pub name: String,
    /// The destination, secrets (`token`, `apiKey`) included.
    pub destination: Value,
    #[serde(default)]
    pub format: PayloadFormat,
    #[serde(default)]
    pub filters: Filters,
    #[serde(default)]
    pub paused: bool,
}

/// The body of an update: absent fields stay as they are. A destination replaces the old one
/// (secrets may be left out when its type does not change: the stored ones stay).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateStream {
    pub name: Option<String>,
    pub destination: Option<Value>,
    pub format: Option<PayloadFormat>,
    pub filters: Option<Filters>,
    pub paused: Option<bool>,
}

/// A stream as the API shows it: settings without secrets, and its health.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamView {
    pub id: String,
    pub name: String,
    pub destination: Destination,
    pub format: PayloadFormat,
    pub filters: Filters,
    pub paused: bool,
    /// `active`, `failing`, `error` or `paused`.
    pub state: &'static str,
    pub last_delivered_at: Option<String>,
    pub last_error: Option<LastError>,
    pub lag: Lag,
    pub delivered_events: u64,
    pub created_at: String,
    pub updated_at: String,
    /// Webhooks: when the previous signing secret stops being sent (during a rotation's overlap).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_secret_expires_at: Option<String>,
    /// Shown once: on creation and rotation of a webhook.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastError {
    /// The destination's HTTP status; null when it did not answer.
    pub status: Option<u16>,
    pub message: String,
    pub at: String,
}

#[derive(Debug, Serialize)]
pub struct Lag {
    /// Messages of the stream's partition of the stored-events topic after its position (its
    /// organization's events, and those of organizations sharing the partition): an upper bound.
    pub events: i64,
    /// Age of the oldest event not delivered yet (0 when caught up).
    pub seconds: f64,
}

/// The answer of a test delivery.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TestResult {
    pub delivered: bool,
    pub status: Option<u16>,
    pub message: String,
    pub duration_ms: u64,
    pub event_id: String,
}

pub struct StreamAdmin {
    client: clickhouse::Client,
    secret_box: Option<SecretBox>,
    config: StreamsConfig,
    events: ReadEventPublisher,
    sender: Sender,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Splits the secrets (`token`, `apiKey`) off a destination object and parses the rest.
fn split_destination(value: Value) -> Result<(Destination, Option<String>), InvalidField> {
    let Value::Object(mut object) = value else {
        return Err(invalid("destination", "must be an object with a type"));
    };
    let mut secret = None;
    for (key, field) in [
        ("token", "destination.token"),
        ("apiKey", "destination.apiKey"),
    ] {
        if let Some(value) = object.remove(key) {
            let Value::String(text) = value else {
                return Err(invalid(field, "must be a string"));
            };
            check_secret(field, &text)?;
            secret = Some(text);
        }
    }
    let destination: Destination =
        serde_json::from_value(Value::Object(object)).map_err(|err| {
            invalid(
                "destination",
                format!(
                    "{err} (types: webhook with url; splunk_hec with url and token; datadog with \
                 apiKey and site)"
                ),
            )
        })?;
    Ok((destination, secret))
}

impl StreamAdmin {
    pub fn new(
        client: clickhouse::Client,
        config: &StreamsConfig,
        events: ReadEventPublisher,
    ) -> Result<Self, SecretBoxError> {
        let secret_box = config
            .secret_key
            .as_ref()
            .map(SecretBox::from_key)
            .transpose()?;
        let sender = Sender::new(config.request_timeout(), config.allow_private_destinations)
            .with_ack_timeout(Duration::from_millis(config.ack_timeout_ms));
        Ok(Self {
            client,
            secret_box,
            config: config.clone(),
            events,
            sender,
        })
    }

    fn secret_box(&self) -> Result<&SecretBox, ManageError> {
        self.secret_box.as_ref().ok_or(ManageError::NotConfigured)
    }

    fn open(&self, row: &StreamRow) -> Result<Secrets, ManageError> {
        let plain = self
            .secret_box()?
            .open(&row.stream_id, &row.secrets)
            .map_err(|err| ManageError::Secrets(row.stream_id.clone(), err))?;
        serde_json::from_slice(&plain)
            .map_err(|_| ManageError::Secrets(row.stream_id.clone(), SecretBoxError::Undecryptable))
    }

    fn seal(&self, stream_id: &str, secrets: &Secrets) -> Result<String, ManageError> {
        let plain = serde_json::to_vec(secrets).expect("secrets serialize");
        Ok(self.secret_box()?.seal(stream_id, &plain))
    }

    pub async fn list(&self, organization_id: &str) -> Result<Vec<StreamView>, ManageError> {
        self.secret_box()?;
        let rows = table::organization_streams(&self.client, organization_id).await?;
        let states = table::states(&self.client, Some(organization_id)).await?;
        rows.iter()
            .filter(|row| row.deleted == 0)
            .map(|row| {
                let state = states.iter().find(|s| s.stream_id == row.stream_id);
                self.view(row, state)
            })
            .collect()
    }

    async fn current(&self, organization_id: &str, id: &str) -> Result<StreamRow, ManageError> {
        self.secret_box()?;
        table::organization_streams(&self.client, organization_id)
            .await?
            .into_iter()
            .find(|row| row.stream_id == id && row.deleted == 0)
            .ok_or(ManageError::NotFound)
    }

    async fn state_of(&self, row: &StreamRow) -> Result<Option<StateRow>, ManageError> {
        Ok(table::state_of(&self.client, &row.organization_id, &row.stream_id).await?)
    }

    pub async fn get(&self, organization_id: &str, id: &str) -> Result<StreamView, ManageError> {
        let row = self.current(organization_id, id).await?;
        let state = self.state_of(&row).await?;
        self.view(&row, state.as_ref())
    }

    pub async fn create(
        &self,
        organization_id: &str,
        actor: &Actor,
        request: CreateStream,
    ) -> Result<StreamView, ManageError> {
        self.secret_box()?;
        check_name(&request.name)?;
        let (destination, given_secret) = split_destination(request.destination)?;
        let settings = Settings {
            destination,
            format: request.format,
            filters: request.filters,
        };
        settings.validate(self.config.allow_http)?;
        let now = now_ms();
        let mut secrets = Secrets::default();
        let mut shown = None;
        match &settings.destination {
            Destination::Webhook { .. } => {
                if given_secret.is_some() {
                    return Err(invalid(
                        "destination",
                        "a webhook's signing secret is generated by the service",
                    )
                    .into());
                }
                let secret = signing::generate_secret();
                shown = Some(secret.clone());
                secrets.signing.push(SigningSecret {
                    secret,
                    created_at_ms: now,
                    expires_at_ms: None,
                });
            }
            Destination::SplunkHec { .. } => {
                secrets.token =
                    Some(given_secret.ok_or_else(|| invalid("destination.token", "required"))?);
            }
            Destination::Datadog { .. } => {
                secrets.api_key =
                    Some(given_secret.ok_or_else(|| invalid("destination.apiKey", "required"))?);
            }
        }
        let existing = table::organization_streams(&self.client, organization_id).await?;
        if existing.iter().filter(|r| r.deleted == 0).count() >= MAX_STREAMS_PER_ORGANIZATION {
            return Err(ManageError::TooMany);
        }
        let stream_id = format!("ls_{}", uuid::Uuid::new_v4().simple());
        let row = StreamRow {
            organization_id: organization_id.to_owned(),
            stream_id: stream_id.clone(),
            version: version_after(0),
            name: request.name.clone(),
            kind: settings.destination.kind().to_owned(),
            settings: serde_json::to_string(&settings).expect("settings serialize"),
            secrets: self.seal(&stream_id, &secrets)?,
            paused: u8::from(request.paused),
            deleted: 0,
            replay_seq: 0,
            replay_from_ms: 0,
            created_at_ms: now,
            updated_at_ms: now,
        };
        table::insert_version(&self.client, &row).await?;
        self.announce(
            "audit_log_stream.created",
            &row,
            actor,
            changes_between(None, Some(&settings), None, Some(&row.name)),
            json!({}),
        )
        .await;
        let mut view = self.view(&row, None)?;
        view.secret = shown;
        Ok(view)
    }

    pub async fn update(
        &self,
        organization_id: &str,
        actor: &Actor,
        id: &str,
        request: UpdateStream,
    ) -> Result<StreamView, ManageError> {
        let old = self.current(organization_id, id).await?;
        let old_settings = parse_settings(&old)?;
        let mut settings = old_settings.clone();
        let mut secrets = self.open(&old)?;
        let mut row = old.clone();
        if let Some(name) = &request.name {
            check_name(name)?;
            row.name = name.clone();
        }
        let mut secret_changed = false;
        if let Some(value) = request.destination {
            let (destination, given) = split_destination(value)?;
            let same_kind = destination.kind() == settings.destination.kind();
            match (&destination, given) {
                (Destination::Webhook { .. }, Some(_)) => {
                    return Err(invalid(
                        "destination",
                        "a webhook's signing secret is generated by the service; rotate it with \
                         POST .../rotate-secret",
                    )
                    .into())
                }
                (Destination::Webhook { .. }, None) => {
                    if !same_kind {
                        secrets = Secrets::default();
                        secrets.signing.push(SigningSecret {
                            secret: signing::generate_secret(),
                            created_at_ms: now_ms(),
                            expires_at_ms: None,
                        });
                    }
                }
                (Destination::SplunkHec { .. }, Some(token)) => {
                    secrets = Secrets {
                        token: Some(token),
                        ..Secrets::default()
                    };
                    secret_changed = true;
                }
                (Destination::Datadog { .. }, Some(key)) => {
                    secrets = Secrets {
                        api_key: Some(key),
                        ..Secrets::default()
                    };
                    secret_changed = true;
                }
                // A destination replaces the old one, its secret included.
                (Destination::SplunkHec { .. }, None) => {
                    return Err(invalid("destination.token", "required").into())
                }
                (Destination::Datadog { .. }, None) => {
                    return Err(invalid("destination.apiKey", "required").into())
                }
            }
            settings.destination = destination;
        }
        if let Some(format) = request.format {
            settings.format = format;
        }
        if let Some(filters) = request.filters {
            settings.filters = filters;
        }
        settings.validate(self.config.allow_http)?;
        if let Some(paused) = request.paused {
            row.paused = u8::from(paused);
        }
        let shown = match (&settings.destination, old.kind.as_str()) {
            (Destination::Webhook { .. }, kind) if kind != "webhook" => {
                secrets.signing.first().map(|s| s.secret.clone())
            }
            _ => None,
        };
        row.kind = settings.destination.kind().to_owned();
        row.settings = serde_json::to_string(&settings).expect("settings serialize");
        row.secrets = self.seal(&row.stream_id, &secrets)?;
        row.version = version_after(old.version);
        row.updated_at_ms = now_ms();
        table::insert_version(&self.client, &row).await?;
        let mut changes = changes_between(
            Some(&old_settings),
            Some(&settings),
            Some(&old.name),
            Some(&row.name),
        );
        if old.paused != row.paused {
            changes.push(json!({"field": "paused", "oldValue": old.paused == 1, "newValue": row.paused == 1}));
        }
        if secret_changed || shown.is_some() {
            changes.push(json!({"field": "destination.secret"}));
        }
        self.announce("audit_log_stream.updated", &row, actor, changes, json!({}))
            .await;
        let state = self.state_of(&row).await?;
        let mut view = self.view(&row, state.as_ref())?;
        view.secret = shown;
        Ok(view)
    }

    pub async fn delete(
        &self,
        organization_id: &str,
        actor: &Actor,
        id: &str,
    ) -> Result<(), ManageError> {
        let mut row = self.current(organization_id, id).await?;
        row.deleted = 1;
        row.version = version_after(row.version);
        row.updated_at_ms = now_ms();
        // The secrets go with the stream.
        row.secrets = self.seal(&row.stream_id, &Secrets::default())?;
        table::insert_version(&self.client, &row).await?;
        self.announce(
            "audit_log_stream.deleted",
            &row,
            actor,
            Vec::new(),
            json!({}),
        )
        .await;
        Ok(())
    }

    /// A new signing secret for a webhook; the previous one is still sent for `overlap`.
    pub async fn rotate_secret(
        &self,
        organization_id: &str,
        actor: &Actor,
        id: &str,
        overlap_seconds: Option<u64>,
    ) -> Result<StreamView, ManageError> {
        let overlap = overlap_seconds.unwrap_or(DEFAULT_OVERLAP_SECONDS);
        if overlap > MAX_OVERLAP_SECONDS {
            return Err(invalid(
                "overlapSeconds",
                format!("at most {MAX_OVERLAP_SECONDS} (7 days)"),
            )
            .into());
        }
        let mut row = self.current(organization_id, id).await?;
        if row.kind != "webhook" {
            return Err(ManageError::NotAWebhook);
        }
        let mut secrets = self.open(&row)?;
        let now = now_ms();
        secrets.prune(now);
        for old in &mut secrets.signing {
            let end = now + (overlap as i64) * 1000;
            old.expires_at_ms = Some(old.expires_at_ms.map_or(end, |e| e.min(end)));
        }
        let secret = signing::generate_secret();
        secrets.signing.insert(
            0,
            SigningSecret {
                secret: secret.clone(),
                created_at_ms: now,
                expires_at_ms: None,
            },
        );
        secrets.prune(now);
        row.secrets = self.seal(&row.stream_id, &secrets)?;
        row.version = version_after(row.version);
        row.updated_at_ms = now;
        table::insert_version(&self.client, &row).await?;
        self.announce(
            "audit_log_stream.secret_rotated",
            &row,
            actor,
            vec![json!({"field": "destination.secret"})],
            json!({"overlapSeconds": overlap}),
        )
        .await;
        let state = self.state_of(&row).await?;
        let mut view = self.view(&row, state.as_ref())?;
        view.secret = Some(secret);
        Ok(view)
    }

    /// Asks the stream's worker to deliver again from `from_ms` (events stored since then
    /// that the stored-events topic still holds).
    pub async fn replay(
        &self,
        organization_id: &str,
        actor: &Actor,
        id: &str,
        from_ms: i64,
    ) -> Result<StreamView, ManageError> {
        let mut row = self.current(organization_id, id).await?;
        if from_ms > now_ms() {
            // Nothing was stored since then: nothing to send again, no change.
            let state = self.state_of(&row).await?;
            return self.view(&row, state.as_ref());
        }
        row.replay_seq += 1;
        row.replay_from_ms = from_ms;
        row.version = version_after(row.version);
        row.updated_at_ms = now_ms();
        table::insert_version(&self.client, &row).await?;
        self.announce(
            "audit_log_stream.replay_requested",
            &row,
            actor,
            Vec::new(),
            json!({"from": format_timestamp(from_ms)}),
        )
        .await;
        let state = self.state_of(&row).await?;
        self.view(&row, state.as_ref())
    }

    /// Sends one synthetic event to the stream's destination now and reports the answer.
    pub async fn test(&self, organization_id: &str, id: &str) -> Result<TestResult, ManageError> {
        let row = self.current(organization_id, id).await?;
        let settings = parse_settings(&row)?;
        let secrets = self.open(&row)?;
        let now = now_ms();
        let event = AuditEventRow {
            organization_id: organization_id.to_owned(),
            occurred_at_ms: now,
            id: format!("evt_test_{}", uuid::Uuid::new_v4().simple()),
            event_type: "audit_log_stream.test".to_owned(),
            actor_id: "audit-logs".to_owned(),
            actor_type: "system".to_owned(),
            resource_type: "audit_log_stream".to_owned(),
            resource_id: row.stream_id.clone(),
            resource_name: Some(row.name.clone()),
            changes: "[]".to_owned(),
            ingested_at_ms: now as u64,
            ..AuditEventRow::default()
        };
        let delivery = DeliveryEvent {
            id: event.id.clone(),
            occurred_at_ms: now,
            event_type: event.event_type.clone(),
            payload: payload::render(&event, settings.format),
        };
        let started = Instant::now();
        let outcome = self
            .sender
            .send(
                &row.stream_id,
                &settings.destination,
                &secrets,
                &format!("msg_{}", event.id),
                std::slice::from_ref(&delivery),
            )
            .await;
        Ok(TestResult {
            delivered: matches!(outcome, Outcome::Delivered { .. }),
            status: outcome.status().filter(|s| *s > 0),
            message: match &outcome {
                Outcome::Delivered { status } => format!("HTTP {status}: delivered"),
                other => other.reason().to_owned(),
            },
            duration_ms: started.elapsed().as_millis() as u64,
            event_id: event.id,
        })
    }

    fn view(&self, row: &StreamRow, state: Option<&StateRow>) -> Result<StreamView, ManageError> {
        let settings = parse_settings(row)?;
        let health = state.filter(|s| s.written_at_us > 0);
        let state_name = if row.paused == 1 {
            "paused"
        } else {
            match health.map(|s| s.state.as_str()) {
                Some("failing") => "failing",
                // A newer version of the settings is retried.
                Some("error") if health.is_some_and(|s| s.config_version >= row.version) => "error",
                _ => "active",
            }
        };
        // Best effort: a stream whose secrets this server cannot open is still shown.
        let previous_secret_expires_at = match row.kind.as_str() {
            "webhook" => match self.open(row) {
                Ok(secrets) => secrets
                    .signing
                    .iter()
                    .filter_map(|s| s.expires_at_ms)
                    .filter(|end| *end > now_ms())
                    .max()
                    .map(format_timestamp),
                Err(err) => {
                    warn!(error = %err, "stream secrets unreadable");
                    None
                }
            },
            _ => None,
        };
        Ok(StreamView {
            id: row.stream_id.clone(),
            name: row.name.clone(),
            destination: settings.destination,
            format: settings.format,
            filters: settings.filters,
            paused: row.paused == 1,
            state: state_name,
            last_delivered_at: health
                .map(|s| s.last_delivered_at_ms)
                .filter(|ms| *ms > 0)
                .map(format_timestamp),
            last_error: health
                .filter(|s| !s.last_error.is_empty())
                .map(|s| LastError {
                    status: u16::try_from(s.last_error_status).ok().filter(|c| *c > 0),
                    message: s.last_error.clone(),
                    at: format_timestamp(s.last_error_at_ms),
                }),
            lag: Lag {
                events: health.map_or(0, |s| s.lag_events.max(0)),
                seconds: health.map_or(0.0, |s| s.lag_ms.max(0) as f64 / 1000.0),
            },
            delivered_events: health.map_or(0, |s| s.delivered_events),
            created_at: format_timestamp(row.created_at_ms),
            updated_at: format_timestamp(row.updated_at_ms),
            previous_secret_expires_at,
            secret: None,
        })
    }

    /// Publishes the audit event of a change (awaited; a failure is logged and counted, the
    /// change stands).
    async fn announce(
        &self,
        event_type: &str,
        row: &StreamRow,
        actor: &Actor,
        changes: Vec<Value>,
        metadata: Value,
    ) {
        let mut actor_json = Map::new();
        actor_json.insert("id".into(), json!(actor.id));
        actor_json.insert("type".into(), json!(actor.actor_type));
        if let Some(name) = actor.name.as_ref().filter(|n| !n.is_empty()) {
            actor_json.insert("name".into(), json!(name));
        }
        let mut context = Map::new();
        for (key, value) in [
            ("requestId", &actor.request_id),
            ("ip", &actor.ip),
            ("userAgent", &actor.user_agent),
        ] {
            if let Some(value) = value {
                context.insert(
                    key.into(),
                    json!(value.chars().take(512).collect::<String>()),
                );
            }
        }
        let mut metadata = metadata;
        metadata["kind"] = json!(row.kind);
        let event = json!({
            "id": format!("evt_{}", uuid::Uuid::new_v4().simple()),
            "type": event_type,
            "occurredAt": format_timestamp(now_ms()),
            "organizationId": row.organization_id,
            "actor": actor_json,
            "resource": {"type": "audit_log_stream", "id": row.stream_id, "name": row.name},
            "changes": changes,
            "context": context,
            "metadata": metadata,
        });
        if let Err(err) = self.events.send(&row.organization_id, &event).await {
            warn!(error = %err, event_type, stream_id = %row.stream_id, "could not publish the stream change's audit event");
        }
    }
}

/// A version number above `previous`: the wall clock in microseconds (a later change by any
/// replica wins), or one more than `previous` if the clock is behind it.
fn version_after(previous: u64) -> u64 {
    let now = chrono::Utc::now().timestamp_micros().max(0) as u64;
    now.max(previous + 1)
}

pub fn parse_settings(row: &StreamRow) -> Result<Settings, ManageError> {
    serde_json::from_str(&row.settings).map_err(|err| {
        ManageError::Store(ReadError::Failed(format!(
            "stream {} has unreadable settings: {err}",
            row.stream_id
        )))
    })
}

/// `changes` entries of the non-secret settings that differ.
fn changes_between(
    old: Option<&Settings>,
    new: Option<&Settings>,
    old_name: Option<&str>,
    new_name: Option<&str>,
) -> Vec<Value> {
    let mut changes = Vec::new();
    if old_name != new_name {
        changes.push(json!({"field": "name", "oldValue": old_name, "newValue": new_name}));
    }
    let field = |settings: Option<&Settings>, name: &str| {
        settings.map(|s| serde_json::to_value(s).expect("JSON")[name].clone())
    };
    for name in ["destination", "format", "filters"] {
        let (before, after) = (field(old, name), field(new, name));
        if before != after {
            changes.push(json!({"field": name, "oldValue": before, "newValue": after}));
        }
    }
    changes
}
