//! What a log stream is: its destination, payload form and filters, as the management API
//! accepts them (validated, with errors naming the field) and as the table stores them (the
//! non-secret settings as JSON, the secrets sealed apart).

use serde::{Deserialize, Serialize};

/// Most streams one organization may have.
pub const MAX_STREAMS_PER_ORGANIZATION: usize = 20;
const MAX_FILTER_VALUES: usize = 100;
const MAX_NAME_CHARS: usize = 100;

/// A field of a request body that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidField {
    pub field: String,
    pub message: String,
}

pub fn invalid(field: &str, message: impl Into<String>) -> InvalidField {
    InvalidField {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// The payload form of each event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// The item of `GET /api/v1/organization/audit-logs`.
    #[default]
    Json,
    /// OCSF 1.8 (see `ocsf.rs`).
    Ocsf,
}

/// Which events a stream delivers; an empty list does not filter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Filters {
    /// Exact types, or a prefix form `team_member.*` (every type starting `team_member.`).
    pub event_types: Vec<String>,
    pub actor_types: Vec<String>,
    pub resource_types: Vec<String>,
}

impl Filters {
    pub fn matches(&self, event_type: &str, actor_type: &str, resource_type: &str) -> bool {
        let types = self.event_types.is_empty()
            || self
                .event_types
                .iter()
                .any(|wanted| match wanted.strip_suffix('*') {
                    Some(prefix) => event_type.starts_with(prefix),
                    None => wanted == event_type,
                });
        types
            && (self.actor_types.is_empty() || self.actor_types.iter().any(|a| a == actor_type))
            && (self.resource_types.is_empty()
                || self.resource_types.iter().any(|r| r == resource_type))
    }

    fn validate(&self) -> Result<(), InvalidField> {
        let word = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        for (field, values) in [
            ("filters.eventTypes", &self.event_types),
            ("filters.actorTypes", &self.actor_types),
            ("filters.resourceTypes", &self.resource_types),
        ] {
            if values.len() > MAX_FILTER_VALUES {
                return Err(invalid(
                    field,
                    format!("at most {MAX_FILTER_VALUES} values"),
                ));
            }
            for value in values {
                let ok = if field == "filters.eventTypes" {
                    let body = value.strip_suffix(".*").unwrap_or(value);
                    body.split('.').all(word)
                } else {
                    word(value) && value.len() <= 64
                };
                if !ok || value.len() > 128 {
                    let form = if field == "filters.eventTypes" {
                        "a lowercase dotted event type such as user.created, or a prefix such as team_member.*"
                    } else {
                        "a lowercase word such as user"
                    };
                    return Err(invalid(field, format!("{value:?} is not {form}")));
                }
            }
        }
        Ok(())
    }
}

/// Where a stream delivers: one of the supported intake protocols, non-secret settings only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Destination {
    /// HTTPS POST of a JSON batch, signed per Standard Webhooks.
    Webhook { url: String },
    /// Splunk HTTP Event Collector: `POST {url}/services/collector/event`.
    SplunkHec {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<String>,
        #[serde(default = "default_source")]
        source: String,
        #[serde(default = "default_sourcetype")]
        sourcetype: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        /// Indexer acknowledgement is on for the token: a batch counts as delivered once HEC
        /// acknowledges it as indexed.
        #[serde(default)]
        acknowledgements: bool,
    },
    /// Datadog Logs intake v2: `POST https://http-intake.logs.{site}/api/v2/logs` (or `{url}/api/v2/logs`).
    Datadog {
        #[serde(default = "default_site")]
        site: String,
        /// Overrides the site's intake (a proxy, or a test receiver).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
        #[serde(default = "default_source")]
        ddsource: String,
        #[serde(default = "default_source")]
        service: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        ddtags: String,
    },
}

fn default_source() -> String {
    "audit-logs".to_owned()
}

fn default_sourcetype() -> String {
    "audit-logs:event".to_owned()
}

fn default_site() -> String {
    "datadoghq.com".to_owned()
}

/// Datadog's sites (docs.datadoghq.com/getting_started/site).
pub const DATADOG_SITES: [&str; 7] = [
    "datadoghq.com",
    "us3.datadoghq.com",
    "us5.datadoghq.com",
    "datadoghq.eu",
    "ap1.datadoghq.com",
    "ap2.datadoghq.com",
    "ddog-gov.com",
];

