//! Which months a page reads.

use std::collections::BTreeSet;

use super::count::MonthRows;
use super::page::PageRequest;
use crate::partitions::Month;
use crate::query::SortOrder;

/// The part of a page's range it reads: whole months next to where the page starts, sized by
/// the stored rows per month that the total counts anyway, so that ClickHouse opens only the
/// parts of those months (each part it opens costs it a granule read and its index analysis).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct Window {
    /// `occurred_at_ms >= from_ms` (a month's start).
    pub(super) from_ms: Option<i64>,
    /// `occurred_at_ms < to_ms` (a month's start or end).
    pub(super) to_ms: Option<i64>,
    /// Rows to skip within the window: the page's offset less the rows of the months it skips.
    pub(super) offset: u64,
    /// Whether the window is narrower than the page's range on the side away from where the
    /// page starts: a page that comes back short must then be read again over the whole range.
    pub(super) narrowed: bool,
    /// Whether a month of the window holds a copy not collapsed yet: the read then uses FINAL.
    pub(super) copies: bool,
    /// Listed months the window reads (None: not known, no listing yet).
    pub(super) months: Option<usize>,
}

impl Window {
    /// The whole range, de-duplicated by FINAL.
    pub(super) fn whole(request: &PageRequest<'_>) -> Self {
        Window {
            offset: request.offset(),
            copies: true,
            ..Window::default()
        }
    }

