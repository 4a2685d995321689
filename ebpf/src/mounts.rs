//! The two file systems the plane needs: bpffs, where maps and links are pinned so
//! they outlive the agent, and a cgroup v2 hierarchy, where the socket programs
//! attach. Neither is mounted on every host (ours mount only cgroup v1), so the agent
//! mounts what is missing and leaves it mounted: other tools may pin there too.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// `BPF_FS_MAGIC` and `CGROUP2_SUPER_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where bpffs goes when it is not mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Where a cgroup v2 hierarchy goes when none is mounted.
pub const CGROUP2: &str = "/run/mesh/cgroup2";

fn magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    // SAFETY: statfs writes into the zeroed struct we pass and reads a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64, u32 on some targets
    Ok(st.f_type as i64)
}

fn mount(fstype: &str, target: &Path) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    let source = CString::new(fstype).expect("no NUL");
    let target_c = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    // SAFETY: all pointers are valid C strings (or null data) for the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            source.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes sure `pin_dir` is on bpffs, mounting bpffs at /sys/fs/bpf when the pin
/// directory is under it and nothing is mounted there yet.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), String> {
    let bpffs = Path::new(BPFFS);
    if pin_dir.starts_with(bpffs) && magic(bpffs).ok() != Some(BPF_FS_MAGIC) {
        mount("bpf", bpffs).map_err(|e| format!("cannot mount bpffs at {BPFFS}: {e}"))?;
        tracing::info!(at = BPFFS, "mounted bpffs");
    }
    std::fs::create_dir_all(pin_dir)
        .map_err(|e| format!("cannot create the pin directory {}: {e}", pin_dir.display()))?;
    match magic(pin_dir) {
        Ok(BPF_FS_MAGIC) => Ok(()),
        Ok(_) => Err(format!(
            "the pin directory {} is not on bpffs; mount one (mount -t bpf bpf DIR) or choose a directory under {BPFFS}",
            pin_dir.display()
        )),
        Err(e) => Err(format!("cannot stat {}: {e}", pin_dir.display())),
    }
}

/// The root of a cgroup v2 hierarchy in `mountinfo` (the text of
/// /proc/self/mountinfo), if one is mounted.
pub fn cgroup2_root(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // id parent major:minor root mountpoint options [optional...] - fstype ...
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let point = fields.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape(point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The cgroup to attach to: `configured`, which must be a cgroup v2 directory, else
/// the root of the cgroup v2 hierarchy, mounted at /run/mesh/cgroup2 if none is.
pub fn cgroup(configured: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = configured {
        return match magic(path) {
            Ok(CGROUP2_SUPER_MAGIC) => Ok(path.to_path_buf()),
            Ok(_) => Err(format!(
                "ebpf.cgroup {} is not in a cgroup v2 hierarchy",
                path.display()
            )),
            Err(e) => Err(format!("ebpf.cgroup {}: {e}", path.display())),
        };
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    if let Some(root) = cgroup2_root(&mountinfo) {
        return Ok(root);
    }
    let target = Path::new(CGROUP2);
    mount("cgroup2", target).map_err(|e| {
        format!("no cgroup v2 hierarchy is mounted, and mounting one at {CGROUP2} failed: {e}")
    })?;
    tracing::info!(at = CGROUP2, "mounted the cgroup v2 hierarchy");
    Ok(target.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_root_and_skips_v1_and_bind_mounts_of_a_subtree() {
        let info = "\
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw\n\
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
40 25 0:28 /sub /mnt/sub rw - cgroup2 cgroup2 rw\n\
41 30 0:28 / /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_root(info),
            Some(PathBuf::from("/sys/fs/cgroup/uni fied"))
        );
        assert_eq!(
            cgroup2_root("31 30 0:27 / /x rw - cgroup cgroup rw\n"),
            None
        );
        assert_eq!(cgroup2_root("garbage\n\n - \n"), None);
    }
}
