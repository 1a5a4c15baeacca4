//! Response bodies streamed from a ClickHouse cursor: rows are encoded into chunks of about
//! 64 KiB as the client reads, so memory stays flat whatever the result size. A client that
//! goes away drops the body, which drops the cursor and its connection: ClickHouse stops the
//! query when it can no longer write the result. A failure after the head was sent aborts the
//! body (the client sees a broken transfer, never a silently short file).

use axum::body::Body;
use bytes::Bytes;
use futures_util::{stream, Stream};
use tracing::error;

use crate::error::{from_clickhouse, ApiError};
use crate::metrics::ApiMetrics;
use crate::query::SortOrder;
use crate::render::{write_csv_row, EventItem, CSV_HEADER};
use crate::store::{EventCursor, EventRecord, ExportSource};
use crate::windows::{self, Window};

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
    fn new(format: BodyFormat) -> Self {
        Self {
            format,
            csv: csv_writer(),
            ndjson: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// An encoder whose buffer is allocated once at `bytes` (the pages the rows never reach
    /// stay untouched): grown by doubling instead, it would hold the old and the new copy at once.
    fn with_capacity(format: BodyFormat, bytes: usize) -> Self {
        let mut encoder = Self::new(format);
        match format {
            BodyFormat::Csv => encoder.csv = csv_writer_over(Vec::with_capacity(bytes)),
            BodyFormat::Ndjson => encoder.ndjson = Vec::with_capacity(bytes),
        }
        encoder
    }

    fn header(&mut self) -> std::io::Result<()> {
        if self.format == BodyFormat::Csv {
            self.csv.write_record(CSV_HEADER)?;
        }
        Ok(())
    }

    fn row(&mut self, record: &EventRecord<'_>) -> std::io::Result<()> {
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
    fn len(&self) -> usize {
        match self.format {
            BodyFormat::Csv => self.csv.get_ref().len(),
            BodyFormat::Ndjson => self.ndjson.len(),
        }
    }

    /// Bytes encoded so far, exactly (CSV: flushes the writer's buffer first).
    fn flushed_len(&mut self) -> std::io::Result<usize> {
        if self.format == BodyFormat::Csv {
            self.csv.flush()?;
        }
        Ok(self.len())
    }

    /// Everything encoded so far (CSV: after flushing the writer's buffer).
    fn bytes(&mut self) -> std::io::Result<&[u8]> {
        if self.format == BodyFormat::Csv {
            self.csv.flush()?;
            return Ok(self.csv.get_ref());
        }
        Ok(&self.ndjson)
    }

    /// Empties the encoder and keeps its buffer: a window's worth of rows is encoded into the
    /// same memory window after window.
    fn clear(&mut self) -> std::io::Result<()> {
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
    cursor: Option<EventCursor>,
    format: BodyFormat,
    metrics: ApiMetrics,
) -> Result<Body, ApiError> {
    Ok(Body::from_stream(
        open_chunks(cursor, format, metrics).await?,
    ))
}

/// An export's body, read and encoded on a thread of its own with a single-threaded runtime:
/// the HTTP client's connection task and the encoder then never wake each other across threads
/// (on 2 cores those wake-ups were a third of an export's CPU). `open` runs on that thread, so
/// the queries' connections live there too. The export's hours are counted before the head is
/// sent, so that a store that fails at once gets its proper error status; then its windows
/// (see [`windows::plan`]) are read one after the other. Encoded chunks reach the response
/// through a channel of two; a client that goes away closes it, which ends the thread and drops
/// the query being read.
pub async fn start_detached(
    open: impl FnOnce() -> ExportSource + Send + 'static,
    format: BodyFormat,
    metrics: ApiMetrics,
) -> Result<Body, ApiError> {
    let (head_tx, head_rx) = tokio::sync::oneshot::channel::<Result<(), ApiError>>();
    let (chunk_tx, chunk_rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(2);
    let thread = std::thread::Builder::new()
        .name("audit-api-export".to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let runtime = match runtime {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = head_tx.send(Err(ApiError::Internal(err.to_string())));
                    return;
                }
            };
            runtime.block_on(async move {
                let source = open();
                let windows = match source.hours().await {
                    Ok(hours) => windows::plan(&hours, source.sort, source.window_rows),
                    Err(err) => {
                        let _ = head_tx.send(Err(err));
                        return;
                    }
                };
                if head_tx.send(Ok(())).is_err() {
                    return;
                }
                let mut sink = Sink::new(chunk_tx, format, metrics);
                match export_windows(&source, &windows, format, &mut sink).await {
                    Ok(()) | Err(ExportError::Gone) => {}
                    Err(err) => {
                        error!(error = %err, "export stream failed after the response started");
                        let failed = std::io::Error::other("the audit log store failed mid-stream");
                        let _ = sink.tx.send(Err(failed)).await;
                    }
                }
            });
        });
    thread.map_err(|err| ApiError::Internal(format!("cannot start an export thread: {err}")))?;
    head_rx
        .await
        .map_err(|_| ApiError::Internal("the export thread ended before the head".to_owned()))??;
    let chunks = stream::unfold(chunk_rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    Ok(Body::from_stream(chunks))
}

#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("the client went away")]
    Gone,
    #[error("{0}")]
    Store(#[from] audit_store::clickhouse::error::Error),
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error("cannot encode a row: {0}")]
    Encode(#[from] std::io::Error),
}

/// Writes the header, then every window in order.
async fn export_windows(
    source: &ExportSource,
    windows: &[Window],
    format: BodyFormat,
    sink: &mut Sink,
) -> Result<(), ExportError> {
    let mut encoder = Encoder::new(format);
    encoder.header()?;
    // Goes out with the first rows: a body's first chunk means its query answered.
    sink.push(encoder.bytes()?, 0).await?;
    encoder.clear()?;
    let mut held = WindowRows::default();
    // Windows are encoded into an encoder of their own, whose buffer is kept between windows.
    let mut window_encoder = Encoder::with_capacity(format, WINDOW_BYTES + (1 << 20));
    for window in windows {
        if !window.sorted {
            let cursor = source.rows(window.from_ms, window.to_ms, false)?;
            let complete = held.read(cursor, &mut window_encoder).await?;
            if complete {
                let encoded = window_encoder.bytes()?;
                for range in held.in_order(source.sort) {
                    sink.push(&encoded[range], 1).await?;
                }
            }
            window_encoder.clear()?;
            if complete {
                continue;
            }
        }
        // More than a window may hold: ClickHouse sorts it, rows go out as they come.
        let mut cursor = source.rows(window.from_ms, window.to_ms, true)?;
        let mut last = Twins::default();
        let mut rows = 0;
        while let Some(record) = cursor.next().await? {
            if last.repeats(record.occurred_at_ms, record.id) {
                continue;
            }
            encoder.row(&record)?;
            rows += 1;
            if encoder.len() >= CHUNK_BYTES {
                sink.send(encoder.take()?, std::mem::take(&mut rows))
                    .await?;
            }
        }
        sink.send(encoder.take()?, rows).await?;
    }
    sink.flush().await
}

/// Largest encoded size of a window held in memory. A window whose rows come to more (rows far
/// larger than usual) is read again, sorted by ClickHouse.
const WINDOW_BYTES: usize = 24 << 20;

/// One window's rows, encoded as they arrive in storage order, with their keys to put them in
/// the export's order.
#[derive(Default)]
struct WindowRows {
    keys: Vec<RowKey>,
    /// The ids of `keys`, end to end.
    ids: Vec<u8>,
}

struct RowKey {
    occurred_at_ms: i64,
    id: std::ops::Range<usize>,
    encoded: std::ops::Range<usize>,
}

impl WindowRows {
    /// Reads and encodes every row of `cursor` into `encoder`; false past [`WINDOW_BYTES`].
    async fn read(
        &mut self,
        mut cursor: EventCursor,
        encoder: &mut Encoder,
    ) -> Result<bool, ExportError> {
        self.keys.clear();
        self.ids.clear();
        let mut start = 0;
        while let Some(record) = cursor.next().await? {
            encoder.row(&record)?;
            let end = encoder.flushed_len()?;
            if end > WINDOW_BYTES {
                return Ok(false);
            }
            let id_start = self.ids.len();
            self.ids.extend_from_slice(record.id.as_bytes());
            self.keys.push(RowKey {
                occurred_at_ms: record.occurred_at_ms,
                id: id_start..self.ids.len(),
                encoded: start..end,
            });
            start = end;
        }
        Ok(true)
    }

    /// Where each row lies in the encoded window, in `sort` order by (time, id), twins left out
    /// (a re-delivery not merged yet has the key of the event it repeats).
    fn in_order(&mut self, sort: SortOrder) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        let ids = &self.ids;
        let key = |k: &RowKey| (k.occurred_at_ms, &ids[k.id.clone()]);
        // Rows of one part arrive in ascending key order: sorting (or reversing) them is linear.
        self.keys.sort_unstable_by(|a, b| match sort {
            SortOrder::Asc => key(a).cmp(&key(b)),
            SortOrder::Desc => key(b).cmp(&key(a)),
        });
        let keys = &self.keys;
        keys.iter().enumerate().filter_map(move |(i, k)| {
            let twin = i > 0 && key(&keys[i - 1]) == key(k);
            (!twin).then(|| k.encoded.clone())
        })
    }
}

/// The response side of an export: rows go out in chunks of about [`CHUNK_BYTES`].
struct Sink {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    chunk: Vec<u8>,
    /// Rows in `chunk`.
    rows: u64,
    label: &'static str,
    metrics: ApiMetrics,
}

impl Sink {
    fn new(
        tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
        format: BodyFormat,
        metrics: ApiMetrics,
    ) -> Self {
        Self {
            tx,
            chunk: Vec::with_capacity(CHUNK_BYTES + 4096),
            rows: 0,
            label: format.label(),
            metrics,
        }
    }

    /// Adds `rows` encoded rows.
    async fn push(&mut self, bytes: &[u8], rows: u64) -> Result<(), ExportError> {
        self.chunk.extend_from_slice(bytes);
        self.rows += rows;
        if self.chunk.len() >= CHUNK_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends what is pending, then `bytes` holding `rows` encoded rows.
    async fn send(&mut self, bytes: Bytes, rows: u64) -> Result<(), ExportError> {
        self.flush().await?;
        self.chunk_out(bytes, rows).await
    }

    async fn flush(&mut self) -> Result<(), ExportError> {
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK_BYTES + 4096));
        let rows = std::mem::take(&mut self.rows);
        self.chunk_out(Bytes::from(chunk), rows).await
    }

    async fn chunk_out(&mut self, bytes: Bytes, rows: u64) -> Result<(), ExportError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.metrics
            .rows_streamed
            .with_label_values(&[self.label])
            .inc_by(rows);
        self.metrics
            .bytes_streamed
            .with_label_values(&[self.label])
            .inc_by(bytes.len() as u64);
        self.tx.send(Ok(bytes)).await.map_err(|_| ExportError::Gone)
    }
}

