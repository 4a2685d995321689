//! Any anti-entropy frame an authenticated peer could send, through the step that
//! takes it, against a table with services and tasks. It must never panic, and the
//! table's snapshot must stay consistent (checked in debug builds).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_gossip::fuzzing::{sample_replica, sync_frame};

fuzz_target!(|data: &[u8]| {
    let mut replica = sample_replica("fuzz");
    sync_frame(&mut replica, data);
});
