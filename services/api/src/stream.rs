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

/// Threads reading an export's windows side by side: window k is read by reader k % READERS,
/// so one reader fetches and encodes the next window while the response sends the other's.
const READERS: usize = 2;

/// What a reader hands the response, window after window.
enum Piece {
    /// Encoded rows (`.1` of them), in order.
    Rows(Bytes, u64),
    /// The reader's current window is complete.
    WindowEnd,
    Failed(ExportError),
}

/// An export's body. Its rows are counted per hour first (a store that fails at once then gets
/// its proper error status), then read in windows (see [`windows::plan`]) by [`READERS`]
/// threads, each with a single-threaded runtime and its own connection: the HTTP client's
/// connection task and the encoder then never wake each other across threads (on 2 cores such
/// wake-ups had been a third of an export's CPU). A reader hands its encoded chunks over a
/// channel of four; the body takes them window by window, in order. A client that goes away
/// drops the body and its channels, which ends the readers and drops their queries.
pub async fn start_export(
    source: ExportSource,
    format: BodyFormat,
    metrics: ApiMetrics,
) -> Result<Body, ApiError> {
    let hours = source.hours().await?;
    let windows = windows::plan(&hours, source.sort, source.window_rows);
    let mut readers = Vec::new();
    for reader in 0..READERS.min(windows.len()) {
        let mine: Vec<Window> = windows
            .iter()
            .skip(reader)
            .step_by(READERS)
            .copied()
            .collect();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let source = source.clone();
        std::thread::Builder::new()
            .name("audit-api-export".to_owned())
            .spawn(move || read_windows(&source, &mine, format, &tx))
            .map_err(|err| ApiError::Internal(format!("cannot start an export thread: {err}")))?;
        readers.push(rx);
    }
    let mut header = Encoder::new(format);
    header
        .header()
        .map_err(|err| ApiError::Internal(format!("cannot encode the header: {err}")))?;
    let header = header
        .take()
        .map_err(|err| ApiError::Internal(format!("cannot encode the header: {err}")))?;
    Ok(Body::from_stream(export_body(
        readers,
        windows.len(),
        header,
        format,
        metrics,
    )))
}

/// The chunks of the readers' windows in window order. The header goes out with the first rows:
/// a body's first chunk means its query answered.
fn export_body(
    readers: Vec<tokio::sync::mpsc::Receiver<Piece>>,
    windows: usize,
    header: Bytes,
    format: BodyFormat,
    metrics: ApiMetrics,
) -> impl Stream<Item = std::io::Result<Bytes>> {
    struct State {
        readers: Vec<tokio::sync::mpsc::Receiver<Piece>>,
        /// The window being sent, and how many there are.
        window: usize,
        windows: usize,
        header: Option<Bytes>,
        failed: bool,
        label: &'static str,
        metrics: ApiMetrics,
    }
    let state = State {
        readers,
        window: 0,
        windows,
        header: Some(header),
        failed: false,
        label: format.label(),
        metrics,
    };
    stream::unfold(state, |mut s| async move {
        loop {
            if s.failed || s.window == s.windows {
                return s.header.take().map(|header| (Ok(header), s));
            }
            let failure = match s.readers[s.window % READERS].recv().await {
                Some(Piece::Rows(bytes, rows)) => {
                    let bytes = match s.header.take() {
                        Some(header) => [header, bytes].concat().into(),
                        None => bytes,
                    };
                    s.metrics
                        .rows_streamed
                        .with_label_values(&[s.label])
                        .inc_by(rows);
                    s.metrics
                        .bytes_streamed
                        .with_label_values(&[s.label])
                        .inc_by(bytes.len() as u64);
                    return Some((Ok(bytes), s));
                }
                Some(Piece::WindowEnd) => {
                    s.window += 1;
                    continue;
                }
                Some(Piece::Failed(err)) => err.to_string(),
                None => "an export reader ended early".to_owned(),
            };
            error!(error = %failure, "export stream failed after the response started");
            s.failed = true;
            s.header = None;
            let failed = std::io::Error::other("the audit log store failed mid-stream");
            return Some((Err(failed), s));
        }
    })
}

/// A reader thread: reads `windows` in order, handing each one's rows to `tx`.
fn read_windows(
    source: &ExportSource,
    windows: &[Window],
    format: BodyFormat,
    tx: &tokio::sync::mpsc::Sender<Piece>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            let _ = tx.blocking_send(Piece::Failed(ExportError::Encode(err)));
            return;
        }
    };
    runtime.block_on(async move {
        let source = source.with_own_client();
        let mut reader = WindowReader::new(format);
        for window in windows {
            let piece = match reader.read(&source, window, tx).await {
                Ok(()) => Piece::WindowEnd,
                Err(ExportError::Gone) => return,
                Err(err) => Piece::Failed(err),
            };
            let failed = matches!(piece, Piece::Failed(_));
            if tx.send(piece).await.is_err() || failed {
                return;
            }
        }
    });
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

/// One reader's buffers, kept from window to window.
struct WindowReader {
    /// Rows of a window sorted by ClickHouse, encoded as they come.
    encoder: Encoder,
    /// A held window, encoded in storage order; its buffer is allocated once.
    held_encoder: Encoder,
    held: WindowRows,
}

impl WindowReader {
    fn new(format: BodyFormat) -> Self {
        Self {
            encoder: Encoder::new(format),
            held_encoder: Encoder::with_capacity(format, WINDOW_BYTES + (1 << 20)),
            held: WindowRows::default(),
        }
    }

    /// Reads `window` and hands its rows to `tx` in the export's order, in chunks of about
    /// [`CHUNK_BYTES`].
    async fn read(
        &mut self,
        source: &ExportSource,
        window: &Window,
        tx: &tokio::sync::mpsc::Sender<Piece>,
    ) -> Result<(), ExportError> {
        let send = |bytes: Bytes, rows: u64| async move {
            if bytes.is_empty() {
                return Ok(());
            }
            tx.send(Piece::Rows(bytes, rows))
                .await
                .map_err(|_| ExportError::Gone)
        };
        if !window.sorted {
            let cursor = source.rows(window.from_ms, window.to_ms, false)?;
            let complete = self.held.read(cursor, &mut self.held_encoder).await?;
            if complete {
                let encoded = self.held_encoder.bytes()?;
                let mut chunk = Vec::with_capacity(CHUNK_BYTES + 4096);
                let mut rows = 0;
                for range in self.held.in_order(source.sort) {
                    chunk.extend_from_slice(&encoded[range]);
                    rows += 1;
                    if chunk.len() >= CHUNK_BYTES {
                        let full =
                            std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_BYTES + 4096));
                        send(full.into(), std::mem::take(&mut rows)).await?;
                    }
                }
                send(chunk.into(), rows).await?;
            }
            self.held_encoder.clear()?;
            if complete {
                return Ok(());
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
            self.encoder.row(&record)?;
            rows += 1;
            if self.encoder.len() >= CHUNK_BYTES {
                send(self.encoder.take()?, std::mem::take(&mut rows)).await?;
            }
        }
        send(self.encoder.take()?, rows).await
    }
}

/// Largest encoded size of a window held in memory. A window whose rows come to more (rows far
/// larger than usual) is read again, sorted by ClickHouse.
const WINDOW_BYTES: usize = 16 << 20;

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
