//! Which table answers which filters: `audit_events`, or one of its copies sorted for a
//! filter (migrations 0004 and 0005), where the matching rows of an organization lie together.

use audit_store::EVENTS_TABLE;

use super::sql::{Condition, Param};
use crate::query::Filters;

/// Key-only copy of `audit_events` sorted by event type first (migration 0004).
pub const BY_TYPE_TABLE: &str = "audit_events_by_type";
/// Full copy of `audit_events` sorted by lower-cased actor email first (migration 0005).
pub const BY_ACTOR_EMAIL_TABLE: &str = "audit_events_by_actor_email_rows";

impl Condition {
    /// Organization first, then `column = value` when the table is sorted by that column next:
    /// no statement is built without the organization.
    pub(super) fn organization(
        table: &'static str,
        organization_id: &str,
        key: Option<(&str, &str)>,
    ) -> Self {
        let mut c = Condition::on(table);
        c.and_compare("organization_id =", Param::Text(organization_id.to_owned()));
        if let Some((column, value)) = key {
            c.and_compare(&format!("{column} ="), Param::Text(value.to_owned()));
        }
        c
    }

    /// The selection of the filters on a table of full rows: the actor-email copy when they
    /// name an actor email (that actor's events are contiguous there), else `audit_events`.
    pub(super) fn on_rows(organization_id: &str, filters: &Filters) -> Self {
        let mut c = match &filters.actor_email {
            Some(email) => Self::organization(
                BY_ACTOR_EMAIL_TABLE,
                organization_id,
                Some(("actor_email_key", email)),
            ),
            None => Self::organization(EVENTS_TABLE, organization_id, None),
        };
        c.between(filters.from_ms, filters.to_ms);
        c.outside(&filters.gaps);
        for (column, value) in [
            ("event_type", &filters.event_type),
            ("actor_id", &filters.actor_id),
            ("resource_type", &filters.resource_type),
            ("resource_id", &filters.resource_id),
        ] {
            if let Some(value) = value {
                c.and_compare(&format!("{column} ="), Param::Text(value.clone()));
            }
        }
        c
    }

    /// The same selection as [`Condition::on_rows`], on the cheapest table that can answer it
    /// for keys and counts: a filter on event type alone (time bounds aside) reads its key-only
    /// table, where the matching rows of an organization are contiguous.
    pub(super) fn on_keys(organization_id: &str, filters: &Filters) -> Self {
        let alone = filters.actor_email.is_none()
            && filters.actor_id.is_none()
            && filters.resource_type.is_none()
            && filters.resource_id.is_none();
        match &filters.event_type {
            Some(event_type) if alone => {
                let key = Some(("event_type", event_type.as_str()));
                let mut c = Self::organization(BY_TYPE_TABLE, organization_id, key);
                c.between(filters.from_ms, filters.to_ms);
                c.outside(&filters.gaps);
                c
            }
            _ => Self::on_rows(organization_id, filters),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sql::tests::placeholders;

    #[test]
    fn every_statement_starts_with_the_organization_and_sends_values_as_parameters() {
        let filters = Filters {
            from_ms: Some(1),
            to_ms: Some(2),
            event_type: Some("a' OR 1=1 --".to_owned()),
            actor_id: Some("b".to_owned()),
            actor_email: Some("c".to_owned()),
            resource_type: Some("d".to_owned()),
            resource_id: Some("e".to_owned()),
            gaps: vec![(3, 4)],
        };
        let condition = Condition::on_rows("org", &filters);
        assert!(condition.sql.starts_with("organization_id = {p0:String}"));
        assert!(!condition.sql.contains("OR 1=1"));
        assert!(!condition.sql.contains('\''));
        assert_eq!(placeholders(&condition.sql), condition.params.len());
        assert_eq!(condition.params.len(), 10);
        assert!(condition
            .sql
            .contains("NOT (occurred_at_ms >= {p4:Int64} AND occurred_at_ms < {p5:Int64})"));
        assert!(condition.sql.contains("occurred_at_ms >= {p2:Int64}"));
    }

    /// The copy sorted by actor email serves every request that names one (keys, counts, rows,
    /// exports), with the email right after the organization: the prefix of its sorting key.
    #[test]
    fn an_actor_email_is_read_from_the_copy_sorted_by_it() {
        let filters = Filters {
            actor_email: Some("ada@acme.example".to_owned()),
            event_type: Some("user.created".to_owned()),
            ..Filters::default()
        };
        for c in [
            Condition::on_rows("org", &filters),
            Condition::on_keys("org", &filters),
        ] {
            assert_eq!(c.table, BY_ACTOR_EMAIL_TABLE);
            assert!(c.sql.starts_with(
                "organization_id = {p0:String} AND actor_email_key = {p1:String} AND "
            ));
            assert_eq!(c.params.len(), 3);
        }
        let by_type = Filters {
            event_type: Some("user.created".to_owned()),
            ..Filters::default()
        };
        assert_eq!(Condition::on_keys("org", &by_type).table, BY_TYPE_TABLE);
        assert_eq!(Condition::on_rows("org", &by_type).table, EVENTS_TABLE);
    }
}
