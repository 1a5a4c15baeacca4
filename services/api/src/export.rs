//! The body of `GET /api/v1/organization/audit-logs/export`: the range is read in time windows
//! (see `store::ExportSource`), consecutive hours grouped so that each window holds at most
//! `query.export_window_rows` stored rows, read without `ORDER BY` and put in order by the
//! service; two reader threads take alternate windows.

use axum::body::Body;
use bytes::Bytes;
use futures_util::{stream, StreamExt};
use tokio::sync::OwnedSemaphorePermit;

use crate::metrics::ApiMetrics;
use crate::query::BodyFormat;
use crate::query::SortOrder;
use crate::store::{EventCursor, ExportSource};
use crate::stream::{failed_mid_stream, CursorChunks, Encoder, StreamError, CHUNK_BYTES};
use crate::time::HOUR_MS;

/// Threads reading an export's windows side by side: window k is read by reader k % READERS,
/// so one reader fetches and encodes the next window while the response sends the other's.
const READERS: usize = 2;

/// What a reader hands the response, window after window.
enum Piece {
    /// Encoded rows (`.1` of them), in order.
    Rows(Bytes, u64),
    /// The reader's current window is complete.
    WindowEnd,
    Failed(StreamError),
}

/// An export's body. Its rows are counted per hour first, then read in windows (see [`plan`]) by
/// [`READERS`] threads, each with a single-threaded runtime and its own connection: the HTTP
/// client's connection task and the encoder then never wake each other across threads (on 2
/// cores such wake-ups had been a third of an export's CPU). A reader hands its encoded chunks
/// over a channel of four; the body takes them window by window, in order. The first rows are
/// awaited before the head is sent, so that a store that fails at once gets its proper error
/// status instead of a broken 200. A client that goes away drops the body and its channels,
/// which ends the readers and drops their queries.
pub async fn start(
    source: ExportSource,
    format: BodyFormat,
    metrics: ApiMetrics,
    permit: OwnedSemaphorePermit,
) -> Result<Body, StreamError> {
    let hours = source.hours().await?;
    let windows = plan(&hours, source.sort, source.window_rows);
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
            .map_err(StreamError::Spawn)?;
        readers.push(rx);
    }
    let mut chunks = WindowChunks {
        readers,
        window: 0,
        windows: windows.len(),
        _permit: permit,
    };
    let first = chunks.next().await.transpose()?;
    let mut header = Encoder::new(format);
    let header = header.header().and_then(|()| header.take())?;
    let (first, rows) = match first {
        Some((bytes, rows)) => ([header, bytes].concat().into(), rows),
        None => (header, 0),
    };
    let label = format.label();
    metrics.observe_streamed(label, rows, first.len());
    let rest = stream::unfold(chunks, move |mut chunks| {
        let metrics = metrics.clone();
        async move {
            let chunk = match chunks.next().await? {
                Ok((bytes, rows)) => {
                    metrics.observe_streamed(label, rows, bytes.len());
                    Ok(bytes)
                }
                Err(err) => Err(failed_mid_stream(&err)),
            };
            Some((chunk, chunks))
        }
    });
    Ok(Body::from_stream(
        stream::once(async move { Ok(first) }).chain(rest),
    ))
}

/// The readers' chunks, window after window.
struct WindowChunks {
    readers: Vec<tokio::sync::mpsc::Receiver<Piece>>,
    /// The window being sent, and how many there are.
    window: usize,
    windows: usize,
    /// The export's place among `query.max_concurrent_exports`, given back with the body.
    _permit: OwnedSemaphorePermit,
}

impl WindowChunks {
    /// The next encoded rows (bytes, rows) in window order; None at the end. After a failure,
    /// nothing more.
    async fn next(&mut self) -> Option<Result<(Bytes, u64), StreamError>> {
        while self.window < self.windows {
            let piece = self.readers[self.window % READERS].recv().await;
            match piece {
                Some(Piece::Rows(bytes, rows)) => return Some(Ok((bytes, rows))),
                Some(Piece::WindowEnd) => self.window += 1,
                Some(Piece::Failed(err)) => {
                    self.window = self.windows;
                    return Some(Err(err));
                }
                None => {
                    self.window = self.windows;
                    return Some(Err(StreamError::ReaderEnded));
                }
            }
        }
        None
    }
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
            let _ = tx.blocking_send(Piece::Failed(StreamError::Encode(err)));
            return;
        }
    };
    runtime.block_on(async move {
        let source = source.with_own_client();
        let mut reader = WindowReader::new(format);
        for window in windows {
            let piece = match reader.read(&source, window, tx).await {
                Ok(()) => Piece::WindowEnd,
                Err(StreamError::Gone) => return,
                Err(err) => Piece::Failed(err),
            };
            let failed = matches!(piece, Piece::Failed(_));
            if tx.send(piece).await.is_err() || failed {
                return;
            }
        }
    });
}

