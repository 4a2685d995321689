//! `mesh`: the agent daemon and its CLI in one binary.

fn main() -> std::process::ExitCode {
    mesh_agent::main()
}
