//! Warnings logged through [`mesh_core::log_limit::LogLimit`].

use std::time::Instant;

use tracing::warn;

#[derive(Default)]
pub struct LogLimit(mesh_core::log_limit::LogLimit);

impl LogLimit {
    pub fn warn(&mut self, kind: &'static str, message: impl FnOnce() -> String) {
        if let Some(suppressed) = self.0.allow(kind, Instant::now()) {
            warn!(suppressed, "{}", message());
        }
    }
}
