//! Rate limiting per token or client address (issue 7).
//!
//! STUB: configuration type fixed; behaviour filled in by the rate-limit work.

use serde::{Deserialize, Serialize};

/// `[rate_limit]` section of the config file. Off by default.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {}

impl RateLimitConfig {
    pub fn enabled(&self) -> bool {
        false
    }
}
