//! Realistic audit events for demos and benchmarks: a few organizations with named users and
//! teams, a weighted mix of every catalog type, some events carrying ids only (as a terse
//! producer would send them), 400-800 bytes each.

use chrono::{DateTime, SecondsFormat, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Which of the three upstream topics an event type belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    Users,
    Teams,
    Auth,
}

/// Routing of event types to upstream topics, as the identity services publish them.
pub fn stream_of(event_type: &str) -> Stream {
    match event_type.split('.').next().unwrap_or_default() {
        "team" | "team_member" => Stream::Teams,
        "user"
            if matches!(
                event_type,
                "user.logged_in"
                    | "user.logged_out"
                    | "user.login_failed"
                    | "user.password_changed"
                    | "user.mfa_enabled"
                    | "user.mfa_disabled"
            ) =>
        {
            Stream::Auth
        }
        _ => Stream::Users,
    }
}

const FIRST: &[&str] = &[
    "ada",
    "grace",
    "alan",
    "barbara",
    "edsger",
    "frances",
    "ken",
    "margaret",
    "dennis",
    "radia",
    "linus",
    "anita",
    "john",
    "katherine",
    "donald",
    "shafi",
    "leslie",
    "hedy",
    "tim",
    "sophie",
];
const LAST: &[&str] = &[
    "lovelace",
    "hopper",
    "turing",
    "liskov",
    "dijkstra",
    "allen",
    "thompson",
    "hamilton",
    "ritchie",
    "perlman",
    "torvalds",
    "borg",
    "backus",
    "johnson",
    "knuth",
    "goldwasser",
    "lamport",
    "lamarr",
    "berners-lee",
    "wilson",
];
const TEAMS: &[&str] = &[
    "Platform", "Payments", "Identity", "Data", "Mobile", "Web", "SRE", "Security", "Growth",
    "Support",
];
const AGENTS: &[&str] = &[
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
    "acme-cli/2.4.1 (linux; amd64)",
];
const PLACES: &[&str] = &[
    "Berlin, DE",
    "Lisbon, PT",
    "Austin, US",
    "Toronto, CA",
    "Pune, IN",
    "Sydney, AU",
];
const ROLES: &[&str] = &["member", "admin", "billing", "auditor"];

/// Weighted event mix: (type, weight).
const MIX: &[(&str, u32)] = &[
    ("user.logged_in", 28),
    ("user.logged_out", 14),
    ("user.login_failed", 5),
    ("team_member.added", 7),
    ("team_member.removed", 4),
    ("team_member.updated", 4),
    ("role.assigned", 5),
    ("role.revoked", 3),
    ("user.updated", 7),
    ("user.created", 3),
    ("user.invited", 3),
    ("team.created", 2),
    ("team.updated", 2),
    ("team.deleted", 1),
    ("user.password_changed", 3),
    ("user.mfa_enabled", 2),
    ("user.mfa_disabled", 1),
    ("api_key.created", 1),
    ("api_key.revoked", 1),
    ("organization.updated", 1),
    ("user.deactivated", 1),
    ("user.reactivated", 1),
    ("user.deleted", 1),
];

struct Person {
    id: String,
    name: String,
    email: String,
}

struct Organization {
    id: String,
    people: Vec<Person>,
    teams: Vec<(String, String)>,
}

/// Deterministic for a seed.
pub struct EventGenerator {
    rng: SmallRng,
    organizations: Vec<Organization>,
    sequence: u64,
    run: String,
    total_weight: u32,
}

