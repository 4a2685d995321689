//! Ports for tests to publish. Never from the ephemeral range: on a busy machine the
//! kernel hands a port that `bind(:0)` just returned to the next outgoing connection,
//! and the agent's bind then fails. These come from below the ephemeral range
//! (32768-60999 on Linux), at random so parallel tests rarely meet, and are checked
//! free for TCP and UDP on every address.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const LOW: u64 = 20_000;
const HIGH: u64 = 32_000;

fn next_candidate() -> u16 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        x = now ^ (u64::from(std::process::id()) << 32) | 1;
    }
    // xorshift64: cheap, and different in every process.
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    STATE.store(x, Ordering::Relaxed);
    (LOW + x % (HIGH - LOW)) as u16
}

fn free_for_both(port: u16) -> bool {
    let any: SocketAddr = format!("[::]:{port}").parse().expect("address");
    TcpListener::bind(any).is_ok() && UdpSocket::bind(any).is_ok()
}

/// A port free a moment ago for TCP and UDP on every address.
pub fn free_port() -> u16 {
    for _ in 0..10_000 {
        let port = next_candidate();
        if free_for_both(port) {
            return port;
        }
    }
    panic!("no free port between {LOW} and {HIGH}");
}
