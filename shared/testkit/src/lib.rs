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

/// Drops `database` on the server of `config` (whatever `config.database` names).
pub async fn drop_database(
    config: &ClickHouseConfig,
    database: &str,
) -> Result<(), audit_store::clickhouse::error::Error> {
    config
        .server_client()
        .query(&format!("DROP DATABASE IF EXISTS {database}"))
        .execute()
        .await
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
