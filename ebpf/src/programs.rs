//! The socket programs in the kernel: loading `sock_lb.bpf.o` with aya, attaching its
//! eight programs to a cgroup, and pinning maps and links under the pin directory so
//! that they outlive the agent. The only code that knows aya.
//!
//! Layout of the pin directory:
//! - `maps-v1/`: the maps, pinned by name. A restart finds them there and keeps their
//!   contents. The `v1` changes whenever a map's layout does, because aya reuses a
//!   pinned map without checking its layout; other `maps-*` directories are left by
//!   an older layout and removed once the new programs are attached.
//! - `links/`: one link per program. While a link is pinned its program stays
//!   attached; removing the pin detaches it.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuValues};
use mesh_core::error::chain;

use crate::layout::{BackendValue, FrontendKey, FrontendValue, RevnatKey, RevnatValue};

/// The programs, by function name, and what each does.
pub const PROGRAMS: [(&str, &str); 8] = [
    ("mesh_connect4", "connect() to an IPv4 VIP goes to a task"),
    ("mesh_connect6", "connect() to an IPv6 VIP goes to a task"),
    ("mesh_sendmsg4", "sendto() an IPv4 VIP goes to a task"),
    ("mesh_sendmsg6", "sendto() an IPv6 VIP goes to a task"),
    (
        "mesh_recvmsg4",
        "a task's UDP answer appears to come from the VIP",
    ),
    (
        "mesh_recvmsg6",
        "a task's UDP answer appears to come from the VIP",
    ),
    ("mesh_getpeername4", "getpeername() returns the VIP"),
    ("mesh_getpeername6", "getpeername() returns the VIP"),
];

/// The map directory of this layout; `port_lb`'s maps are pinned there too.
pub const MAPS: &str = "maps-v1";
const LINKS: &str = "links";

pub struct Programs {
    /// Holds the programs' file descriptors for as long as the plane runs.
    _ebpf: aya::Ebpf,
    /// The pin directory, locked: a second agent pinning there would detach our
    /// programs when it replaced the links.
    _lock: std::fs::File,
    pub frontends: HashMap<MapData, FrontendKey, FrontendValue>,
    pub backends: HashMap<MapData, u32, BackendValue>,
    /// New connections and UDP flows per backend id, per CPU.
    pub picks: PerCpuArray<MapData, u64>,
    /// The task each balanced socket was sent to (LRU): which sockets are ours to end.
    /// Taken by the plane for its [`crate::endings::Endings`].
    pub revnat: Option<HashMap<MapData, RevnatKey, RevnatValue>>,
    pin_dir: PathBuf,
}

#[cfg(feature = "bpf")]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_lb.bpf.o"));

/// Whether this binary carries the programs (built with the `bpf` feature).
pub const BUILT: bool = cfg!(feature = "bpf");

pub const NOT_BUILT: &str = "this mesh binary was built without the eBPF programs; build it with `--features ebpf` (needs clang-19, libbpf-dev and linux-libc-dev)";

impl Programs {
    /// Loads the programs, attaches them to `cgroup`, and pins them under `pin_dir`,
    /// replacing the links a previous run pinned there. Returns whether there were
    /// any (the previous run's state is then adopted).
    pub fn open(pin_dir: &Path, cgroup: &Path) -> Result<(Programs, bool), String> {
        #[cfg(feature = "bpf")]
        {
            Self::load(OBJECT, pin_dir, cgroup)
        }
        #[cfg(not(feature = "bpf"))]
        {
            let _ = (pin_dir, cgroup);
            Err(NOT_BUILT.to_string())
        }
    }

