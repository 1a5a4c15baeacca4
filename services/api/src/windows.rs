//! The time windows an export is read in (see `store::ExportSource`): consecutive hours grouped
//! so that each window holds at most a set number of stored rows, which the service orders.

use crate::query::SortOrder;
use crate::store::HOUR_MS;

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
