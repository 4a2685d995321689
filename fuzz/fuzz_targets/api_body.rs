//! Any API request body (service create/update, task add), parsed as the API parses
//! it and written through the table's write path. It must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_agent::fuzzing::api_body(data);
});