impl Destination {
    pub fn kind(&self) -> &'static str {
        match self {
            Destination::Webhook { .. } => "webhook",
            Destination::SplunkHec { .. } => "splunk_hec",
            Destination::Datadog { .. } => "datadog",
        }
    }

    /// Where requests go.
    pub fn endpoint(&self) -> String {
        match self {
            Destination::Webhook { url } => url.clone(),
            Destination::SplunkHec { url, .. } => {
                format!("{}/services/collector/event", url.trim_end_matches('/'))
            }
            Destination::Datadog { site, url, .. } => match url {
                Some(url) => format!("{}/api/v2/logs", url.trim_end_matches('/')),
                None => format!("https://http-intake.logs.{site}/api/v2/logs"),
            },
        }
    }

    fn validate(&self, insecure_allowed: bool) -> Result<(), InvalidField> {
        let check_url = |field: &str, url: &str| -> Result<(), InvalidField> {
            let parsed =
                reqwest::Url::parse(url).map_err(|_| invalid(field, "not an absolute URL"))?;
            match parsed.scheme() {
                "https" => {}
                "http" if insecure_allowed => {}
                _ => return Err(invalid(field, "must be an https:// URL")),
            }
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err(invalid(field, "has no host"));
            }
            if !parsed.username().is_empty() || parsed.password().is_some() {
                return Err(invalid(
                    field,
                    "must not carry credentials; use the destination's token or key fields",
                ));
            }
            if url.chars().count() > 2048 {
                return Err(invalid(field, "longer than 2048 characters"));
            }
            Ok(())
        };
        let plain = |field: &str, value: &str, max: usize| -> Result<(), InvalidField> {
            if value.chars().count() > max || !printable(value) {
                return Err(invalid(
                    field,
                    format!("at most {max} printable characters"),
                ));
            }
            Ok(())
        };
        match self {
            Destination::Webhook { url } => check_url("destination.url", url),
            Destination::SplunkHec {
                url,
                index,
                source,
                sourcetype,
                host,
                ..
            } => {
                check_url("destination.url", url)?;
                if reqwest::Url::parse(url).is_ok_and(|u| u.query().is_some()) {
                    return Err(invalid(
                        "destination.url",
                        "the HEC base URL (scheme, host, port) without a query",
                    ));
                }
                if let Some(index) = index {
                    plain("destination.index", index, 80)?;
                }
                plain("destination.source", source, 200)?;
                plain("destination.sourcetype", sourcetype, 200)?;
                if let Some(host) = host {
                    plain("destination.host", host, 200)?;
                }
                Ok(())
            }
            Destination::Datadog {
                site,
                url,
                ddsource,
                service,
                ddtags,
            } => {
                if !DATADOG_SITES.contains(&site.as_str()) {
                    return Err(invalid(
                        "destination.site",
                        format!("one of {}", DATADOG_SITES.join(", ")),
                    ));
                }
                if let Some(url) = url {
                    check_url("destination.url", url)?;
                }
                plain("destination.ddsource", ddsource, 100)?;
                plain("destination.service", service, 100)?;
                plain("destination.ddtags", ddtags, 1000)
            }
        }
    }
}

/// The non-secret settings of a stream, as stored in `audit_log_streams.settings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub destination: Destination,
    #[serde(default)]
    pub format: PayloadFormat,
    #[serde(default)]
    pub filters: Filters,
}

impl Settings {
    pub fn validate(&self, insecure_allowed: bool) -> Result<(), InvalidField> {
        self.destination.validate(insecure_allowed)?;
        self.filters.validate()
    }
}

/// One signing secret of a webhook; `expires_at_ms` is set on the old one by a rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningSecret {
    pub secret: String,
    pub created_at_ms: i64,
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
}

/// The secrets of a stream, sealed together in `audit_log_streams.secrets`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secrets {
    /// Webhook: newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing: Vec<SigningSecret>,
    /// Splunk HEC token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Datadog API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
}

impl Secrets {
    /// The signing secrets in force at `now_ms`, newest first.
    pub fn signing_at(&self, now_ms: i64) -> Vec<&str> {
        self.signing
            .iter()
            .filter(|s| s.expires_at_ms.is_none_or(|end| end > now_ms))
            .map(|s| s.secret.as_str())
            .collect()
    }

    /// Drops signing secrets that expired before `now_ms`.
    pub fn prune(&mut self, now_ms: i64) {
        self.signing
            .retain(|s| s.expires_at_ms.is_none_or(|end| end > now_ms));
    }
}

/// Printable: no control characters (Unicode category Cc).
fn printable(value: &str) -> bool {
    !value.chars().any(char::is_control)
}

/// The name of a stream, checked.
pub fn check_name(name: &str) -> Result<(), InvalidField> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS || !printable(name) {
        return Err(invalid(
            "name",
            format!("1 to {MAX_NAME_CHARS} characters, no control characters"),
        ));
    }
    Ok(())
}

