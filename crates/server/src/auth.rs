//! Authentication and authorisation of stream routes (issue 7).
//!
//! STUB: the configuration type is fixed so the config file can embed it;
//! the behaviour is filled in by the auth work.

use serde::{Deserialize, Serialize};

/// `[auth]` section of the config file. Off (the default) means every
/// request is allowed, as in `dev`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {}

impl AuthConfig {
    /// Whether any authentication mode is configured (the layer is only
    /// installed then, so a server without auth pays nothing for it).
    pub fn enabled(&self) -> bool {
        false
    }
}

/// Who a request was authenticated as; inserted as a request extension by
/// the auth layer (rate limiting keys on it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    /// A stable name: the static token's name, the JWT `sub`, or the
    /// forward-auth identity.
    pub name: String,
}