/// One reader's buffers, kept from window to window.
struct WindowReader {
    format: BodyFormat,
    /// A held window, encoded in storage order; its buffer is allocated once.
    held_encoder: Encoder,
    held: WindowRows,
}

impl WindowReader {
    fn new(format: BodyFormat) -> Self {
        Self {
            format,
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
    ) -> Result<(), StreamError> {
        let send = |bytes: Bytes, rows: u64| async move {
            if bytes.is_empty() {
                return Ok(());
            }
            tx.send(Piece::Rows(bytes, rows))
                .await
                .map_err(|_| StreamError::Gone)
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
        let cursor = source.rows(window.from_ms, window.to_ms, true)?;
        let mut sorted = CursorChunks::new(Some(cursor), self.format);
        while let Some(chunk) = sorted.chunk().await {
            let (bytes, rows) = chunk?;
            send(bytes, rows).await?;
        }
        Ok(())
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
    ) -> Result<bool, StreamError> {
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

    /// Where each row lies in the encoded window, in `sort` order by (time, id), re-deliveries left out
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

/// Part of an export's range: `from_ms <= time < to_ms`, None standing for the range's own bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Holds more rows than a window may (one hour alone does): ClickHouse sorts it.
    pub sorted: bool,
}

/// Groups the stored rows per hour (`hours`, ascending, from `ExportSource::hours`) into
/// windows of at most `max_rows` rows, in the export's order. The windows tile the whole range
/// with no gap, from its start to its end, so that rows stored after the hours were counted
/// still fall in exactly one. `max_rows` 0: one window, sorted by ClickHouse.
pub fn plan(hours: &[(i64, u64)], sort: SortOrder, max_rows: u64) -> Vec<Window> {
    let mut windows = Vec::new();
    let mut from_ms = None;
    let mut rows = 0;
    for &(hour, n) in hours {
        if max_rows > 0 && rows > 0 && rows + n > max_rows {
            let cut = hour * HOUR_MS;
            windows.push(Window {
                from_ms,
                to_ms: Some(cut),
                sorted: rows > max_rows,
            });
            from_ms = Some(cut);
            rows = 0;
        }
        rows += n;
    }
    windows.push(Window {
        from_ms,
        to_ms: None,
        sorted: max_rows == 0 || rows > max_rows,
    });
    if sort == SortOrder::Desc {
        windows.reverse();
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = HOUR_MS;

    fn window(from_ms: Option<i64>, to_ms: Option<i64>, sorted: bool) -> Window {
        Window {
            from_ms,
            to_ms,
            sorted,
        }
    }

    #[test]
    fn hours_are_grouped_up_to_the_row_limit_and_tile_the_range() {
        let hours = [(10, 40), (11, 50), (13, 30), (20, 100), (21, 5)];
        assert_eq!(
            plan(&hours, SortOrder::Asc, 100),
            vec![
                window(None, Some(13 * H), false),
                window(Some(13 * H), Some(20 * H), false),
                window(Some(20 * H), Some(21 * H), false),
                window(Some(21 * H), None, false),
            ]
        );
    }

    #[test]
    fn newest_first_reads_the_same_windows_in_reverse() {
        let hours = [(10, 40), (11, 50), (13, 30)];
        let mut asc = plan(&hours, SortOrder::Asc, 100);
        asc.reverse();
        assert_eq!(plan(&hours, SortOrder::Desc, 100), asc);
    }

    #[test]
    fn an_hour_over_the_limit_is_sorted_by_clickhouse_alone() {
        let hours = [(1, 10), (2, 500), (3, 10)];
        assert_eq!(
            plan(&hours, SortOrder::Asc, 100),
            vec![
                window(None, Some(2 * H), false),
                window(Some(2 * H), Some(3 * H), true),
                window(Some(3 * H), None, false),
            ]
        );
        assert_eq!(
            plan(&[(2, 500)], SortOrder::Asc, 100),
            vec![window(None, None, true)]
        );
    }

    #[test]
    fn no_rows_or_no_limit_is_one_window() {
        assert_eq!(
            plan(&[], SortOrder::Desc, 100),
            vec![window(None, None, false)]
        );
        assert_eq!(
            plan(&[(1, 10), (2, 500)], SortOrder::Asc, 0),
            vec![window(None, None, true)]
        );
    }
}
