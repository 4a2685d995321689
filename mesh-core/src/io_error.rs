//! Telling this host's own trouble from a peer's. A connect or accept that fails
//! because this process ran out of descriptors, memory or buffers says nothing about
//! the task or the client: it must not eject a healthy task, mark it unhealthy, or be
//! logged once per attempt while a loop spins.

use std::io;
use std::time::Duration;

/// This host is out of a resource: descriptors (EMFILE, ENFILE), buffers (ENOBUFS) or
/// memory (ENOMEM).
pub fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// What an accept loop does after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptFailure {
    /// The listening socket is gone or was shut down: stop.
    Closed,
    /// This host is out of a resource: wait before accepting again.
    Exhausted,
    /// One connection failed before it was accepted (reset, aborted): go on.
    Transient,
}

pub fn classify_accept(e: &io::Error) -> AcceptFailure {
    if is_local_exhaustion(e) {
        return AcceptFailure::Exhausted;
    }
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::EBADF | libc::ENOTSOCK) => AcceptFailure::Closed,
        _ => AcceptFailure::Transient,
    }
}

/// How long an accept loop waits after failures: nothing for a transient one, and for
/// exhaustion 10 ms doubling to 1 s while it lasts, so a full descriptor table costs a
/// few wake-ups a second instead of a spinning core.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    exhausted: u32,
}

impl AcceptBackoff {
    pub fn accepted(&mut self) {
        self.exhausted = 0;
    }

    /// The pause after `failure`.
    pub fn after(&mut self, failure: AcceptFailure) -> Duration {
        match failure {
            AcceptFailure::Exhausted => {
                self.exhausted = (self.exhausted + 1).min(8);
                Duration::from_millis(10u64 << (self.exhausted - 1)).min(Duration::from_secs(1))
            }
            AcceptFailure::Transient | AcceptFailure::Closed => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_and_backoff() {
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(is_local_exhaustion(&emfile));
        assert!(!is_local_exhaustion(&io::Error::from_raw_os_error(
            libc::ECONNREFUSED
        )));
        assert_eq!(classify_accept(&emfile), AcceptFailure::Exhausted);
        assert_eq!(
            classify_accept(&io::Error::from_raw_os_error(libc::EINVAL)),
            AcceptFailure::Closed
        );
        assert_eq!(
            classify_accept(&io::Error::from_raw_os_error(libc::ECONNABORTED)),
            AcceptFailure::Transient
        );
        let mut b = AcceptBackoff::default();
        let waits: Vec<u64> = (0..10)
            .map(|_| b.after(AcceptFailure::Exhausted).as_millis() as u64)
            .collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.accepted();
        assert_eq!(b.after(AcceptFailure::Exhausted), Duration::from_millis(10));
    }
}