    #[cfg_attr(not(feature = "bpf"), allow(dead_code))]
    fn load(object: &[u8], pin_dir: &Path, cgroup: &Path) -> Result<(Programs, bool), String> {
        use aya::programs::links::FdLink;
        use aya::programs::{CgroupAttachMode, CgroupSockAddr};

        let lock = lock(pin_dir)?;
        let maps_dir = pin_dir.join(MAPS);
        let links_dir = pin_dir.join(LINKS);
        for dir in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let adopted = std::fs::read_dir(&links_dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(object)
            .map_err(|e| format!("loading the eBPF object: {}", chain(&e)))?;
        let target = std::fs::File::open(cgroup)
            .map_err(|e| format!("cannot open the cgroup {}: {e}", cgroup.display()))?;
        for (name, _) in PROGRAMS {
            let program: &mut CgroupSockAddr = find_program(&mut ebpf, name)?;
            program
                .load()
                .map_err(|e| format!("the kernel refused {name}: {}", chain(&e)))?;
            // A cgroup link is always one of many programs on the hook; the kernel
            // refuses attach flags on links, and `Single` is aya's "no flags".
            let id = program
                .attach(&target, CgroupAttachMode::Single)
                .map_err(|e| format!("attaching {name} to {}: {}", cgroup.display(), chain(&e)))?;
            let link: FdLink = program
                .take_link(id)
                .map_err(|e| format!("{name}: {}", chain(&e)))?
                .try_into()
                .map_err(|e| format!("{name}: {}", chain(&e)))?;
            // The previous run's link goes only now, so the hook is never without a
            // program: for a moment both run, and the second finds a task address,
            // not a VIP, and leaves it alone.
            pin_link(link, &links_dir.join(name))?;
        }
        remove_other_layouts(pin_dir, &links_dir);
        let frontends = take_map(&mut ebpf, "mesh_frontends")?;
        let backends = take_map(&mut ebpf, "mesh_backends")?;
        let picks = take_map(&mut ebpf, "mesh_picks")?;
        let revnat = take_map(&mut ebpf, "mesh_revnat")?;
        Ok((
            Programs {
                _ebpf: ebpf,
                _lock: lock,
                frontends,
                backends,
                picks,
                revnat: Some(revnat),
                pin_dir: pin_dir.to_path_buf(),
            },
            adopted,
        ))
    }

    /// The connections and UDP flows the programs sent to backend `id`, over all CPUs.
    pub fn picks(&self, id: u32) -> Option<u64> {
        let values = self.picks.get(&id, 0).ok()?;
        Some(over_cpus(&values))
    }

    /// The counts of backend ids `0..end`, over all CPUs, read in one system call
    /// (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6): a read per id is a call per id, 65,536 of
    /// them every two seconds at the map's size. aya 0.14 has no batch operations,
    /// so the call is made here. `None` where the kernel refuses it (the caller then
    /// reads id by id).
    pub fn all_picks(&self, end: u32) -> Option<Vec<u64>> {
        use std::os::fd::{AsFd, AsRawFd};

        use aya::maps::IterableMap;

        const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
        /// `union bpf_attr`'s `batch` member.
        #[repr(C)]
        struct Batch {
            in_batch: u64,
            out_batch: u64,
            keys: u64,
            values: u64,
            count: u32,
            map_fd: u32,
            elem_flags: u64,
            flags: u64,
        }
        let end = end.min(self.picks.len());
        if end == 0 {
            return Some(Vec::new());
        }
        let cpus = aya::util::nr_cpus().ok()?;
        let mut keys = vec![0u32; end as usize];
        // Each element is the value (8 bytes) for every possible CPU.
        let mut values = vec![0u64; end as usize * cpus];
        let mut out_batch = 0u32;
        let fd = self.picks.map().fd().as_fd().as_raw_fd();
        let mut attr = Batch {
            in_batch: 0,
            out_batch: &mut out_batch as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: end,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: the kernel writes at most `count` keys and values into buffers
        // sized for `count` elements, and one key into out_batch.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut Batch,
                std::mem::size_of::<Batch>(),
            )
        };
        // ENOENT: the map ended before `count` (not here, but harmless).
        if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT) {
            return None;
        }
        let mut out = vec![0u64; end as usize];
        for (i, key) in keys.iter().take(attr.count as usize).enumerate() {
            let sum = over_cpus(&values[i * cpus..(i + 1) * cpus]);
            if let Some(slot) = out.get_mut(*key as usize) {
                *slot = sum;
            }
        }
        Some(out)
    }

    /// Zeroes the count of `id`, which is about to name another task.
    pub fn reset_picks(&mut self, id: u32) -> Result<(), String> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| format!("{what}: {e}"))?;
        let zeros = PerCpuValues::try_from(vec![0u64; cpus]).map_err(|e| e.to_string())?;
        self.picks
            .set(id, zeros, 0)
            .map_err(|e| format!("zeroing mesh_picks[{id}]: {e}"))
    }

    /// Detaches every program and removes every pin: nothing is left in the kernel
    /// once the agent's own descriptors close.
    pub fn remove(self) -> Result<(), String> {
        let mut errors = Vec::new();
        // XDP first: it hands packets it took to the tcx programs.
        crate::ports::remove_xdp_links(&self.pin_dir.join(crate::ports::PORT_LINKS));
        // Links first: a map goes only when no program holds it.
        for dir in [LINKS, crate::ports::PORT_LINKS, MAPS] {
            let path = self.pin_dir.join(dir);
            if let Err(e) = std::fs::remove_dir_all(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                errors.push(format!("{}: {e}", path.display()));
            }
        }
        // The directory itself goes when nothing else is pinned in it.
        let _ = std::fs::remove_dir(&self.pin_dir);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// A per-CPU counter's total: the sum of every CPU's count (wrapping, as the
/// programs' counters do).
pub fn over_cpus(values: &[u64]) -> u64 {
    values.iter().fold(0u64, |a, b| a.wrapping_add(*b))
}

/// Program `name` of `ebpf` as the program type `P`, or says what is wrong.
pub fn find_program<'a, P>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut P, String>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("the eBPF object has no program {name}"))?
        .try_into()
        .map_err(|e| format!("{name}: {}", chain(&e)))
}

