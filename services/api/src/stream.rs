//! Response bodies streamed from a ClickHouse cursor: rows are encoded into chunks of about
//! 64 KiB as the client reads, so memory stays flat whatever the result size. A client that
//! goes away drops the body, which drops the cursor and its connection: ClickHouse stops the
//! query when it can no longer write the result. A failure after the head was sent aborts the
//! body (the client sees a broken transfer, never a silently short file).

use axum::body::Body;
use bytes::Bytes;
use futures_util::stream;
use tracing::error;

use audit_store::clickhouse::query::RowCursor;

use crate::error::{from_clickhouse, ApiError};
use crate::metrics::ApiMetrics;
use crate::render::{write_csv_row, EventItem, CSV_HEADER};
use crate::store::EventRecord;

const CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Csv,
    Ndjson,
}

impl BodyFormat {
    /// The metrics label, which is also the file extension.
    pub fn label(self) -> &'static str {
        match self {
            BodyFormat::Csv => "csv",
            BodyFormat::Ndjson => "ndjson",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            BodyFormat::Csv => "text/csv; charset=utf-8",
            BodyFormat::Ndjson => "application/x-ndjson",
        }
    }
}

/// Encodes rows into the next chunk.
struct Encoder {
    format: BodyFormat,
    /// CSV: a writer over the chunk being filled, rebuilt after each chunk.
    csv: csv::Writer<Vec<u8>>,
    /// NDJSON: the chunk being filled.
    ndjson: Vec<u8>,
}

fn csv_writer() -> csv::Writer<Vec<u8>> {
    csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::with_capacity(CHUNK_BYTES + 4096))
}

impl Encoder {
    fn new(format: BodyFormat) -> Self {
        Self {
            format,
            csv: csv_writer(),
            ndjson: Vec::new(),
        }
    }

    fn header(&mut self) -> std::io::Result<()> {
        if self.format == BodyFormat::Csv {
            self.csv.write_record(CSV_HEADER)?;
        }
        Ok(())
    }

    fn row(&mut self, record: EventRecord) -> std::io::Result<()> {
        match self.format {
            BodyFormat::Csv => write_csv_row(&mut self.csv, &record)?,
            BodyFormat::Ndjson => {
                serde_json::to_writer(&mut self.ndjson, &EventItem::from(record))?;
                self.ndjson.push(b'\n');
            }
        }
        Ok(())
    }

    /// Bytes in the chunk so far. For CSV this leaves out what the writer still buffers (at most
    /// its 8 KiB buffer), which only makes chunks that much larger: flushing per row to measure
    /// exactly would copy every row twice.
    fn len(&self) -> usize {
        match self.format {
            BodyFormat::Csv => self.csv.get_ref().len(),
            BodyFormat::Ndjson => self.ndjson.len(),
        }
    }

    fn take(&mut self) -> std::io::Result<Bytes> {
        match self.format {
            BodyFormat::Csv => {
                let writer = std::mem::replace(&mut self.csv, csv_writer());
                let bytes = writer.into_inner().map_err(|err| err.into_error())?;
                Ok(Bytes::from(bytes))
            }
            BodyFormat::Ndjson => Ok(Bytes::from(std::mem::take(&mut self.ndjson))),
        }
    }
}

/// The body for `cursor` (None: no rows). Its first row is read here, before the head is sent,
/// so that a query that fails at once gets its proper error status instead of a broken 200.
pub async fn start(
    cursor: Option<RowCursor<EventRecord>>,
    format: BodyFormat,
    metrics: ApiMetrics,
) -> Result<Body, ApiError> {
    let (cursor, first) = match cursor {
        Some(mut cursor) => {
            let first = cursor.next().await.map_err(|err| from_clickhouse(&err))?;
            (Some(cursor), first)
        }
        None => (None, None),
    };
    Ok(body(cursor, first, format, metrics))
}

/// The body for `cursor`, whose first row (already read) is `first`.
fn body(
    cursor: Option<RowCursor<EventRecord>>,
    first: Option<EventRecord>,
    format: BodyFormat,
    metrics: ApiMetrics,
) -> Body {
    struct State {
        cursor: Option<RowCursor<EventRecord>>,
        pending: Option<EventRecord>,
        encoder: Encoder,
        started: bool,
        done: bool,
        metrics: ApiMetrics,
        /// (time, id) of the last row written: rows arrive sorted, so a re-delivery not merged
        /// yet comes right after its twin and is skipped.
        last: Option<(i64, String)>,
    }
    let state = State {
        cursor,
        pending: first,
        encoder: Encoder::new(format),
        started: false,
        done: false,
        metrics,
        last: None,
    };
    let chunks = stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let label = s.encoder.format.label();
        let mut rows = 0u64;
        let result: std::io::Result<()> = async {
            if !s.started {
                s.started = true;
                s.encoder.header()?;
            }
            if let Some(record) = s.pending.take() {
                s.last = Some((record.occurred_at_ms, record.id.clone()));
                s.encoder.row(record)?;
                rows += 1;
            }
            while s.encoder.len() < CHUNK_BYTES {
                let Some(cursor) = s.cursor.as_mut() else {
                    s.done = true;
                    break;
                };
                match cursor.next().await {
                    Ok(Some(record)) => {
                        let twin = s
                            .last
                            .as_ref()
                            .is_some_and(|(t, id)| *t == record.occurred_at_ms && *id == record.id);
                        if !twin {
                            s.last = Some((record.occurred_at_ms, record.id.clone()));
                            s.encoder.row(record)?;
                            rows += 1;
                        }
                    }
                    Ok(None) => {
                        s.done = true;
                        break;
                    }
                    Err(err) => {
                        error!(error = %err, "export stream failed after the response started");
                        return Err(std::io::Error::other(
                            "the audit log store failed mid-stream",
                        ));
                    }
                }
            }
            Ok(())
        }
        .await;
        match result.and_then(|()| s.encoder.take()) {
            Ok(chunk) => {
                s.metrics
                    .rows_streamed
                    .with_label_values(&[label])
                    .inc_by(rows);
                s.metrics
                    .bytes_streamed
                    .with_label_values(&[label])
                    .inc_by(chunk.len() as u64);
                Some((Ok::<Bytes, std::io::Error>(chunk), s))
            }
            Err(err) => {
                s.done = true;
                Some((Err(err), s))
            }
        }
    });
    Body::from_stream(chunks)
}
