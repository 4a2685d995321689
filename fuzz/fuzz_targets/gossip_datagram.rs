//! Any datagram anyone can send to the gossip port: opened by the keyring, then
//! decoded by foca with the deltas it carries. It must never panic.
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use mesh_gossip::fuzzing::Datagrams;

static TARGET: Mutex<Option<Datagrams>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut target = TARGET.lock().unwrap_or_else(|p| p.into_inner());
    target.get_or_insert_with(Datagrams::default).feed(data);
});
