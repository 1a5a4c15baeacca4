//! What every API test uses: an in-process API on a free port with its own database and
//! keys, and builders of stored events.

#![allow(dead_code, unused_imports)]

pub use audit_api::config::ApiConfig;
pub use audit_api::keys::{self, Role};
pub use audit_api::Application;
pub use audit_store::clickhouse;
pub use audit_store::{AuditEventRow, ClickHouseConfig};
pub use audit_testkit::clickhouse_url;
pub use reqwest::StatusCode;
pub use secrecy::ExposeSecret;
pub use serde_json::Value;
pub use std::collections::BTreeSet;
pub use std::net::SocketAddr;
pub use std::time::{Duration, Instant};

pub mod streams;

pub const BASE_MS: i64 = 1_735_689_600_000; // 2025-01-01T00:00:00Z

/// One running API with its own database.
pub struct TestApi {
    pub address: SocketAddr,
    pub clickhouse: ClickHouseConfig,
    pub http: reqwest::Client,
    pub shutdown: tokio_util::sync::CancellationToken,
    pub server: Option<tokio::task::JoinHandle<()>>,
}

impl TestApi {
    pub async fn spawn(name: &str) -> Self {
        Self::spawn_with(name, |_| {}).await
    }

    pub async fn spawn_with(name: &str, tune: impl FnOnce(&mut ApiConfig)) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let mut config = ApiConfig {
            http_listen: "127.0.0.1:0".parse().unwrap(),
            clickhouse: audit_testkit::clickhouse_config(format!(
                "audit_api_test_{name}_{}",
                &suffix[..12]
            )),
            shutdown_timeout_ms: 2_000,
            ..ApiConfig::default()
        };
        config.read_events.enabled = false;
        config.rate_limit.requests_per_second = 0;
        config.keys.refresh_interval_ms = 200;
        // The fixtures date from 2025: held under the longest retention, whatever today is.
        config.retention.default_days = audit_store::retention::MAX_DAYS;
        config.retention.refresh_interval_ms = 200;
        tune(&mut config);
        let clickhouse = config.clickhouse.clone();
        let app = Application::build(config).await.expect("api starts");
        let address = app.local_addr().unwrap();
        let shutdown = app.shutdown_token();
        let server = tokio::spawn(async move {
            app.run().await.expect("api runs");
        });
        Self {
            address,
            clickhouse,
            http: reqwest::Client::new(),
            shutdown,
            server: Some(server),
        }
    }

    pub fn client(&self) -> clickhouse::Client {
        self.clickhouse.client()
    }

    /// Creates a key and waits until the running service knows it.
    pub async fn key(&self, org: &str, role: Role) -> String {
        let key = keys::generate(org, role, "test");
        keys::create(&self.client(), &key).await.unwrap();
        let text = key.secret.expose_secret().to_owned();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.get(&text, "limit=1").await.0;
            if status != StatusCode::UNAUTHORIZED || Instant::now() > deadline {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn insert(&self, rows: &[AuditEventRow]) {
        let mut insert = self
            .client()
            .insert::<AuditEventRow>(audit_store::EVENTS_TABLE)
            .await
            .unwrap();
        for row in rows {
            insert.write(row).await.unwrap();
        }
        insert.end().await.unwrap();
    }

    /// Stores `rows` again, as copies of events stored already (an event published twice
    /// upstream), and records their months as holding copies, as the ingest's duplicate check
    /// does after it stored them (`audit_ingest::duplicates`).
    pub async fn insert_copies(&self, rows: &[AuditEventRow]) {
        self.insert(rows).await;
        let months: std::collections::BTreeSet<String> = rows
            .iter()
            .map(|r| {
                chrono::DateTime::from_timestamp_millis(r.occurred_at_ms)
                    .unwrap()
                    .format("%Y%m")
                    .to_string()
            })
            .collect();
        for month in months {
            self.client()
                .query(&format!(
                    "INSERT INTO {} VALUES (?, 'found', toUInt64(toUnixTimestamp(now())) * 1000, 1)",
                    audit_store::DUPLICATES_TABLE
                ))
                .bind(month)
                .execute()
                .await
                .unwrap();
        }
    }

    /// `total` and `X-Total-Count-Exact` of a 200 JSON page.
    pub async fn total(&self, key: &str, query: &str) -> (u64, bool) {
        let (status, headers, body) = self.get(key, query).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let page: Value = serde_json::from_slice(&body).unwrap();
        let exact = headers["x-total-count-exact"].to_str().unwrap() == "true";
        (page["total"].as_u64().unwrap(), exact)
    }

    /// The Prometheus exposition of `/metrics`.
    pub async fn metrics(&self) -> String {
        let response = self.http.get(self.url("/metrics", "")).send().await;
        response.unwrap().text().await.unwrap()
    }

    pub fn url(&self, path: &str, query: &str) -> String {
        format!("http://{}{path}?{query}", self.address)
    }

    /// GET the list endpoint with an `X-API-Key`.
    pub async fn get(
        &self,
        key: &str,
        query: &str,
    ) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
        self.get_path(key, "/api/v1/organization/audit-logs", query)
            .await
    }

    pub async fn get_path(
        &self,
        key: &str,
        path: &str,
        query: &str,
    ) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
        let response = self
            .http
            .get(self.url(path, query))
            .header("X-API-Key", key)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap().to_vec();
        (status, headers, body)
    }

    /// A 200 JSON page.
    pub async fn page(&self, key: &str, query: &str) -> Value {
        let (status, _, body) = self.get(key, query).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{query}: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).unwrap()
    }

    /// The ids of every page of `query`, first page then by `nextCursor` to the end.
    pub async fn walk(&self, key: &str, query: &str) -> Vec<String> {
        let mut walked = Vec::new();
        let mut page = self.page(key, query).await;
        loop {
            walked.extend(ids(&page));
            let Some(cursor) = page["nextCursor"].as_str().map(str::to_owned) else {
                return walked;
            };
            page = self.page(key, &format!("{query}&cursor={cursor}")).await;
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        let _ = audit_testkit::drop_database(&self.clickhouse, &self.clickhouse.database).await;
    }
}

