//! Response bodies streamed from a ClickHouse cursor: rows are encoded into chunks of about
//! 64 KiB as the client reads, so memory stays flat whatever the result size. A client that
//! goes away drops the body, which drops the cursor and its connection: ClickHouse stops the
//! query when it can no longer write the result. A failure after the head was sent aborts the
//! body (the client sees a broken transfer, never a silently short file). CSV pages stream this
//! way; exports (`crate::export`) use the same encoder and twin check.

use axum::body::Body;
use bytes::Bytes;
use futures_util::{stream, Stream};
use tracing::error;

use crate::metrics::ApiMetrics;
use crate::query::BodyFormat;
use crate::render::{write_csv_row, EventItem, CSV_HEADER};
use crate::store::{EventCursor, EventRecord, ReadError};

pub(crate) const CHUNK_BYTES: usize = 64 * 1024;

/// Encodes rows into the next chunk.
pub(crate) struct Encoder {
    format: BodyFormat,
    /// CSV: a writer over the chunk being filled, rebuilt after each chunk.
    csv: csv::Writer<Vec<u8>>,
    /// NDJSON: the chunk being filled.
    ndjson: Vec<u8>,
    /// CSV: the `changes` cell of the row being written.
    scratch: Vec<u8>,
}

fn csv_writer() -> csv::Writer<Vec<u8>> {
    csv_writer_over(Vec::with_capacity(CHUNK_BYTES + 4096))
}

fn csv_writer_over(buffer: Vec<u8>) -> csv::Writer<Vec<u8>> {
    csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(buffer)
}

