use serde::{Deserialize, Serialize};

/// Every error the API returns: a short machine-readable kind and a sentence that
/// names the field or the thing at fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// `bad_request`, `not_found`, `conflict`, `unauthorized`, `storage`, ...
    pub error: String,
    pub detail: String,
}
