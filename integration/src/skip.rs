//! How a test that cannot run here says so. It never passes silently: it prints a
//! SKIPPED line with the reason, and where the environment asks for it (CI as root
//! sets `MESH_REQUIRE_DOCKER=1` and the like) it fails instead.

/// Prints why `test` is skipped, or panics when `require` is set to 1. Returns true
/// (skip) when it did not panic.
pub fn skip(test: &str, require: &str, why: &str) -> bool {
    if std::env::var(require).is_ok_and(|v| v == "1") {
        panic!("{test} cannot run here ({why}), and {require}=1 asks that it does");
    }
    eprintln!("SKIPPED {test}: {why}");
    true
}
