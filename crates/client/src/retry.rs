//! Retry policy: jittered exponential backoff that honours `Retry-After`.

use rand::Rng;
use std::time::Duration;

/// How transient failures (network errors, `429`, `5xx`) are retried.
///
/// Applied automatically to `GET`, `HEAD`, `DELETE`, `PUT` and close-only
/// requests, and to idempotent-producer batches (safe because the server
/// deduplicates them). A plain `POST` append is never retried: the server may
/// have applied it before the connection failed.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 disables retrying).
    pub max_retries: u32,
    /// Delay before the first retry.
    pub initial_backoff: Duration,
    /// Upper bound of any computed delay.
    pub max_backoff: Duration,
    /// Growth factor between attempts.
    pub multiplier: f64,
    /// Upper bound for a server's `Retry-After`.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 8,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            multiplier: 2.0,
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn none() -> Self {
        RetryPolicy {
            max_retries: 0,
            ..RetryPolicy::default()
        }
    }

    /// Checks the policy's values.
    pub fn validate(&self) -> crate::Result<()> {
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(crate::Error::InvalidArgument(
                "retry multiplier must be a finite number >= 1".into(),
            ));
        }
        if self.initial_backoff > self.max_backoff {
            return Err(crate::Error::InvalidArgument(
                "initial backoff must not exceed max backoff".into(),
            ));
        }
        Ok(())
    }

    /// The delay before retry number `attempt` (0-based): "full jitter"
    /// exponential backoff, or the server's `Retry-After` (capped) if it
    /// asked for longer.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self.multiplier.powi(attempt.min(64) as i32);
        let cap = self.initial_backoff.as_secs_f64() * exp;
        let cap = cap.min(self.max_backoff.as_secs_f64()).max(0.0);
        // Jitter in [cap/2, cap]: spreads clients out without ever retrying instantly.
        let jittered = if cap > 0.0 {
            rand::thread_rng().gen_range(cap / 2.0..=cap)
        } else {
            0.0
        };
        let backoff = Duration::from_secs_f64(jittered);
        match retry_after {
            Some(ra) => backoff.max(ra.min(self.max_retry_after)),
            None => backoff,
        }
    }
}

/// Parses a `Retry-After` value: delta-seconds, or an HTTP date.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = v.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs));
        }
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backoff grows, stays within [cap/2, cap] and never exceeds max_backoff.
    #[test]
    fn backoff_is_bounded_and_jittered() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        for attempt in 0..20 {
            let d = p.delay(attempt, None);
            let cap = (0.1 * 2f64.powi(attempt as i32)).min(1.0);
            assert!(d.as_secs_f64() <= cap + 1e-9, "attempt {attempt}: {d:?}");
            assert!(
                d.as_secs_f64() >= cap / 2.0 - 1e-9,
                "attempt {attempt}: {d:?}"
            );
        }
    }

    /// Retry-After wins when longer than the backoff, and is capped.
    #[test]
    fn retry_after_is_honoured_and_capped() {
        let p = RetryPolicy {
            max_retry_after: Duration::from_secs(10),
            ..RetryPolicy::default()
        };
        assert_eq!(
            p.delay(0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            p.delay(0, Some(Duration::from_secs(3600))),
            Duration::from_secs(10)
        );
    }

    /// Retry-After accepts delta-seconds and HTTP dates; garbage is ignored.
    #[test]
    fn retry_after_parsing() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-3"), None);
    }

    /// Nonsensical policies are rejected.
    #[test]
    fn validation() {
        assert!(RetryPolicy::default().validate().is_ok());
        assert!(RetryPolicy {
            multiplier: 0.5,
            ..RetryPolicy::default()
        }
        .validate()
        .is_err());
        assert!(RetryPolicy {
            initial_backoff: Duration::from_secs(9),
            max_backoff: Duration::from_secs(1),
            ..RetryPolicy::default()
        }
        .validate()
        .is_err());
    }
}
