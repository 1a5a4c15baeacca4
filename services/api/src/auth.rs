//! The `AdminCaller` extractor: API key from `X-API-Key` (or `Authorization: Bearer`), checked
//! against the key snapshot (401), role admin (403), then the key's rate limit (429).

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::RateLimitConfig;
use crate::error::ApiError;
use crate::keys::{Caller, Role};
use crate::AppState;

pub const API_KEY_HEADER: &str = "x-api-key";

/// Per-key request budget. Keys are only counted after they authenticated, so the table holds
/// at most one entry per real key.
#[derive(Clone)]
pub struct KeyRateLimiter {
    limiter: Option<Arc<DefaultKeyedRateLimiter<String>>>,
}

impl KeyRateLimiter {
    pub fn new(config: &RateLimitConfig) -> Self {
        let limiter = NonZeroU32::new(config.requests_per_second).map(|rate| {
            let burst = NonZeroU32::new(config.burst).unwrap_or(rate);
            Arc::new(DefaultKeyedRateLimiter::keyed(
                Quota::per_second(rate).allow_burst(burst),
            ))
        });
        Self { limiter }
    }

    pub fn check(&self, key_id: &str) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(&key_id.to_owned())
            .map_err(|not_until| ApiError::RateLimited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            })
    }
}

/// The presented key, if any: `X-API-Key` first, then `Authorization: Bearer`.
fn presented_key(parts: &Parts) -> Option<&str> {
    if let Some(value) = parts.headers.get(API_KEY_HEADER) {
        return value.to_str().ok().map(str::trim);
    }
    let authorization = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = authorization.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// An authenticated admin of one organization, within its rate limit.
pub struct AdminCaller(pub Caller);

impl FromRequestParts<AppState> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented = presented_key(parts).ok_or(ApiError::MissingKey)?;
        if presented.is_empty() {
            return Err(ApiError::MissingKey);
        }
        let caller = state.keys.authenticate(presented)?;
        if caller.role != Role::Admin {
            return Err(ApiError::Forbidden);
        }
        state.rate_limiter.check(&caller.key_id)?;
        Ok(AdminCaller(caller))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_per_key() {
        let limiter = KeyRateLimiter::new(&RateLimitConfig {
            requests_per_second: 1,
            burst: 2,
        });
        assert!(limiter.check("a").is_ok());
        assert!(limiter.check("a").is_ok());
        let Err(ApiError::RateLimited { retry_after }) = limiter.check("a") else {
            panic!("third request within the burst must be limited");
        };
        assert!(retry_after.as_millis() <= 1000);
        assert!(limiter.check("b").is_ok());
    }

    #[test]
    fn zero_rate_disables_the_limit() {
        let limiter = KeyRateLimiter::new(&RateLimitConfig {
            requests_per_second: 0,
            burst: 0,
        });
        for _ in 0..100 {
            assert!(limiter.check("a").is_ok());
        }
    }

    #[test]
    fn bearer_tokens_are_accepted_like_api_key_headers() {
        let request = axum::http::Request::builder()
            .header("Authorization", "Bearer alk_x")
            .body(())
            .unwrap();
        let (parts, _) = request.into_parts();
        assert_eq!(presented_key(&parts), Some("alk_x"));
        let request = axum::http::Request::builder()
            .header("Authorization", "Basic abc")
            .body(())
            .unwrap();
        let (parts, _) = request.into_parts();
        assert_eq!(presented_key(&parts), None);
    }
}
