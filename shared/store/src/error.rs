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

/// What a failed ClickHouse request means, the one classification both services act on: the
/// ingest retries all but [`Failure::Rejected`]; the API answers 503, 504 or 500.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Not reachable, or there but unable to answer now (network, overload, memory, an HTTP
    /// gateway's answer without a ClickHouse code).
    Unavailable,
    /// The query ran past its time limit.
    Timeout,
    /// ClickHouse refused the data itself (type, parse or size errors): no retry can help.
    Rejected,
    /// Anything else ClickHouse answered with an error code (a statement it refuses, say).
    Other,
}

/// ClickHouse error codes that mean "this data is wrong", from ClickHouse's ErrorCodes.
const DATA_ERROR_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  // CANNOT_READ_ALL_DATA
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
];

/// Classifies an error of the `clickhouse` crate (see [`Failure`]).
pub fn classify(error: &clickhouse::error::Error) -> Failure {
    use clickhouse::error::Error;
    match error {
        Error::Network(_) | Error::TimedOut => Failure::Unavailable,
        Error::BadResponse(message) => match exception_code(message) {
            // TIMEOUT_EXCEEDED, TOO_SLOW (estimated time over the limit).
            Some(159 | 160) => Failure::Timeout,
            // TOO_MANY_SIMULTANEOUS_QUERIES, MEMORY_LIMIT_EXCEEDED, and answers without a code.
            Some(202 | 241) | None => Failure::Unavailable,
            Some(code) if DATA_ERROR_CODES.contains(&code) => Failure::Rejected,
            Some(_) => Failure::Other,
        },
        // Rows the client could not encode.
        Error::SequenceMustHaveLength | Error::Custom(_) | Error::InvalidUtf8Encoding(_) => {
            Failure::Rejected
        }
        _ => Failure::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::{classify, exception_code, Failure};
    use clickhouse::error::Error;

    #[test]
    fn failures_are_classified_in_both_server_forms() {
        for (text, failure) in [
            (
                "Code: 159, e.displayText() = DB::Exception: Timeout exceeded",
                Failure::Timeout,
            ),
            (
                "Code: 159. DB::Exception: Timeout exceeded: elapsed 10.1 seconds",
                Failure::Timeout,
            ),
            (
                "Code: 202. DB::Exception: Too many simultaneous queries",
                Failure::Unavailable,
            ),
            ("502 Bad Gateway", Failure::Unavailable),
            (
                "Code: 27, e.displayText() = DB::Exception: Cannot parse input",
                Failure::Rejected,
            ),
            ("Code: 53. DB::Exception: Type mismatch", Failure::Rejected),
            ("Code: 62. DB::Exception: Syntax error", Failure::Other),
        ] {
            assert_eq!(
                classify(&Error::BadResponse(text.into())),
                failure,
                "{text}"
            );
        }
        assert_eq!(classify(&Error::TimedOut), Failure::Unavailable);
        assert_eq!(
            classify(&Error::Custom("bad row".into())),
            Failure::Rejected
        );
    }

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