    /// The window of `request` over `months` (ascending), whose stored rows under the
    /// request's filters are `rows` (months absent there count as empty). With `exact` rows
    /// (counted by this request), whole months the offset passes are skipped and the offset
    /// reduced by their rows, provided no copy is pending in them.
    pub(super) fn of(
        request: &PageRequest<'_>,
        months: &[Month],
        rows: &MonthRows,
        exact: bool,
        pending: &BTreeSet<String>,
    ) -> Self {
        let (from, to) = (request.filters.from_ms, request.filters.to_ms);
        let cursor = request.cursor.map(|c| c.occurred_at_ms);
        let desc = request.sort == SortOrder::Desc;
        let mut list: Vec<&Month> = months
            .iter()
            .filter(|m| m.meets(from, to))
            .filter(|m| match (cursor, desc) {
                (None, _) => true,
                (Some(t), true) => m.start_ms <= t,
                (Some(t), false) => m.end_ms > t,
            })
            .collect();
        if desc {
            list.reverse();
        }
        let stored = |m: &Month| rows.get(&m.id).copied().unwrap_or(0);
        let mut window = Window {
            offset: request.offset(),
            ..Window::default()
        };
        let mut first = 0;
        if exact {
            while let Some(month) = list.get(first) {
                let n = stored(month);
                if n > window.offset || pending.contains(&month.id) {
                    break;
                }
                window.offset -= n;
                first += 1;
            }
        }
        if first > 0 {
            let skipped = list[first - 1];
            if desc {
                window.to_ms = Some(skipped.start_ms);
            } else {
                window.from_ms = Some(skipped.end_ms);
            }
        }
        let needed = window.offset + request.wanted();
        let mut have = 0;
        let mut last = list.len();
        for (n, month) in list.iter().enumerate().skip(first) {
            // The cursor's own month: how many of its rows lie past the cursor is unknown.
            let holds_cursor = cursor.is_some_and(|t| month.start_ms <= t && t < month.end_ms);
            if !holds_cursor {
                have += stored(month);
            }
            if have >= needed {
                last = n + 1;
                if last < list.len() {
                    window.narrowed = true;
                    if desc {
                        window.from_ms = Some(month.start_ms);
                    } else {
                        window.to_ms = Some(month.end_ms);
                    }
                }
                break;
            }
        }
        let read = &list[first.min(list.len())..last];
        window.copies = read.iter().any(|m| pending.contains(&m.id));
        window.months = (!list.is_empty()).then_some(read.len());
        window
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partitions::{self, Part};
    use crate::query::{Cursor, Filters};

    const JAN: i64 = 1_735_689_600_000; // 2025-01-01T00:00:00Z

    const FEB: i64 = 1_738_368_000_000;

    const MAR: i64 = 1_740_787_200_000;

    fn three_months() -> Vec<Month> {
        let parts: Vec<Part> = ["202501", "202502", "202503"]
            .iter()
            .enumerate()
            .map(|(n, id)| (id.to_string(), format!("{id}_{n}_{n}_0"), 0))
            .collect();
        partitions::months(&parts).unwrap()
    }

    fn rows(jan: u64, feb: u64, mar: u64) -> MonthRows {
        [("202501", jan), ("202502", feb), ("202503", mar)]
            .into_iter()
            .map(|(m, n)| (m.to_owned(), n))
            .collect()
    }

    fn request<'a>(
        filters: &'a Filters,
        sort: SortOrder,
        offset: u64,
        cursor: Option<&'a Cursor>,
    ) -> PageRequest<'a> {
        PageRequest {
            organization_id: "org",
            filters,
            sort,
            limit: 50,
            offset,
            cursor,
        }
    }

    #[test]
    fn a_first_page_reads_the_newest_months_that_hold_it() {
        let filters = Filters::default();
        let none = BTreeSet::new();
        let months = three_months();
        let first = request(&filters, SortOrder::Desc, 0, None);
        // March alone holds 51 rows.
        let w = Window::of(&first, &months, &rows(100, 100, 60), false, &none);
        assert_eq!((w.from_ms, w.to_ms, w.offset), (Some(MAR), None, 0));
        assert!(w.narrowed && !w.copies);
        assert_eq!(w.months, Some(1));
        // March and February together.
        let w = Window::of(&first, &months, &rows(100, 30, 30), false, &none);
        assert_eq!((w.from_ms, w.to_ms), (Some(FEB), None));
        // Not enough anywhere, or nothing known: the whole range.
        let w = Window::of(&first, &months, &rows(10, 10, 10), false, &none);
        assert_eq!(
            w,
            Window {
                months: Some(3),
                ..Window::default()
            }
        );
        let w = Window::of(&first, &months, &MonthRows::new(), false, &none);
        assert_eq!((w.from_ms, w.to_ms, w.months), (None, None, Some(3)));
        // No listing yet (the process's first request): nothing is known.
        let w = Window::of(&first, &[], &MonthRows::new(), false, &none);
        assert_eq!(w, Window::default());
        // Oldest first, from January.
        let asc = request(&filters, SortOrder::Asc, 0, None);
        let w = Window::of(&asc, &months, &rows(60, 10, 10), false, &none);
        assert_eq!((w.from_ms, w.to_ms), (None, Some(FEB)));
        // A copy pending in a month read: FINAL.
        let pending: BTreeSet<String> = ["202503".to_owned()].into();
        let w = Window::of(&first, &months, &rows(100, 100, 60), false, &pending);
        assert!(w.copies);
        let w = Window::of(&asc, &months, &rows(60, 10, 10), false, &pending);
        assert!(!w.copies);
    }

    #[test]
    fn an_offset_skips_whole_months_only_when_their_rows_are_exact_and_free_of_copies() {
        let filters = Filters::default();
        let none = BTreeSet::new();
        let months = three_months();
        let deep = request(&filters, SortOrder::Desc, 130, None);
        // March (60) and February (50) are passed: 20 rows into January.
        let w = Window::of(&deep, &months, &rows(100, 50, 60), true, &none);
        assert_eq!((w.from_ms, w.to_ms, w.offset), (None, Some(FEB), 20));
        // Counts from the cache alone: nothing skipped, the window grows from the start.
        let w = Window::of(&deep, &months, &rows(100, 50, 60), false, &none);
        assert_eq!((w.from_ms, w.to_ms, w.offset), (None, None, 130));
        assert!(!w.narrowed);
        let w = Window::of(&deep, &months, &rows(100, 150, 60), false, &none);
        assert_eq!((w.from_ms, w.to_ms, w.offset), (Some(FEB), None, 130));
        // February holds a copy: skipping stops before it.
        let pending: BTreeSet<String> = ["202502".to_owned()].into();
        let w = Window::of(&deep, &months, &rows(100, 50, 60), true, &pending);
        assert_eq!((w.from_ms, w.to_ms, w.offset), (None, Some(MAR), 70));
        assert!(w.copies);
        // Oldest first: January passed.
        let asc = request(&filters, SortOrder::Asc, 120, None);
        let w = Window::of(&asc, &months, &rows(100, 80, 60), true, &none);
        assert_eq!((w.from_ms, w.to_ms, w.offset), (Some(FEB), Some(MAR), 20));
        // An offset past every row reads past the last month: nothing.
        let past = request(&filters, SortOrder::Desc, 1_000, None);
        let w = Window::of(&past, &months, &rows(100, 50, 60), true, &none);
        assert_eq!((w.to_ms, w.offset), (Some(JAN), 790));
    }

    #[test]
    fn a_cursor_page_does_not_count_its_own_month() {
        let filters = Filters::default();
        let none = BTreeSet::new();
        let months = three_months();
        let cursor = Cursor {
            sort: SortOrder::Desc,
            occurred_at_ms: MAR + 1_000,
            id: "x".to_owned(),
            filters: String::new(),
        };
        let page = request(&filters, SortOrder::Desc, 0, Some(&cursor));
        // March holds the cursor: its 500 rows may all lie after it; February is read too.
        let w = Window::of(&page, &months, &rows(100, 500, 500), false, &none);
        assert_eq!((w.from_ms, w.to_ms, w.offset), (Some(FEB), None, 0));
        assert!(w.narrowed);
        // Oldest first from January's cursor: January and February.
        let cursor = Cursor {
            sort: SortOrder::Asc,
            occurred_at_ms: JAN + 1_000,
            ..cursor
        };
        let page = request(&filters, SortOrder::Asc, 0, Some(&cursor));
        let w = Window::of(&page, &months, &rows(500, 500, 500), false, &none);
        assert_eq!((w.from_ms, w.to_ms), (None, Some(MAR)));
    }
}
