//! What the API's benchmarks share: the 10M-event data set and the release `audit-api` binary
//! serving it.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use audit_store::{clickhouse, ClickHouseConfig};
use audit_testkit::{clickhouse_url, release_binary};

pub const EVENTS: u64 = 10_000_000;
pub const BIG_ORG: &str = "org_big";
pub const YEAR_MS: i64 = 365 * 86_400_000;

/// The local ClickHouse's `database`, uncompressed (the server is on this machine).
pub fn config(database: &str) -> ClickHouseConfig {
    ClickHouseConfig {
        url: clickhouse_url(),
        database: database.to_owned(),
        compression: audit_store::Compression::None,
        ..ClickHouseConfig::default()
    }
}

const TYPES: &str = "['user.created','user.updated','user.deleted','user.invited','user.logged_in','user.logged_out','user.login_failed','user.password_changed','user.mfa_enabled','team.created','team.updated','team.deleted','team_member.added','team_member.removed','team_member.updated','role.assigned','role.revoked','api_key.created','api_key.revoked','organization.updated','user.suspended','user.reactivated','user.email_changed']";

/// Inserts the data set into the migrated database of `client`: `EVENTS` events over the year
/// before `now`, half in `org_big`, the rest over 99 organizations; 1,000 actors per
/// organization, 23 event types, 6 resource types. With `subject_every = Some(n)`, one event of
/// `org_big` in `n` is acted by `usr_subject` (`subject@example.com`, "Subject Person", IP
/// 198.51.100.77): the person an erasure benchmark erases. Then merges everything once, so that
/// background merges do not run during the measurements.
pub async fn generate(client: &clickhouse::Client, now: i64, subject_every: Option<u64>) {
    let start = now - YEAR_MS;
    let subject = match subject_every {
        Some(n) => format!("number % 2 = 0 AND intDiv(number, 2) % {n} = 0"),
        None => "0".to_owned(),
    };
    for chunk in 0..EVENTS / 1_000_000 {
        let sql = format!(
            "INSERT INTO audit_events SELECT
              if(number % 2 = 0, '{BIG_ORG}', concat('org_', toString(100 + intDiv(number, 2) % 99))),
              {start} + toInt64(cityHash64(number, 1) % {YEAR_MS}) AS t,
              concat('evt_', lower(hex(cityHash64(number, 2)))),
              {TYPES}[cityHash64(number, 3) % 23 + 1],
              if({subject}, 'usr_subject', concat('usr_', toString(cityHash64(number, 4) % 1000))), 'user',
              if({subject}, 'subject@example.com', concat('user', toString(cityHash64(number, 4) % 1000), '@example.com')),
              if({subject}, 'Subject Person', concat('User ', toString(cityHash64(number, 4) % 1000))),
              ['team','user','role','organization','session','api_key'][cityHash64(number, 5) % 6 + 1],
              concat('res_', toString(cityHash64(number, 6) % 5000)), NULL,
              concat('usr_', toString(cityHash64(number, 7) % 1000)),
              concat('user', toString(cityHash64(number, 7) % 1000), '@example.com'),
              '[{{\"field\":\"role\",\"oldValue\":\"member\",\"newValue\":\"admin\"}}]',
              if({subject}, '198.51.100.77', '203.0.113.7'), 'Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36', concat('req_', toString(number)),
              'Berlin, DE', '{{\"method\":\"sso\"}}', 'identity.users.v1', 0, number, toUInt64(t + 1000)
            FROM system.numbers WHERE number >= {} LIMIT 1000000",
            chunk * 1_000_000
        );
        client.query(&sql).execute().await.unwrap();
    }
    for table in [
        "audit_events",
        "audit_events_by_type",
        "audit_events_by_actor_email",
        "audit_events_by_actor_email_rows",
    ] {
        client
            .query(&format!("OPTIMIZE TABLE {table} FINAL"))
            .execute()
            .await
            .unwrap();
    }
}

/// The release `audit-api` serving `database`.
pub struct Api {
    pub child: Child,
    pub base: String,
}

impl Api {
    /// A server with `env` added to its environment (configuration overrides).
    pub async fn start(http: &reqwest::Client, database: &str, env: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(release_binary("audit-api"))
            .arg("serve")
            .env("AUDIT_API__HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .env("AUDIT_API__CLICKHOUSE__URL", clickhouse_url())
            .env("AUDIT_API__CLICKHOUSE__DATABASE", database)
            .env("AUDIT_API__CLICKHOUSE__COMPRESSION", "none")
            .env("AUDIT_API__READ_EVENTS__ENABLED", "false")
            .env("AUDIT_API__RATE_LIMIT__REQUESTS_PER_SECOND", "0")
            .env("AUDIT_API__TELEMETRY__LOG_FILTER", "warn")
            // The data set spans the last 365 days as of its generation, which may be older.
            .env("AUDIT_API__RETENTION__DEFAULT_DAYS", "3650")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(http.get(format!("{base}/readyz")).send().await, Ok(r) if r.status().is_success())
        {
            assert!(Instant::now() < deadline, "audit-api did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self { child, base }
    }

    pub fn peak_rss_mb(&self) -> f64 {
        let kb = audit_testkit::proc_status_kb(self.child.id(), "VmHWM").expect("audit-api runs");
        kb as f64 / 1024.0
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn api_get(http: &reqwest::Client, url: &str, key: &str) -> Vec<u8> {
    let response = http.get(url).header("X-API-Key", key).send().await.unwrap();
    assert!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    response.bytes().await.unwrap().to_vec()
}
