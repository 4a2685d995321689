//! The plane's changes written straight to the kernel as one nf_tables netlink batch,
//! the messages `nft` itself would send, without the `nft` process.
//!
//! Why: `nft -f` of a one-task change to a table of 10,000 services took 117 ms. The
//! kernel's share of it (the batch's `sendmsg`) is about 20 ms; the rest is starting
//! nft, parsing, and reading the whole table back into nft's cache before it sends
//! anything. The table as a whole is still written by `nft -f` (it is a readable
//! file, made once), and so is a new task map, whose `typeof` declaration is nft's own
//! encoding. No crate fits: rustables 0.9 has neither `numgen` nor maps with data, and
//! nftnl binds libnftnl's C and lacks maps too. What is written here is the small set
//! of messages [`Edit`] needs, and a test holds it to what `nft` writes (the kernel's
//! table after netlink changes must equal one written whole by `nft`).
//!
//! The kernel handles a batch inside `sendmsg`: it checks every message, then commits
//! all of them or none, and queues an error for each message it refused before
//! `sendmsg` returns. So after sending, the errors are read without waiting.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use mesh_core::{FrontendKey, Listen};

use crate::edit::{DnatRule, Edit, Family, ip_proto};
use crate::ruleset::{FORWARD_MARK, MASQUERADE_MARK, TABLE};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NLMSG_ERROR: u16 = 2;

const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;

const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

// Registers, numbered as the kernel does: 1 is the first 16-byte register, 9 the
// second 4-byte one (where the port of an IPv4 task lands).
const REG_1: u32 = 1;
const REG_2: u32 = 2;
const REG32_01: u32 = 9;

const NFT_META_MARK: u32 = 3;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CT_MARK: u32 = 3;
const NFT_GOTO: i32 = -4;
const NFT_NAT_DNAT: u32 = 1;

/// Elements per message: each is at most 44 bytes, and a nest's length is 16 bits.
const ELEMENTS_PER_MESSAGE: usize = 512;