impl Encoder {
    pub(crate) fn new(format: BodyFormat) -> Self {
        Self {
            format,
            csv: csv_writer(),
            ndjson: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// An encoder whose buffer is allocated once at `bytes` (the pages the rows never reach
    /// stay untouched): grown by doubling instead, it would hold the old and the new copy at once.
    pub(crate) fn with_capacity(format: BodyFormat, bytes: usize) -> Self {
        let mut encoder = Self::new(format);
        match format {
            BodyFormat::Csv => encoder.csv = csv_writer_over(Vec::with_capacity(bytes)),
            BodyFormat::Ndjson => encoder.ndjson = Vec::with_capacity(bytes),
        }
        encoder
    }

    pub(crate) fn header(&mut self) -> std::io::Result<()> {
        if self.format == BodyFormat::Csv {
            self.csv.write_record(CSV_HEADER)?;
        }
        Ok(())
    }

    pub(crate) fn row(&mut self, record: &EventRecord<'_>) -> std::io::Result<()> {
        match self.format {
            BodyFormat::Csv => write_csv_row(&mut self.csv, record, &mut self.scratch)?,
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
    pub(crate) fn len(&self) -> usize {
        match self.format {
            BodyFormat::Csv => self.csv.get_ref().len(),
            BodyFormat::Ndjson => self.ndjson.len(),
        }
    }

    /// Bytes encoded so far, exactly (CSV: flushes the writer's buffer first).
    pub(crate) fn flushed_len(&mut self) -> std::io::Result<usize> {
        if self.format == BodyFormat::Csv {
            self.csv.flush()?;
        }
        Ok(self.len())
    }

    /// Everything encoded so far (CSV: after flushing the writer's buffer).
    pub(crate) fn bytes(&mut self) -> std::io::Result<&[u8]> {
        if self.format == BodyFormat::Csv {
            self.csv.flush()?;
            return Ok(self.csv.get_ref());
        }
        Ok(&self.ndjson)
    }

    /// Empties the encoder and keeps its buffer: a window's worth of rows is encoded into the
    /// same memory window after window.
    pub(crate) fn clear(&mut self) -> std::io::Result<()> {
        match self.format {
            BodyFormat::Csv => {
                let writer = std::mem::replace(&mut self.csv, csv_writer_over(Vec::new()));
                let mut buffer = writer.into_inner().map_err(|err| err.into_error())?;
                buffer.clear();
                self.csv = csv_writer_over(buffer);
            }
            BodyFormat::Ndjson => self.ndjson.clear(),
        }
        Ok(())
    }

    pub(crate) fn take(&mut self) -> std::io::Result<Bytes> {
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
    cursor: Option<EventCursor>,
    format: BodyFormat,
    metrics: ApiMetrics,
) -> Result<Body, StreamError> {
    Ok(Body::from_stream(
        open_chunks(cursor, format, metrics).await?,
    ))
}

/// The chunks for `cursor` (None: no rows), after reading and encoding its first row (see
/// [`start`]).
async fn open_chunks(
    cursor: Option<EventCursor>,
    format: BodyFormat,
    metrics: ApiMetrics,
) -> Result<impl Stream<Item = std::io::Result<Bytes>>, StreamError> {
    let mut rows = CursorChunks::new(cursor, format);
    rows.encoder.header().map_err(StreamError::Encode)?;
    rows.next_row().await?;
    Ok(chunks(rows, metrics))
}

/// (time, id) of the last row written: rows arrive sorted, so a re-delivery not merged yet comes
/// right after its twin and is skipped. The id's buffer is reused row after row.
#[derive(Default)]
struct LastKey(Option<(i64, String)>);

impl LastKey {
    /// Whether (`time`, `id`) is the last row's key; else it becomes the last row's key.
    fn repeats(&mut self, time: i64, id: &str) -> bool {
        match &mut self.0 {
            Some((t, last)) if *t == time && last == id => return true,
            Some((t, last)) => {
                *t = time;
                last.clear();
                last.push_str(id);
            }
            None => self.0 = Some((time, id.to_owned())),
        }
        false
    }
}

/// Why a streamed body (a CSV page or an export) failed, in the streaming layer's terms; the
/// HTTP layer maps it to an answer (`impl From<StreamError> for ApiError`).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Store(#[from] ReadError),
    #[error("cannot encode a row: {0}")]
    Encode(#[from] std::io::Error),
    #[error("cannot start an export thread: {0}")]
    Spawn(std::io::Error),
    #[error("the client went away")]
    Gone,
    #[error("an export reader ended early")]
    ReaderEnded,
}

impl From<audit_store::clickhouse::error::Error> for StreamError {
    fn from(err: audit_store::clickhouse::error::Error) -> Self {
        StreamError::Store(ReadError::from(err))
    }
}

/// Rows of a cursor that arrive in the body's order (CSV pages, windows ClickHouse sorted),
/// encoded chunk by chunk, re-deliveries dropped.
pub(crate) struct CursorChunks {
    cursor: Option<EventCursor>,
    encoder: Encoder,
    /// The cursor is exhausted (or failed).
    done: bool,
    /// The chunk holding the last rows was taken.
    finished: bool,
    last: LastKey,
    /// Rows encoded into the chunk being filled.
    rows: u64,
}

impl CursorChunks {
    pub(crate) fn new(cursor: Option<EventCursor>, format: BodyFormat) -> Self {
        Self {
            cursor,
            encoder: Encoder::new(format),
            done: false,
            finished: false,
            last: LastKey::default(),
            rows: 0,
        }
    }

    /// Reads the next row and encodes it unless it is a twin of the last; `done` at the end.
    async fn next_row(&mut self) -> Result<(), StreamError> {
        let Some(cursor) = self.cursor.as_mut() else {
            self.done = true;
            return Ok(());
        };
        let Some(record) = cursor.next().await.map_err(StreamError::from)? else {
            self.done = true;
            return Ok(());
        };
        if self.last.repeats(record.occurred_at_ms, record.id) {
            return Ok(());
        }
        self.encoder.row(&record).map_err(StreamError::Encode)?;
        self.rows += 1;
        Ok(())
    }

    /// The next chunk of about [`CHUNK_BYTES`] and the rows in it (the last may be empty);
    /// None once the last was taken or a read failed.
    pub(crate) async fn chunk(&mut self) -> Option<Result<(Bytes, u64), StreamError>> {
        if self.finished {
            return None;
        }
        let mut filled = Ok(());
        while filled.is_ok() && !self.done && self.encoder.len() < CHUNK_BYTES {
            filled = self.next_row().await;
        }
        self.finished = self.done || filled.is_err();
        let chunk = filled.and_then(|()| self.encoder.take().map_err(StreamError::Encode));
        Some(chunk.map(|bytes| (bytes, std::mem::take(&mut self.rows))))
    }
}

/// What a body whose response has started yields when the store fails: the failure is logged,
/// and the error ends the body without its last chunk, so the client sees it cut short.
pub(crate) fn failed_mid_stream(err: &dyn std::fmt::Display) -> std::io::Error {
    error!(error = %err, "a streamed body failed after the response started");
    std::io::Error::other("the audit log store failed mid-stream")
}

/// The encoded chunks of `rows`, counted in the metrics.
fn chunks(rows: CursorChunks, metrics: ApiMetrics) -> impl Stream<Item = std::io::Result<Bytes>> {
    let label = rows.encoder.format.label();
    stream::unfold(rows, move |mut rows| {
        let metrics = metrics.clone();
        async move {
            let chunk = match rows.chunk().await? {
                Ok((bytes, n)) => {
                    metrics.observe_streamed(label, n, bytes.len());
                    Ok(bytes)
                }
                Err(StreamError::Encode(err)) => Err(err),
                Err(err) => Err(failed_mid_stream(&err)),
            };
            Some((chunk, rows))
        }
    })
}
