//! Test harnesses: a real etcd (Debian's etcd-server) on loopback with a throw-away data dir,
//! and throw-away SQLite files. Every process started here is SIGKILLed on drop.
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use weft_store::etcd::EtcdTls;
use weft_store::spec::EtcdSettings;
use weft_store::sqlite::SqliteStore;
use weft_store::{AnyStore, StoreSpec};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on loopback")
}

/// One etcd member.
pub struct Etcd {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    cluster: String,
    state: &'static str,
    dir: TempDir,
    child: Option<Child>,
    /// Directory with ca.pem, server.pem/key, client.pem/key when the member speaks TLS.
    pub tls: Option<std::path::PathBuf>,
}

impl Etcd {
    /// A single-member cluster.
    pub fn start() -> Etcd {
        let mut cluster = Self::cluster(1);
        let mut m = cluster.remove(0);
        m.wait_healthy();
        m
    }

    /// `n` members on loopback, started together; returns when all are healthy.
    pub fn cluster(n: usize) -> Vec<Etcd> {
        Self::cluster_with(n, true)
    }

    fn cluster_with(n: usize, start: bool) -> Vec<Etcd> {
        // A port found free may be taken before etcd binds it (another test, an outgoing
        // connection): etcd then exits at once, and the cluster is made again on new ports.
        for attempt in 1..=3 {
            let mut members = Self::members(n);
            if !start {
                return members;
            }
            for m in &mut members {
                m.spawn();
            }
            if members
                .iter_mut()
                .all(|m| m.healthy_within(Duration::from_secs(20)))
            {
                for m in &mut members {
                    m.state = "existing";
                }
                return members;
            }
            eprintln!(
                "etcd cluster of {n} did not come up (attempt {attempt}); again on new ports"
            );
            for m in &mut members {
                m.kill();
            }
        }
        panic!("etcd did not become healthy in three attempts");
    }

    fn members(n: usize) -> Vec<Etcd> {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let members: Vec<Etcd> = ports
            .iter()
            .enumerate()
            .map(|(i, &(c, p))| Etcd {
                name: format!("m{i}"),
                client_port: c,
                peer_port: p,
                cluster: cluster.clone(),
                state: "new",
                dir: tempfile::tempdir().expect("tempdir"),
                child: None,
                tls: None,
            })
            .collect();
        members
    }

    /// A single member that requires TLS client certificates, made with openssl here.
    pub fn start_tls() -> Etcd {
        let mut m = Self::cluster_with(1, false).remove(0);
        let certs = m.dir.path().join("certs");
        make_certs(&certs);
        m.tls = Some(certs);
        m.spawn();
        m.wait_healthy();
        m
    }

    fn spawn(&mut self) {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let c = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let p = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("etcd");
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file").arg(t.join("server.pem"));
            cmd.arg("--key-file").arg(t.join("server.key"));
            cmd.arg("--trusted-ca-file").arg(t.join("ca.pem"));
            cmd.arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &self.name, "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args(["--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
            .args(["--initial-cluster", &self.cluster, "--initial-cluster-state", self.state])
            .args(["--heartbeat-interval=10", "--election-timeout=100", "--log-level=error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start etcd: install Debian's etcd-server (apt-get install etcd-server etcd-client)");
        self.child = Some(child);
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// etcdctl with this member's endpoint (and certificates).
    pub fn etcdctl(&self) -> Command {
        let mut c = Command::new("etcdctl");
        c.args(["--endpoints", &self.endpoint()]);
        if let Some(t) = &self.tls {
            c.arg("--cacert").arg(t.join("ca.pem"));
            c.arg("--cert").arg(t.join("client.pem"));
            c.arg("--key").arg(t.join("client.key"));
        }
        c
    }

    fn wait_healthy(&mut self) {
        if !self.healthy_within(Duration::from_secs(20)) {
            panic!(
                "etcd member {} did not become healthy within 20 s",
                self.name
            );
        }
    }

    /// Whether the member answers a health check within `limit`; false at once if it exited.
    fn healthy_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().ok().flatten().is_some() {
                    return false;
                }
            }
            let ok = self
                .etcdctl()
                .args(["--command-timeout=1s", "endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// SIGKILL (SIGTERM on a leader whose peers are gone blocks for seconds).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the member again on the same data dir and ports.
    pub fn restart(&mut self) {
        self.kill();
        self.state = "existing";
        self.spawn();
        self.wait_healthy();
    }

    /// Compacts etcd's history up to the current revision.
    pub fn compact(&self) {
        let out = self
            .etcdctl()
            .args(["endpoint", "status", "--write-out=json"])
            .output()
            .expect("etcdctl");
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("etcdctl status json");
        let rev = v[0]["Status"]["header"]["revision"]
            .as_i64()
            .expect("revision");
        let ok = self
            .etcdctl()
            .args(["compact", &rev.to_string()])
            .stdout(Stdio::null())
            .status()
            .expect("etcdctl compact")
            .success();
        assert!(ok, "etcdctl compact failed");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Makes fresh client instances of one shared store, as separate agents would have.
pub enum Harness {
    Sqlite { dir: TempDir },
    Etcd { members: Vec<Etcd>, prefix: String },
}

impl Harness {
    pub fn sqlite() -> Harness {
        Harness::Sqlite {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn etcd() -> Harness {
        Harness::Etcd {
            members: vec![Etcd::start()],
            prefix: "/coreos.com/network/".into(),
        }
    }

    pub fn etcd_cluster(n: usize) -> Harness {
        Harness::Etcd {
            members: Etcd::cluster(n),
            prefix: "/coreos.com/network/".into(),
        }
    }

    pub fn spec(&self) -> StoreSpec {
        match self {
            Harness::Sqlite { dir } => StoreSpec::Sqlite(dir.path().join("store.db")),
            Harness::Etcd { members, .. } => {
                StoreSpec::Etcd(members.iter().map(|m| m.endpoint()).collect())
            }
        }
    }

    /// A new client of the shared store.
    pub async fn store(&self) -> AnyStore {
        let settings = match self {
            Harness::Etcd { prefix, .. } => EtcdSettings {
                prefix: prefix.clone(),
                tls: EtcdTls::default(),
            },
            Harness::Sqlite { .. } => EtcdSettings::default(),
        };
        AnyStore::open(&self.spec(), &settings)
            .await
            .expect("open store")
    }

    pub fn sqlite_store(&self) -> Option<SqliteStore> {
        match self {
            Harness::Sqlite { dir } => {
                Some(SqliteStore::open(dir.path().join("store.db")).expect("open sqlite"))
            }
            _ => None,
        }
    }

    pub fn members(&mut self) -> &mut Vec<Etcd> {
        match self {
            Harness::Etcd { members, .. } => members,
            Harness::Sqlite { .. } => panic!("not an etcd harness"),
        }
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, by openssl.
pub fn make_certs(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).expect("cert dir");
    let sh = format!(
        r#"set -e; cd {dir}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=weft-test-ca 2>/dev/null
for who in server client; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout $who.key -out $who.csr -subj /CN=weft-test-$who 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' > $who.ext
  openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $who.pem -days 2 -extfile $who.ext 2>/dev/null
done"#,
        dir = dir.display()
    );
    let ok = Command::new("sh")
        .arg("-c")
        .arg(sh)
        .status()
        .expect("openssl (apt-get install openssl)")
        .success();
    assert!(ok, "making test certificates failed");
}