/// The largest batch sent; a bigger change goes to `nft` (it is as big as a whole
/// table, and then parsing is not what costs).
const MAX_BATCH: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(io::Error),
    #[error("entering network namespace {ns}: {source}")]
    Netns {
        ns: String,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused `{edit}`: {source}")]
    Refused {
        edit: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not written over netlink")]
    Unsupported(String),
    #[error("a batch of {0} bytes is larger than netlink takes here")]
    TooLarge(usize),
}

/// An attribute writer: type-length-value, each padded to 4 bytes, nests by
/// patching the length once the nest is closed.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, kind: u16, value: &[u8]) {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn str(&mut self, kind: u16, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.put(kind, &v);
    }

    /// Numbers in attributes are big-endian.
    fn u32(&mut self, kind: u16, v: u32) {
        self.put(kind, &v.to_be_bytes());
    }

    fn nest(&mut self, kind: u16, inner: impl FnOnce(&mut Attrs)) {
        let at = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        inner(self);
        // Callers keep nests under 64 KiB (see ELEMENTS_PER_MESSAGE); a longer one
        // would wrap its length and corrupt the batch.
        let len = u16::try_from(self.0.len() - at).expect("a nest under 64 KiB");
        self.0[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// `NFTA_DATA_VALUE` inside a nest of `kind`.
    fn data(&mut self, kind: u16, value: &[u8]) {
        self.nest(kind, |a| a.put(1, value));
    }

    /// One expression of a rule: its name, then its attributes.
    fn expr(&mut self, name: &str, inner: impl FnOnce(&mut Attrs)) {
        self.nest(1, |a| {
            a.str(1, name);
            a.nest(2, inner);
        });
    }
}

/// A batch under construction: the messages, and which edit each one came from.
struct Batch {
    buf: Vec<u8>,
    seq: u32,
    /// `(seq, index of the edit)` of every message between begin and end.
    origin: Vec<(u32, usize)>,
}

impl Batch {
    fn new() -> Batch {
        let mut b = Batch {
            buf: Vec::new(),
            seq: 0,
            origin: Vec::new(),
        };
        // The batch messages name the subsystem in the header's resource id.
        b.message(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        b
    }

    fn message(&mut self, kind: u16, flags: u16, family: u8, res_id: u16, attrs: &[u8]) {
        let len = 16 + 4 + attrs.len();
        self.seq += 1;
        self.buf.extend_from_slice(&(len as u32).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        // struct nfgenmsg: family, version, resource id (big-endian).
        self.buf.push(family);
        self.buf.push(0);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        self.buf.extend_from_slice(attrs);
    }

    fn nft(&mut self, edit: usize, kind: u16, flags: u16, attrs: Attrs) {
        self.message(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST | flags,
            NFPROTO_INET,
            0,
            &attrs.0,
        );
        self.origin.push((self.seq, edit));
    }

    fn finish(mut self) -> Batch {
        self.message(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        self
    }
}

/// The messages for `edits`, as one transaction.
fn encode(edits: &[Edit]) -> Result<Batch, NetlinkError> {
    let mut b = Batch::new();
    for (i, edit) in edits.iter().enumerate() {
        let mut a = Attrs::default();
        match edit {
            Edit::AddMap(_) => return Err(NetlinkError::Unsupported(edit.to_string())),
            Edit::DeleteTasks { map, keys } => {
                // An attribute's length is 16 bits: long lists go in several messages.
                for chunk in keys.chunks(ELEMENTS_PER_MESSAGE) {
                    let mut a = Attrs::default();
                    set_head(&mut a, &map.name());
                    a.nest(3, |a| {
                        for k in chunk {
                            // The counter's value is a host-order number.
                            a.nest(1, |a| a.data(1, &k.to_ne_bytes()));
                        }
                    });
                    b.nft(i, NFT_MSG_DELSETELEM, 0, a);
                }
            }
            Edit::AddTasks { map, tasks } => {
                for chunk in tasks.chunks(ELEMENTS_PER_MESSAGE) {
                    let mut a = Attrs::default();
                    set_head(&mut a, &map.name());
                    a.nest(3, |a| {
                        for (k, addr) in chunk {
                            a.nest(1, |a| {
                                a.data(1, &k.to_ne_bytes());
                                a.data(2, &task_value(addr));
                            });
                        }
                    });
                    b.nft(i, NFT_MSG_NEWSETELEM, NLM_F_CREATE, a);
                }
            }
            Edit::AddChain(chain) => {
                a.str(1, TABLE);
                a.str(3, chain);
                b.nft(i, NFT_MSG_NEWCHAIN, NLM_F_CREATE, a);
            }
            Edit::FlushChain(chain) => {
                // A rule delete that names a chain and no rule empties the chain.
                a.str(1, TABLE);
                a.str(2, chain);
                b.nft(i, NFT_MSG_DELRULE, 0, a);
            }
            Edit::DeleteChain(chain) => {
                a.str(1, TABLE);
                a.str(3, chain);
                b.nft(i, NFT_MSG_DELCHAIN, 0, a);
            }
            Edit::AddRule { chain, rule } => {
                a.str(1, TABLE);
                a.str(2, chain);
                a.nest(4, |a| dnat_rule(a, rule));
                b.nft(i, NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, a);
            }
            Edit::AddFrontend { key, chain } => {
                set_head(&mut a, crate::edit::dispatch_map(key));
                a.nest(3, |a| {
                    a.nest(1, |a| {
                        a.data(1, &dispatch_value(key));
                        a.nest(2, |a| {
                            a.nest(2, |a| {
                                a.put(1, &NFT_GOTO.to_be_bytes());
                                a.str(2, chain);
                            })
                        });
                    })
                });
                b.nft(i, NFT_MSG_NEWSETELEM, NLM_F_CREATE, a);
            }
            Edit::DeleteFrontend(key) => {
                set_head(&mut a, crate::edit::dispatch_map(key));
                a.nest(3, |a| a.nest(1, |a| a.data(1, &dispatch_value(key))));
                b.nft(i, NFT_MSG_DELSETELEM, 0, a);
            }
        }
    }
    let b = b.finish();
    if b.buf.len() > MAX_BATCH {
        return Err(NetlinkError::TooLarge(b.buf.len()));
    }
    Ok(b)
}

/// The table and set that an element message is about.
fn set_head(a: &mut Attrs, set: &str) {
    a.str(1, TABLE);
    a.str(2, set);
}

/// A task as a map's value: the address, then the port in the next 4-byte register.
fn task_value(addr: &SocketAddr) -> Vec<u8> {
    let mut v = match addr.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    v.extend_from_slice(&addr.port().to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v
}

/// A frontend's key in its verdict map: each part of the concatenation padded to
/// 4 bytes (`[address .] protocol . port`).
fn dispatch_value(key: &FrontendKey) -> Vec<u8> {
    let mut v = match key.listen {
        Listen::Published => Vec::new(),
        Listen::Vip(IpAddr::V4(ip)) => ip.octets().to_vec(),
        Listen::Vip(IpAddr::V6(ip)) => ip.octets().to_vec(),
    };
    v.extend_from_slice(&[ip_proto(key.protocol), 0, 0, 0]);
    v.extend_from_slice(&key.port.to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v
}

/// The expressions of a [`DnatRule`], as `nft --debug=netlink` lists them for its text.
fn dnat_rule(a: &mut Attrs, rule: &DnatRule) {
    let (nfproto, port_reg) = match rule.map.family {
        Family::V4 => (NFPROTO_IPV4, REG32_01),
        Family::V6 => (NFPROTO_IPV6, REG_2),
    };
    let meta_load = |a: &mut Attrs, key: u32| {
        a.expr("meta", |a| {
            a.u32(2, key);
            a.u32(1, REG_1);
        })
    };
    let cmp_eq = |a: &mut Attrs, value: u8| {
        a.expr("cmp", |a| {
            a.u32(1, REG_1);
            a.u32(2, 0);
            a.data(3, &[value]);
        })
    };
    // `x | bit`, which the kernel does as `(x & !bit) ^ bit`; marks are host-order.
    let set_bit = |a: &mut Attrs, bit: u32| {
        a.expr("bitwise", |a| {
            a.u32(1, REG_1);
            a.u32(2, REG_1);
            a.u32(6, 0);
            a.u32(3, 4);
            a.data(4, &(!bit).to_ne_bytes());
            a.data(5, &bit.to_ne_bytes());
        })
    };
    meta_load(a, NFT_META_NFPROTO);
    cmp_eq(a, nfproto);
    meta_load(a, NFT_META_L4PROTO);
    cmp_eq(a, ip_proto(rule.map.protocol));
    a.expr("ct", |a| {
        a.u32(2, NFT_CT_MARK);
        a.u32(1, REG_1);
    });
    set_bit(a, FORWARD_MARK);
    a.expr("ct", |a| {
        a.u32(2, NFT_CT_MARK);
        a.u32(4, REG_1);
    });
    if rule.masquerade {
        meta_load(a, NFT_META_MARK);
        set_bit(a, MASQUERADE_MARK);
        a.expr("meta", |a| {
            a.u32(2, NFT_META_MARK);
            a.u32(3, REG_1);
        });
    }
    a.expr("numgen", |a| {
        a.u32(1, REG_1);
        a.u32(2, rule.modulus);
        a.u32(3, 0);
        a.u32(4, rule.offset);
    });
    a.expr("lookup", |a| {
        a.str(1, &rule.map.name());
        a.u32(2, REG_1);
        a.u32(3, REG_1);
    });
    a.expr("nat", |a| {
        a.u32(1, NFT_NAT_DNAT);
        a.u32(2, nfproto as u32);
        a.u32(3, REG_1);
        a.u32(5, port_reg);
    });
}

/// A netlink socket to nf_tables, in the namespace the plane works in. Clones share
/// the socket; a lock keeps one batch and its errors apart from another's.
#[derive(Clone)]
pub struct Netlink {
    fd: Arc<std::sync::Mutex<OwnedFd>>,
}

impl Netlink {
    /// Opens the socket in network namespace `ns` (by its `ip netns` name), or in
    /// ours. The socket stays in the namespace it was made in.
    pub fn open(ns: Option<&str>) -> Result<Netlink, NetlinkError> {
        let fd = match ns {
            None => socket()?,
            Some(ns) => {
                let path = format!("/run/netns/{ns}");
                let file = std::fs::File::open(&path).map_err(|source| NetlinkError::Netns {
                    ns: ns.to_string(),
                    source,
                })?;
                // setns moves only the calling thread, so a thread of its own enters
                // the namespace, makes the socket and ends.
                std::thread::scope(|s| {
                    s.spawn(|| {
                        // SAFETY: setns with a namespace fd we hold; it affects only
                        // this short-lived thread.
                        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                            return Err(NetlinkError::Netns {
                                ns: ns.to_string(),
                                source: io::Error::last_os_error(),
                            });
                        }
                        socket()
                    })
                    .join()
                    .unwrap_or_else(|_| {
                        Err(NetlinkError::Socket(io::Error::other(
                            "the namespace thread panicked",
                        )))
                    })
                })?
            }
        };
        Ok(Netlink {
            fd: Arc::new(std::sync::Mutex::new(fd)),
        })
    }

    /// Sends `edits` as one transaction and waits until the kernel has committed it
    /// or refused it. Blocking: call it off the async runtime.
    pub fn apply(&self, edits: &[Edit]) -> Result<(), NetlinkError> {
        let batch = encode(edits)?;
        let socket = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        let fd = socket.as_raw_fd();
        // A send larger than the socket's buffer is refused; the buffer is grown to
        // the batch (FORCE: past the sysctl limit, which a root agent may do).
        let want = (batch.buf.len() + 4096).max(1 << 20) as libc::c_int;
        // SAFETY: setsockopt with a valid fd and an int option.
        let grown = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                (&want as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if grown != 0 && batch.buf.len() > 200 * 1024 {
            // Without CAP_NET_ADMIN the default buffer (about 212 KB) is the limit.
            return Err(NetlinkError::TooLarge(batch.buf.len()));
        }
        // Errors a previous batch left unread are not this batch's.
        let _ = drain(fd, &mut |_, _| {});
        // SAFETY: send of a buffer we own to a valid fd.
        let sent = unsafe { libc::send(fd, batch.buf.as_ptr().cast(), batch.buf.len(), 0) };
        if sent < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        let mut first: Option<(u32, i32)> = None;
        let lost = drain(fd, &mut |seq, errno| {
            if errno != 0 && first.is_none_or(|(s, _)| seq < s) {
                first = Some((seq, errno));
            }
        });
        if lost && first.is_none() {
            // Errors overflowed the receive buffer: the batch failed, but which
            // message is not known.
            return Err(NetlinkError::Refused {
                edit: "the batch".into(),
                source: io::Error::from_raw_os_error(libc::ENOBUFS),
            });
        }
        match first {
            None => Ok(()),
            Some((seq, errno)) => {
                let edit = batch
                    .origin
                    .iter()
                    .find(|(s, _)| *s == seq)
                    .map(|(_, i)| shorten(edits[*i].to_string()))
                    .unwrap_or_else(|| format!("message {seq} of the batch"));
                Err(NetlinkError::Refused {
                    edit,
                    source: io::Error::from_raw_os_error(errno),
                })
            }
        }
    }
}

/// An edit as an error names it: a list of thousands of elements is cut short.
fn shorten(mut text: String) -> String {
    crate::command::cut_short(&mut text, 300);
    text
}

fn socket() -> Result<OwnedFd, NetlinkError> {
    // SAFETY: socket() has no preconditions; the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(NetlinkError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Ask for acks without the refused message copied in: an error then costs a
    // few bytes of the receive buffer, not the message.
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and an int option; failure only means
    // longer error messages.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_NETLINK,
            libc::NETLINK_CAP_ACK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    Ok(fd)
}

/// Reads every message waiting on the socket, without blocking; calls `each` with
/// the sequence number and errno of each error message (0: an ack). Returns whether
/// messages were lost to a full receive buffer.
fn drain(fd: i32, each: &mut dyn FnMut(u32, i32)) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    let mut lost = false;
    loop {
        // SAFETY: recv into a buffer we own, of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                // Some replies were dropped; read on to the ones still queued.
                Some(libc::ENOBUFS) => {
                    lost = true;
                    continue;
                }
                Some(libc::EINTR) => continue,
                _ => return lost,
            }
        }
        if n == 0 {
            return lost;
        }
        let mut at = 0usize;
        let n = n as usize;
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
            if len < 16 {
                break;
            }
            // struct nlmsgerr: the error, then the header of the message it is about.
            // Read even from a reply cut short by the buffer: the error comes first.
            if kind == NLMSG_ERROR && len >= 16 + 4 + 16 && at + 36 <= n {
                let errno = i32::from_ne_bytes(buf[at + 16..at + 20].try_into().expect("4"));
                let seq = u32::from_ne_bytes(buf[at + 28..at + 32].try_into().expect("4"));
                each(seq, -errno);
            }
            at += (len + 3) & !3;
            if at > n {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::TaskMap;
    use mesh_core::Protocol;

    #[test]
    fn an_edit_named_in_an_error_is_cut_short() {
        assert_eq!(
            shorten("add chain inet mesh x".into()),
            "add chain inet mesh x"
        );
        let long = shorten("é".repeat(400));
        assert!(long.len() <= 304 && long.ends_with('…'), "{long}");
    }

    #[test]
    fn attributes_are_padded_and_nests_carry_their_length() {
        let mut a = Attrs::default();
        a.str(1, "mesh");
        assert_eq!(a.0, [9, 0, 1, 0, b'm', b'e', b's', b'h', 0, 0, 0, 0]);
        let mut a = Attrs::default();
        a.nest(3, |a| a.u32(1, 7));
        assert_eq!(a.0, [12, 0, 3, 0x80, 8, 0, 1, 0, 0, 0, 0, 7]);
    }

    #[test]
    fn a_task_is_its_address_then_its_port_padded() {
        let v4: SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert_eq!(task_value(&v4), [10, 0, 0, 2, 0, 80, 0, 0]);
        let v6: SocketAddr = "[fd00::1]:53".parse().unwrap();
        assert_eq!(task_value(&v6).len(), 20);
        assert_eq!(&task_value(&v6)[16..], [0, 53, 0, 0]);
    }

    #[test]
    fn each_message_maps_back_to_its_edit_and_a_map_declaration_is_refused() {
        let map = TaskMap {
            family: Family::V4,
            protocol: Protocol::Tcp,
            group: 0,
        };
        let edits = vec![
            Edit::FlushChain("svc_web_tcp_8080".into()),
            Edit::DeleteTasks {
                map,
                keys: vec![0, 1],
            },
        ];
        let b = encode(&edits).unwrap();
        assert_eq!(b.origin, [(2, 0), (3, 1)]);
        // Begin, two messages, end: every length adds up to the buffer.
        let mut at = 0;
        let mut count = 0;
        while at < b.buf.len() {
            at += u32::from_ne_bytes(b.buf[at..at + 4].try_into().unwrap()) as usize;
            count += 1;
        }
        assert_eq!((at, count), (b.buf.len(), 4));
        assert!(matches!(
            encode(&[Edit::AddMap(map)]),
            Err(NetlinkError::Unsupported(_))
        ));
    }
}
