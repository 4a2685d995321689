//! What a container engine hands the Docker source: containers' labels, observed and
//! written into a table as the agent does, or the engine's JSON for a container. It
//! must never panic, and every skipped container is named with its label.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_docker::fuzzing::engine_input(data);
});
