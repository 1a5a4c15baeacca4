//! What the integration tests and benchmarks of every crate share: where the local stack
//! (`make up`) listens, dropping a test database, the release binaries a benchmark runs, a
//! process's memory from `/proc`, and percentiles. A dev-dependency only.

use std::path::{Path, PathBuf};

use audit_store::ClickHouseConfig;

/// ClickHouse's HTTP address: `AUDIT_TEST_CLICKHOUSE_URL`, else the local stack's.
pub fn clickhouse_url() -> String {
    std::env::var("AUDIT_TEST_CLICKHOUSE_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:18123".to_owned())
}

/// Kafka's bootstrap servers: `AUDIT_TEST_KAFKA_BROKERS`, else the local stack's.
pub fn brokers() -> String {
    std::env::var("AUDIT_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".to_owned())
}

/// The local stack's TLS and SASL endpoints (`deploy/local/tls.sh`, `kafka.sh`, `clickhouse.sh`):
/// `AUDIT_TEST_*` variables, else the local stack's defaults.
#[derive(Debug, Clone)]
pub struct SecureStack {
    /// Kafka's `SASL_SSL` listener (PLAIN, SCRAM-SHA-256/512, OAUTHBEARER).
    pub sasl_ssl: String,
    /// Kafka's `SSL` listener, which requires a client certificate.
    pub ssl: String,
    /// Kafka's `SASL_PLAINTEXT` listener.
    pub sasl_plaintext: String,
    /// ClickHouse's HTTPS port.
    pub clickhouse_https: String,
    pub user: String,
    pub password: String,
    /// `ca.crt` (signed every server certificate), `other-ca.crt` (signed none), `client.crt`
    /// and `client.key`.
    pub tls_dir: PathBuf,
    /// Kafka's log directory (`log.dirs`).
    pub kafka_data_dir: PathBuf,
    /// Kafka's jars, for its own command-line tools.
    pub kafka_lib: PathBuf,
}

impl SecureStack {
    pub fn from_env() -> Self {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
        let state = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.state");
        let path =
            |name: &str, default: PathBuf| std::env::var_os(name).map_or(default, PathBuf::from);
        Self {
            sasl_ssl: var("AUDIT_TEST_KAFKA_SASL_SSL_BROKERS", "127.0.0.1:19094"),
            ssl: var("AUDIT_TEST_KAFKA_SSL_BROKERS", "127.0.0.1:19095"),
            sasl_plaintext: var("AUDIT_TEST_KAFKA_SASL_PLAINTEXT_BROKERS", "127.0.0.1:19096"),
            clickhouse_https: var("AUDIT_TEST_CLICKHOUSE_HTTPS_URL", "https://127.0.0.1:18443"),
            user: var("AUDIT_TEST_KAFKA_SASL_USER", "audit"),
            password: var("AUDIT_TEST_KAFKA_SASL_PASSWORD", "audit-local-secret"),
            tls_dir: path("AUDIT_TEST_TLS_DIR", state.join("tls")),
            kafka_data_dir: path("AUDIT_TEST_KAFKA_DATA_DIR", state.join("kafka/data")),
            kafka_lib: path("AUDIT_TEST_KAFKA_LIB", state.join("kafka-4.1.1/lib")),
        }
    }

    /// A file of `tls_dir`.
    pub fn tls(&self, name: &str) -> PathBuf {
        self.tls_dir.join(name)
    }
}

/// Settings for a test database named `database` on the ClickHouse of the tests: one server at
/// [`clickhouse_url`], or the shards of a cluster when `AUDIT_TEST_CLICKHOUSE_CLUSTER` names
/// one (replicated, unless `AUDIT_TEST_CLICKHOUSE_CLUSTER_NODES` lists the HTTP URL of every
/// server: then shards of one server each, see `deploy/local/test.sh`).
pub fn clickhouse_config(database: String) -> ClickHouseConfig {
    let cluster = std::env::var("AUDIT_TEST_CLICKHOUSE_CLUSTER").unwrap_or_default();
    let cluster_nodes: Vec<String> = std::env::var("AUDIT_TEST_CLICKHOUSE_CLUSTER_NODES")
        .unwrap_or_default()
        .split(',')
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect();
    ClickHouseConfig {
        url: clickhouse_url(),
        database,
        cluster,
        cluster_replicated: cluster_nodes.is_empty(),
        cluster_nodes,
        ..ClickHouseConfig::default()
    }
}

/// Every server of the cluster the tests run on, as settings bound to `config`'s database: the
/// one server, the shards of `AUDIT_TEST_CLICKHOUSE_CLUSTER_NODES`, or for a replicated cluster
/// each of `AUDIT_TEST_CLICKHOUSE_REPLICATED_SERVERS` (`deploy/local/clickhouse-replicated.sh`).
pub fn servers(config: &ClickHouseConfig) -> Vec<ClickHouseConfig> {
    match config.topology() {
        audit_store::Topology::Replicated { .. } => {
            std::env::var("AUDIT_TEST_CLICKHOUSE_REPLICATED_SERVERS")
                .expect("a replicated test cluster lists its servers in AUDIT_TEST_CLICKHOUSE_REPLICATED_SERVERS")
                .split(',')
                .map(|url| ClickHouseConfig {
                    url: url.to_owned(),
                    ..config.clone()
                })
                .collect()
        }
        _ => config.every_server(),
    }
}

/// Drops `database` on every server of `config` (whatever `config.database` names).
pub async fn drop_database(
    config: &ClickHouseConfig,
    database: &str,
) -> Result<(), audit_store::clickhouse::error::Error> {
    let sql = format!(
        "DROP DATABASE IF EXISTS {database}{}",
        config.topology().on_cluster()
    );
    for server in config.every_server() {
        server.server_client().query(&sql).execute().await?;
    }
    Ok(())
}

/// `target/release/<name>` of this workspace; panics with the build command when missing.
pub fn release_binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/release")
        .join(name);
    assert!(
        path.exists(),
        "{} missing: run `cargo build --release --bins` first",
        path.display()
    );
    path
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`: resident now, `VmHWM`: peak resident), in
/// kB; None once the process is gone.
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
}

/// CPU time (user + system) a live process has used so far, in seconds, from `/proc/<pid>/stat`
/// (whose clock ticks are USER_HZ, 100 per second on Linux).
pub fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// The `p` quantile (0..=1, nearest rank) of already sorted values; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 0.5), 51.0);
        assert_eq!(percentile(&sorted, 0.99), 99.0);
        assert_eq!(percentile(&sorted, 1.0), 100.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn reads_this_process_memory() {
        let pid = std::process::id();
        let now = proc_status_kb(pid, "VmRSS").expect("VmRSS of a live process");
        let peak = proc_status_kb(pid, "VmHWM").expect("VmHWM of a live process");
        assert!(now > 0 && peak >= now, "VmRSS {now} kB, VmHWM {peak} kB");
        assert_eq!(proc_status_kb(pid, "NoSuchField"), None);
    }
}