pub fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The ids of an NDJSON export body, in order.
pub fn ndjson_ids(body: &[u8]) -> Vec<String> {
    body.split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            serde_json::from_slice::<Value>(line).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// A stored event; `n` makes every field distinct enough to filter on.
pub fn event(org: &str, id: &str, at_ms: i64) -> AuditEventRow {
    AuditEventRow {
        organization_id: org.to_owned(),
        occurred_at_ms: at_ms,
        id: id.to_owned(),
        event_type: "user.created".to_owned(),
        actor_id: "usr_admin".to_owned(),
        actor_type: "user".to_owned(),
        actor_email: Some("Ada.Admin@Acme.example".to_owned()),
        actor_name: Some("Ada Admin".to_owned()),
        resource_type: "user".to_owned(),
        resource_id: format!("usr_{id}"),
        resource_name: None,
        affected_user_id: Some(format!("usr_{id}")),
        affected_user_email: Some(format!("{id}@acme.example")),
        changes: r#"[{"field":"role","oldValue":"member","newValue":"admin"}]"#.to_owned(),
        context_ip: Some("203.0.113.7".to_owned()),
        context_user_agent: Some("curl/8".to_owned()),
        context_request_id: Some("req_1".to_owned()),
        context_location: None,
        metadata: Some(r#"{"source":"test"}"#.to_owned()),
        source_topic: "identity.users.v1".to_owned(),
        source_partition: 0,
        source_offset: 0,
        ingested_at_ms: 1,
    }
}

/// Events `e000..` one second apart, with a few types, actors and resources mixed in.
pub fn series(org: &str, count: usize) -> Vec<AuditEventRow> {
    (0..count)
        .map(|n| {
            let mut row = event(org, &format!("e{n:03}"), BASE_MS + n as i64 * 1000);
            if n % 3 == 0 {
                row.event_type = "team_member.added".to_owned();
                row.resource_type = "team".to_owned();
                row.resource_id = format!("team_{}", n % 2);
            }
            if n % 4 == 0 {
                row.actor_id = "usr_bob".to_owned();
                row.actor_email = Some("bob@acme.example".to_owned());
            }
            if n % 5 == 0 {
                row.actor_email = None;
            }
            row
        })
        .collect()
}
