//! The whole request path of mesh-dns on arbitrary bytes, the function the server
//! runs: parse, allow list, check, answer from a zone with services of every mode,
//! encode with truncation. It must never panic, and what it sends must parse.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mesh_dns::Zone;

fn zone() -> &'static Zone {
    static ZONE: OnceLock<Zone> = OnceLock::new();
    ZONE.get_or_init(|| Zone::build(&mesh_dns::fuzzing::sample_snapshot(), "mesh", 5))
}

fuzz_target!(|data: &[u8]| {
    mesh_dns::fuzzing::exercise(zone(), data);
});
