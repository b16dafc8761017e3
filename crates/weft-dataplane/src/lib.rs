//! The only weft code that touches the kernel: network namespaces, netlink (links, addresses,
//! routes), sysctls. Everything above it plans; this crate carries plans out.

pub mod batch;
pub mod bpf;
pub mod cgroup;
pub mod ioctl;
pub mod link;
pub mod mountns;
pub mod netns;
pub mod nft;
pub mod probe;
pub mod reconcile;
pub mod route;
pub mod sysctl;
pub mod udp;

pub use link::{Link, Nl, PairKind, VethSpec, RTPROT_WEFT, RTPROT_WEFT_POD};
pub use mountns::MountNs;
pub use netns::Netns;
pub use route::Route;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{path}: no such network namespace ({reason})")]
    NoNetns { path: String, reason: String },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{what}: {errno}")]
    Sys {
        what: String,
        errno: nix::errno::Errno,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl DataplaneError {
    /// The kernel's errno behind the error, if it came from the kernel.
    pub fn errno(&self) -> Option<i32> {
        match self {
            DataplaneError::Netlink {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => m.code.map(|c| -c.get()),
            DataplaneError::Sys { errno, .. } => Some(*errno as i32),
            DataplaneError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
