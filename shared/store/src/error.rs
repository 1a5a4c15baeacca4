//! Errors of the storage layer.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid clickhouse configuration: {0}")]
    Config(String),
    #[error("clickhouse request failed while {doing}: {source}")]
    ClickHouse {
        doing: String,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error(
        "migration {version} ({name}) was changed after it was applied \
         (stored checksum {stored}, file checksum {current}); restore the released file and add a new migration"
    )]
    MigrationChanged {
        version: u32,
        name: &'static str,
        stored: String,
        current: String,
    },
    #[error("the database has migration {version}, which this build does not know; deploy a newer build")]
    UnknownMigration { version: u32 },
    #[error(
        "the schema is behind: migrations {pending:?} are pending and applying them is disabled"
    )]
    SchemaBehind { pending: Vec<u32> },
}

impl StoreError {
    pub(crate) fn clickhouse(
        doing: impl Into<String>,
    ) -> impl FnOnce(clickhouse::error::Error) -> Self {
        let doing = doing.into();
        move |source| StoreError::ClickHouse { doing, source }
    }
}

/// The exception code of a ClickHouse error answer: `Code: 159, e.displayText() = ...` on
/// 18.16, `Code: 159. DB::Exception: ...` on later versions. None for an answer without one
/// (an HTTP gateway's page, say).
pub fn exception_code(message: &str) -> Option<u32> {
    let (_, rest) = message.split_once("Code: ")?;
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..digits].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::exception_code;

    #[test]
    fn exception_codes_read_in_both_server_forms() {
        assert_eq!(
            exception_code("Code: 159, e.displayText() = DB::Exception: Timeout exceeded"),
            Some(159)
        );
        assert_eq!(
            exception_code("Code: 27. DB::Exception: Cannot parse input"),
            Some(27)
        );
        assert_eq!(exception_code("<html>502 Bad Gateway</html>"), None);
        assert_eq!(exception_code("Code: x"), None);
    }
}
