//! Response compression of catch-up and long-poll bodies (issue 7).
//!
//! STUB: configuration type fixed; behaviour filled in by the compression work.

use serde::{Deserialize, Serialize};

/// `[compression]` section of the config file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {}

impl CompressionConfig {
    pub fn enabled(&self) -> bool {
        false
    }
}