/// The chunks for `cursor` (None: no rows), after reading and encoding its first row (see
/// [`start`]).
async fn open_chunks(
    cursor: Option<EventCursor>,
    format: BodyFormat,
    metrics: ApiMetrics,
) -> Result<impl Stream<Item = std::io::Result<Bytes>>, ApiError> {
    let mut state = State {
        cursor,
        encoder: Encoder::new(format),
        done: false,
        sent_last: false,
        metrics,
        last: Twins::default(),
        rows: 0,
    };
    state
        .encoder
        .header()
        .map_err(|err| ApiError::Internal(format!("cannot encode a row: {err}")))?;
    state.next_row().await.map_err(|err| match err {
        RowError::Store(err) => from_clickhouse(&err),
        RowError::Encode(err) => ApiError::Internal(format!("cannot encode a row: {err}")),
    })?;
    Ok(chunks(state))
}

/// (time, id) of the last row written: rows arrive sorted, so a re-delivery not merged yet comes
/// right after its twin and is skipped. The id's buffer is reused row after row.
#[derive(Default)]
struct Twins(Option<(i64, String)>);

impl Twins {
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

enum RowError {
    Store(audit_store::clickhouse::error::Error),
    Encode(std::io::Error),
}

struct State {
    cursor: Option<EventCursor>,
    encoder: Encoder,
    /// The cursor is exhausted (or failed).
    done: bool,
    /// The chunk holding the last rows went out.
    sent_last: bool,
    metrics: ApiMetrics,
    last: Twins,
    /// Rows encoded into the chunk being filled.
    rows: u64,
}

impl State {
    /// Reads the next row and encodes it unless it is a twin of the last; `done` at the end.
    async fn next_row(&mut self) -> Result<(), RowError> {
        let Some(cursor) = self.cursor.as_mut() else {
            self.done = true;
            return Ok(());
        };
        let Some(record) = cursor.next().await.map_err(RowError::Store)? else {
            self.done = true;
            return Ok(());
        };
        if self.last.repeats(record.occurred_at_ms, record.id) {
            return Ok(());
        }
        self.encoder.row(&record).map_err(RowError::Encode)?;
        self.rows += 1;
        Ok(())
    }
}

/// The encoded chunks of `state`, about [`CHUNK_BYTES`] each.
fn chunks(state: State) -> impl Stream<Item = std::io::Result<Bytes>> {
    stream::unfold(state, |mut s| async move {
        if s.sent_last {
            return None;
        }
        let label = s.encoder.format.label();
        let mut result = Ok(());
        while !s.done && s.encoder.len() < CHUNK_BYTES {
            if let Err(err) = s.next_row().await {
                result = Err(match err {
                    RowError::Store(err) => {
                        error!(error = %err, "export stream failed after the response started");
                        std::io::Error::other("the audit log store failed mid-stream")
                    }
                    RowError::Encode(err) => err,
                });
                break;
            }
        }
        s.sent_last = s.done || result.is_err();
        match result.and_then(|()| s.encoder.take()) {
            Ok(chunk) => {
                let rows = std::mem::take(&mut s.rows);
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
                s.sent_last = true;
                Some((Err(err), s))
            }
        }
    })
}