/// Pins `link` at `pin`, in place of what a previous run pinned there: that link,
/// and so its program's attachment, goes once the new one is in place.
pub fn pin_link(link: aya::programs::links::FdLink, pin: &Path) -> Result<(), String> {
    match std::fs::remove_file(pin) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot replace {}: {e}", pin.display())),
    }
    link.pin(pin)
        .map(|_| ())
        .map_err(|e| format!("pinning {}: {}", pin.display(), chain(&e)))
}

/// Takes map `name` out of `ebpf` as the typed map `M`, or says what is wrong.
pub fn take_map<M>(ebpf: &mut aya::Ebpf, name: &str) -> Result<M, String>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| format!("the eBPF object has no map {name}"))?;
    M::try_from(map).map_err(|e| format!("{name}: {}", chain(&e)))
}

/// Whether a map operation failed only because the key is not there: aya 0.14
/// reports a delete's ENOENT as a failed system call, not as `KeyNotFound`.
pub fn not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Takes the pin directory for this agent, or says who has it.
fn lock(pin_dir: &Path) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(pin_dir)
        .map_err(|e| format!("cannot create {}: {e}", pin_dir.display()))?;
    let dir = std::fs::File::open(pin_dir)
        .map_err(|e| format!("cannot open {}: {e}", pin_dir.display()))?;
    // SAFETY: flock on a descriptor we own; the lock lives as long as the File.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "another mesh agent uses ebpf.pin_dir {}; give each agent on a host its own",
            pin_dir.display()
        ));
    }
    Ok(dir)
}

/// Links of programs this version does not have, then map directories of other
/// layouts (their programs are detached by then).
fn remove_other_layouts(pin_dir: &Path, links_dir: &Path) {
    for entry in std::fs::read_dir(links_dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        if !PROGRAMS.iter().any(|(p, _)| name.to_str() == Some(p)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("maps-")
            && name != MAPS
            && let Err(e) = std::fs::remove_dir_all(entry.path())
        {
            tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove the maps of an older layout");
        }
    }
}
