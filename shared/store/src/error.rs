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
