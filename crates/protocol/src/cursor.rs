//! `Stream-Cursor` computation (PROTOCOL.md section 10.1).
//!
//! Time is divided into fixed intervals counted from 2024-10-09T00:00:00Z; the
//! cursor is the interval number. When a client echoes a cursor that is not
//! behind the current interval, the server answers a strictly larger cursor
//! (adding 1 to 3600 seconds of jitter) so CDN cache keys keep moving forward.

/// 2024-10-09T00:00:00Z in Unix seconds.
pub const CURSOR_EPOCH_UNIX_SECS: u64 = 1_728_432_000;

/// The interval number containing `now_unix_secs`.
pub fn interval_number(now_unix_secs: u64, interval_secs: u64) -> u64 {
    now_unix_secs.saturating_sub(CURSOR_EPOCH_UNIX_SECS) / interval_secs.max(1)
}

/// The cursor to return. `jitter_secs` must be drawn uniformly from
/// `1..=3600` by the caller (kept out of this function so it stays pure).
/// Invariant: the result is greater than the client's cursor whenever the
/// client sent a parseable one, and never less than the current interval.
pub fn next_cursor(
    now_unix_secs: u64,
    interval_secs: u64,
    client_cursor: Option<&str>,
    jitter_secs: u64,
) -> u64 {
    let interval_secs = interval_secs.max(1);
    let current = interval_number(now_unix_secs, interval_secs);
    match client_cursor.and_then(|c| c.trim().parse::<u64>().ok()) {
        Some(client) if client >= current => {
            let jitter_intervals = (jitter_secs.clamp(1, 3600) / interval_secs).max(1);
            client.saturating_add(jitter_intervals)
        }
        _ => current,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn without_client_cursor_is_the_interval() {
        assert_eq!(next_cursor(CURSOR_EPOCH_UNIX_SECS + 45, 20, None, 7), 2);
        assert_eq!(next_cursor(0, 20, None, 7), 0);
        assert_eq!(
            next_cursor(CURSOR_EPOCH_UNIX_SECS + 45, 20, Some("garbage"), 7),
            2
        );
    }

    proptest! {
        /// Cursors never go backwards: the answer exceeds any echoed cursor
        /// that is at or ahead of the current interval, and is never behind it.
        #[test]
        fn cursor_is_monotonic(now in CURSOR_EPOCH_UNIX_SECS..CURSOR_EPOCH_UNIX_SECS + 10_000_000_000,
                               interval in 1u64..100_000,
                               client in proptest::option::of(0u64..u64::MAX / 2),
                               jitter in 1u64..=3600) {
            let client_str = client.map(|c| c.to_string());
            let c = next_cursor(now, interval, client_str.as_deref(), jitter);
            prop_assert!(c >= interval_number(now, interval));
            if let Some(client) = client {
                if client >= interval_number(now, interval) {
                    prop_assert!(c > client);
                }
            }
        }
    }
}
