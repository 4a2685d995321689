//! Default locations, which differ for root (a system service) and other users.

use std::path::PathBuf;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn runtime_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/mesh");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("mesh"),
        // SAFETY: getuid has no preconditions.
        _ => std::env::temp_dir().join(format!("mesh-{}", unsafe { libc::getuid() })),
    }
}

/// `/run/mesh/mesh.sock` as root, otherwise under `$XDG_RUNTIME_DIR`.
pub fn default_socket() -> PathBuf {
    runtime_dir().join("mesh.sock")
}

/// `/var/lib/mesh` as root, otherwise `$XDG_STATE_HOME/mesh` (or `~/.local/state/mesh`).
pub fn default_data_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/mesh");
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("mesh");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/state/mesh"),
        None => runtime_dir().join("state"),
    }
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let name = if ok {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).to_string()
    } else {
        String::new()
    };
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}