impl EventGenerator {
    /// `organization_ids`: tenants to spread events over; `run` makes event ids unique per run.
    pub fn new(seed: u64, organization_ids: &[String], run: &str) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let organizations = organization_ids
            .iter()
            .map(|org| {
                let domain = format!(
                    "{}.example",
                    org.trim_start_matches("org_").replace('_', "-")
                );
                let people = (0..40)
                    .map(|i| {
                        let first = FIRST[rng.random_range(0..FIRST.len())];
                        let last = LAST[rng.random_range(0..LAST.len())];
                        Person {
                            id: format!("usr_{org}_{i:03}"),
                            name: format!("{} {}", capitalize(first), capitalize(last)),
                            email: format!("{first}.{last}{i}@{domain}"),
                        }
                    })
                    .collect();
                let teams = TEAMS
                    .iter()
                    .enumerate()
                    .map(|(i, name)| (format!("team_{org}_{i:02}"), (*name).to_owned()))
                    .collect();
                Organization {
                    id: org.clone(),
                    people,
                    teams,
                }
            })
            .collect();
        Self {
            rng,
            organizations,
            sequence: 0,
            run: run.to_owned(),
            total_weight: MIX.iter().map(|(_, w)| w).sum(),
        }
    }

    /// The next event, happening at `at`, as wire JSON.
    pub fn next_event(&mut self, at: DateTime<Utc>) -> Value {
        self.sequence += 1;
        let mut pick = self.rng.random_range(0..self.total_weight);
        let mut event_type = MIX[0].0;
        for (candidate, weight) in MIX {
            if pick < *weight {
                event_type = candidate;
                break;
            }
            pick -= weight;
        }
        let org = &self.organizations[self.rng.random_range(0..self.organizations.len())];
        let actor = &org.people[self.rng.random_range(0..org.people.len())];
        let subject = &org.people[self.rng.random_range(0..org.people.len())];
        let (team_id, team_name) = &org.teams[self.rng.random_range(0..org.teams.len())];
        // Terse producers send ids only; the directory projection fills the rest in.
        let terse = self.rng.random_bool(0.15);
        let mut actor_json =
            json!({"id": actor.id, "type": "user", "email": actor.email, "name": actor.name});
        if terse {
            actor_json = json!({"id": actor.id});
        }
        let affected = json!({"id": subject.id, "email": subject.email});
        let role = ROLES[self.rng.random_range(0..ROLES.len())];
        let (resource, affected_user, changes, metadata) = match event_type {
            "user.logged_in" | "user.logged_out" | "user.login_failed" => {
                let session = format!("ses_{:016x}", self.rng.random::<u64>());
                let meta = match event_type {
                    "user.login_failed" => {
                        json!({"reason": "invalid_password", "attempt": self.rng.random_range(1..6)})
                    }
                    _ => {
                        json!({"method": if self.rng.random_bool(0.6) { "sso" } else { "password" }, "mfa": self.rng.random_bool(0.7)})
                    }
                };
                actor_json = if terse {
                    json!({"id": actor.id})
                } else {
                    json!({"id": actor.id, "type": "user", "email": actor.email})
                };
                (
                    json!({"type": "session", "id": session}),
                    json!({"id": actor.id}),
                    json!([]),
                    meta,
                )
            }
            "team_member.added" => (
                json!({"type": "team", "id": team_id, "name": team_name}),
                affected,
                json!([{"field": "teamRole", "newValue": "member"}]),
                json!({"via": "admin_console"}),
            ),
            "team_member.removed" => (
                json!({"type": "team", "id": team_id, "name": team_name}),
                affected,
                json!([{"field": "teamRole", "oldValue": "member"}]),
                json!({"via": "admin_console"}),
            ),
            "team_member.updated" => (
                json!({"type": "team", "id": team_id, "name": team_name}),
                affected,
                json!([{"field": "teamRole", "oldValue": "member", "newValue": "maintainer"}]),
                json!({}),
            ),
            "role.assigned" | "role.revoked" => (
                json!({"type": "role", "id": format!("role_{role}"), "name": capitalize(role)}),
                affected,
                if event_type == "role.assigned" {
                    json!([{"field": "roles", "oldValue": ["member"], "newValue": ["member", role]}])
                } else {
                    json!([{"field": "roles", "oldValue": ["member", role], "newValue": ["member"]}])
                },
                json!({"approvedBy": actor.id}),
            ),
            "team.created" | "team.updated" | "team.deleted" => (
                json!({"type": "team", "id": team_id, "name": team_name}),
                Value::Null,
                json!([{"field": "name", "oldValue": if event_type == "team.created" { Value::Null } else { json!("Old name") }, "newValue": team_name}]),
                json!({"memberCount": self.rng.random_range(1..40)}),
            ),
            "api_key.created" | "api_key.revoked" => (
                json!({"type": "api_key", "id": format!("key_{:08x}", self.rng.random::<u32>()), "name": "CI deploy key"}),
                Value::Null,
                json!([{"field": "scopes", "newValue": ["audit_logs:read"]}]),
                json!({"expiresInDays": 90}),
            ),
            "organization.updated" => (
                json!({"type": "organization", "id": org.id, "name": "Acme Inc."}),
                Value::Null,
                json!([{"field": "ssoEnforced", "oldValue": false, "newValue": true}]),
                json!({}),
            ),
            _ => (
                json!({"type": "user", "id": subject.id, "name": subject.name}),
                affected,
                json!([{"field": "status", "oldValue": "active", "newValue": event_type.rsplit('.').next().unwrap_or("updated")}]),
                json!({"source": if self.rng.random_bool(0.5) { "scim" } else { "admin_console" }}),
            ),
        };
        let mut event = json!({
            "id": format!("evt_{}_{:010}", self.run, self.sequence),
            "type": event_type,
            "occurredAt": at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "organizationId": org.id,
            "actor": actor_json,
            "resource": resource,
            "context": {
                "ip": format!("203.0.113.{}", self.rng.random_range(1..255)),
                "userAgent": AGENTS[self.rng.random_range(0..AGENTS.len())],
                "requestId": format!("req_{:016x}", self.rng.random::<u64>()),
                "location": PLACES[self.rng.random_range(0..PLACES.len())],
            },
            "metadata": metadata,
        });
        if !affected_user.is_null() {
            event["affectedUser"] = affected_user;
        }
        if changes.as_array().is_some_and(|c| !c.is_empty()) {
            event["changes"] = changes;
        }
        event
    }
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use audit_event::AuditEvent;

    #[test]
    fn generated_events_are_valid_realistic_and_varied() {
        let orgs = vec!["org_acme".to_owned(), "org_globex".to_owned()];
        let mut generator = EventGenerator::new(7, &orgs, "t");
        let mut types = std::collections::BTreeSet::new();
        let mut sizes = Vec::new();
        for _ in 0..5000 {
            let event = generator.next_event(Utc::now());
            let bytes = serde_json::to_vec(&event).unwrap();
            let parsed = AuditEvent::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}: {event}"));
            types.insert(parsed.event_type);
            sizes.push(bytes.len());
        }
        assert_eq!(types.len(), MIX.len(), "every type of the mix appears");
        let mean = sizes.iter().sum::<usize>() / sizes.len();
        assert!((400..=800).contains(&mean), "mean size {mean}");
    }

    #[test]
    fn routes_types_to_the_three_topics() {
        assert_eq!(stream_of("user.logged_in"), Stream::Auth);
        assert_eq!(stream_of("user.mfa_enabled"), Stream::Auth);
        assert_eq!(stream_of("user.created"), Stream::Users);
        assert_eq!(stream_of("team_member.added"), Stream::Teams);
        assert_eq!(stream_of("role.assigned"), Stream::Users);
    }
}
