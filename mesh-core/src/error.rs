use std::fmt;

use crate::protocol::Protocol;

/// A value that fails validation. `field` is the path of the offending field as a user
/// wrote it (`ports[1].published`), so the message can point at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelError {
    pub field: String,
    pub message: String,
}

impl ModelError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Prefixes the field path, so nested validators can stay unaware of their parent.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_string()
        } else if self.field.starts_with('[') {
            format!("{parent}{}", self.field)
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ModelError {}

/// Why a change to the [`Replica`](crate::Replica) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Invalid(#[from] ModelError),
    #[error("service {0:?} not found")]
    ServiceNotFound(String),
    #[error("task {task:?} of service {service:?} not found")]
    TaskNotFound { service: String, task: String },
    #[error("service {0:?} already exists")]
    ServiceExists(String),
    #[error("task {task:?} already exists in service {service:?}")]
    TaskExists { service: String, task: String },
    #[error(
        "no free VIP for service {0:?}: the VIP pool is full; widen vip.ipv4_cidr / vip.ipv6_cidr"
    )]
    VipPoolFull(String),
    #[error("published port {port}/{protocol} is already used by service {holder:?}")]
    PortInUse {
        port: u16,
        protocol: Protocol,
        holder: String,
    },
}

/// An error and its sources on one line, joined by ": ", as users read them.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        out.push_str(": ");
        out.push_str(&source.to_string());
        next = source.source();
    }
    out
}
