//! Any config file: accepted, or refused with an error that names the file. It must
//! never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_agent::fuzzing::config(data);
});
