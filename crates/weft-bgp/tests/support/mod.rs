//! A real BGP peer for the tests: BIRD 2 on loopback, killed on drop.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};

pub struct Bird {
    child: Child,
    pub ctl: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// BIRD as AS 65002 (router id 10.0.0.2) on 127.0.0.2:`port`, passive, peering with
/// AS 65001 at 127.0.0.1 and exporting a static 10.99.0.0/24, and IPv6 unicast too: a static
/// 2001:db8:99::/48 with next hop 2001:db8::2.
pub fn bird(port: u16) -> Bird {
    bird_with(port, None)
}

/// The same, with a TCP MD5 password on the session.
pub fn bird_with(port: u16, password: Option<&str>) -> Bird {
    let pw = password
        .map(|p| format!("  password \"{p}\";\n"))
        .unwrap_or_default();
    let dir = tempfile::tempdir().expect("tmp");
    let conf = dir.path().join("bird.conf");
    std::fs::write(
        &conf,
        format!(
            "router id 10.0.0.2;\nprotocol device {{}}\nprotocol static s1 {{ ipv4; route 10.99.0.0/24 blackhole; }}\n\
             protocol static s2 {{ ipv6; route 2001:db8:99::/48 blackhole; }}\n\
             protocol bgp weft {{\n  local 127.0.0.2 port {port} as 65002;\n  neighbor 127.0.0.1 as 65001;\n  passive on;\n  multihop;\n\
             hold time 9; keepalive time 3;\n{pw}  ipv4 {{ import all; export all; next hop self; }};\n\
             ipv6 {{ import all; export all; next hop address 2001:db8::2; }};\n}}\n"
        ),
    )
    .expect("conf");
    let ctl = dir.path().join("bird.ctl");
    let child = Command::new("bird")
        .args(["-f", "-c"])
        .arg(&conf)
        .arg("-s")
        .arg(&ctl)
        .arg("-P")
        .arg(dir.path().join("bird.pid"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("bird not installed: apt-get install bird2");
    Bird {
        child,
        ctl,
        _dir: dir,
    }
}

/// A TCP port free on both 127.0.0.1 and 127.0.0.2 now (the kernel picks it): fixed ports
/// can collide with other tests' outgoing connections.
pub fn free_port() -> u16 {
    loop {
        let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = a.local_addr().expect("local addr").port();
        if std::net::TcpListener::bind(("127.0.0.2", port)).is_ok() {
            return port;
        }
    }
}
