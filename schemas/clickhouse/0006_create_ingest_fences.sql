-- Exactly once into ClickHouse for the ingest's own re-deliveries.
--
-- The highest source offset each flush may store, per topic partition, written by the ingest
-- before the flush's insert (and before it checks that it still owns the partition). A replica
-- that takes a partition over (after a crash, a restart, a rebalance or a replay) reads it once:
-- a message at or below it may be stored already, in whole or in part (a crashed or revoked
-- owner, an insert that timed out after it landed), and is looked up by its source position
-- before it is inserted; a message above it cannot have been stored and goes in unchecked.
-- ReplacingMergeTree keeps the highest value; readers take max() since merges are asynchronous.
CREATE TABLE IF NOT EXISTS ingest_write_intents
(
    source_topic      String,
    source_partition  Int32,
    high_offset       Int64,
    written_at_ms     UInt64
)
ENGINE = ReplacingMergeTree(high_offset)
ORDER BY (source_topic, source_partition);

-- Months of audit_events that hold copies of one event (an event id published twice upstream,
-- or a copy that slipped past the check above), found by the ingest's duplicate check after its
-- inserts ('found'), and when a collapse of the month (OPTIMIZE ... FINAL of the events and of
-- every copy table) started ('collapsed'). A month is pending while its newest finding is not
-- older than its newest collapse: the read path reports its totals as approximate meanwhile.
CREATE TABLE IF NOT EXISTS audit_event_duplicates
(
    partition_id  String,
    kind          String,
    at_ms         UInt64,
    copies        UInt64
)
ENGINE = MergeTree
ORDER BY (partition_id, at_ms);

-- Months stored before this migration may hold copies of re-deliveries (earlier releases of the
-- ingest stored them): every month that is not one merged part is marked, so that the ingest
-- collapses it and the totals say they are approximate until then.
INSERT INTO audit_event_duplicates SELECT partition_id, 'found', toUInt64(toUnixTimestamp(now())) * 1000, 0 FROM system.parts WHERE database = currentDatabase() AND table = 'audit_events' AND active GROUP BY partition_id HAVING count() > 1 OR max(level) = 0;