/// A secret given by the caller (a HEC token, a Datadog key), checked.
pub fn check_secret(field: &str, value: &str) -> Result<(), InvalidField> {
    let chars = value.chars().count();
    if chars == 0 || chars > 512 || !printable(value) {
        return Err(invalid(field, "1 to 512 characters, no control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_type_filters_take_exact_types_and_prefixes() {
        let filters = Filters {
            event_types: vec!["team_member.*".into(), "user.created".into()],
            ..Filters::default()
        };
        assert!(filters.matches("team_member.added", "user", "team"));
        assert!(filters.matches("user.created", "user", "user"));
        assert!(!filters.matches("user.created_extra", "user", "user"));
        assert!(!filters.matches("team.created", "user", "team"));
        // "team_member.*" is a prefix of the dotted form, not of any string.
        assert!(!filters.matches("team_membership.added", "user", "team"));
        let by_actor = Filters {
            actor_types: vec!["api_key".into()],
            resource_types: vec!["team".into()],
            ..Filters::default()
        };
        assert!(by_actor.matches("x.y", "api_key", "team"));
        assert!(!by_actor.matches("x.y", "user", "team"));
        assert!(!by_actor.matches("x.y", "api_key", "user"));
        assert!(Filters::default().matches("anything.at_all", "system", "z"));
    }

    #[test]
    fn bad_settings_name_their_field() {
        let webhook = |url: &str| Settings {
            destination: Destination::Webhook { url: url.into() },
            format: PayloadFormat::Json,
            filters: Filters::default(),
        };
        for (url, insecure, wanted) in [
            (
                "http://siem.example.com/x",
                false,
                Some("must be an https:// URL"),
            ),
            ("http://127.0.0.1:9/x", true, None),
            ("siem.example.com", false, Some("not an absolute URL")),
            (
                "https://user:pw@siem.example.com/",
                false,
                Some("must not carry credentials"),
            ),
            (
                "ftp://siem.example.com/",
                true,
                Some("must be an https:// URL"),
            ),
            ("https://siem.example.com/hook", false, None),
        ] {
            let got = webhook(url).validate(insecure).err();
            match wanted {
                None => assert_eq!(got, None, "{url}"),
                Some(text) => {
                    let err = got.unwrap_or_else(|| panic!("{url} accepted"));
                    assert_eq!(err.field, "destination.url");
                    assert!(err.message.contains(text), "{url}: {err}");
                }
            }
        }
        let mut filtered = webhook("https://a.example/");
        filtered.filters.event_types = vec!["User.Created".into()];
        assert_eq!(
            filtered.validate(false).unwrap_err().field,
            "filters.eventTypes"
        );
        filtered.filters.event_types = vec!["team_member.*".into(), "user.created".into()];
        filtered.filters.actor_types = vec!["api key".into()];
        assert_eq!(
            filtered.validate(false).unwrap_err().field,
            "filters.actorTypes"
        );
        let datadog: Destination =
            serde_json::from_value(serde_json::json!({"type": "datadog", "site": "example.com"}))
                .unwrap();
        assert_eq!(
            datadog.validate(false).unwrap_err().field,
            "destination.site"
        );
    }

    #[test]
    fn destinations_know_their_intake_paths() {
        let hec: Destination = serde_json::from_value(
            serde_json::json!({"type": "splunk_hec", "url": "https://hec.example.com:8088/"}),
        )
        .unwrap();
        assert_eq!(
            hec.endpoint(),
            "https://hec.example.com:8088/services/collector/event"
        );
        let dd: Destination =
            serde_json::from_value(serde_json::json!({"type": "datadog", "site": "datadoghq.eu"}))
                .unwrap();
        assert_eq!(
            dd.endpoint(),
            "https://http-intake.logs.datadoghq.eu/api/v2/logs"
        );
    }

    #[test]
    fn rotated_secrets_expire_after_their_overlap() {
        let mut secrets = Secrets {
            signing: vec![
                SigningSecret {
                    secret: "new".into(),
                    created_at_ms: 10,
                    expires_at_ms: None,
                },
                SigningSecret {
                    secret: "old".into(),
                    created_at_ms: 0,
                    expires_at_ms: Some(100),
                },
            ],
            ..Secrets::default()
        };
        assert_eq!(secrets.signing_at(99), vec!["new", "old"]);
        assert_eq!(secrets.signing_at(100), vec!["new"]);
        secrets.prune(100);
        assert_eq!(secrets.signing.len(), 1);
    }
}
