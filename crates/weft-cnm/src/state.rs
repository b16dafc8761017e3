//! What the plugin must remember across restarts (Docker never replays CreateNetwork or
//! CreateEndpoint to a remote driver): one JSON file per network, endpoint and pool under
//! the state directory, written aside and renamed into place (whole or not at all), root only.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NetworkRec {
    pub id: String,
    /// "routed" or "bridge".
    pub mode: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct EndpointRec {
    pub id: String,
    pub network_id: String,
    pub address: Ipv4Addr,
    /// The host side of its pair (weft-cni's naming: the agent's host routing sees it).
    pub host_veth: String,
    /// The far side until Docker moves it into the container and renames it.
    pub peer: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PoolRec {
    pub id: String,
}

pub struct State {
    dir: PathBuf,
}

/// IDs become file names: Docker's are 64 hex digits, weft's pools `weft-` and 16; anything
/// that could leave the directory is refused.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl State {
    pub fn open(dir: &Path) -> std::io::Result<State> {
        for sub in ["networks", "endpoints", "pools"] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join(sub))?;
        }
        Ok(State {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, kind: &str, id: &str) -> PathBuf {
        self.dir.join(kind).join(format!("{id}.json"))
    }

    fn get<T: DeserializeOwned>(&self, kind: &str, id: &str) -> Option<T> {
        if !valid_id(id) {
            return None;
        }
        let text = std::fs::read(self.path(kind, id)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn put<T: Serialize>(&self, kind: &str, id: &str, v: &T) -> std::io::Result<()> {
        let path = self.path(kind, id);
        let tmp = self.dir.join(kind).join(format!(".tmp-{id}"));
        let text = serde_json::to_vec(v).map_err(std::io::Error::other)?;
        let mut f = std::fs::File::options()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    fn del(&self, kind: &str, id: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(kind, id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn all<T: DeserializeOwned>(&self, kind: &str) -> Vec<T> {
        std::fs::read_dir(self.dir.join(kind))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn network(&self, id: &str) -> Option<NetworkRec> {
        self.get("networks", id)
    }
    pub fn put_network(&self, n: &NetworkRec) -> std::io::Result<()> {
        self.put("networks", &n.id, n)
    }
    pub fn del_network(&self, id: &str) -> std::io::Result<()> {
        self.del("networks", id)
    }
    pub fn endpoint(&self, id: &str) -> Option<EndpointRec> {
        self.get("endpoints", id)
    }
    pub fn endpoints(&self) -> Vec<EndpointRec> {
        self.all("endpoints")
    }
    pub fn put_endpoint(&self, e: &EndpointRec) -> std::io::Result<()> {
        self.put("endpoints", &e.id, e)
    }
    pub fn del_endpoint(&self, id: &str) -> std::io::Result<()> {
        self.del("endpoints", id)
    }
    pub fn pool(&self, id: &str) -> Option<PoolRec> {
        self.get("pools", id)
    }
    pub fn put_pool(&self, p: &PoolRec) -> std::io::Result<()> {
        self.put("pools", &p.id, p)
    }
    pub fn del_pool(&self, id: &str) -> std::io::Result<()> {
        self.del("pools", id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_and_ids_cannot_escape() {
        let d = tempfile::tempdir().unwrap();
        let s = State::open(d.path()).unwrap();
        let n = NetworkRec {
            id: "ab12".into(),
            mode: "routed".into(),
        };
        s.put_network(&n).unwrap();
        let s = State::open(d.path()).unwrap();
        assert_eq!(s.network("ab12"), Some(n));
        for bad in ["", "../x", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(!valid_id(bad), "{bad}");
            assert!(s.network(bad).is_none());
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join("networks/ab12.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
