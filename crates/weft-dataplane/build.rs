//! Compiles the eBPF programs under bpf/ with clang (`-O2 -g -target bpf`, Debian's `clang`
//! and `libbpf-dev` headers) into OUT_DIR, where `bpf` (host routing) and `bpf::ipip` embed them.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    // The asm/ headers of linux/types.h live in the multiarch directory.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    for name in ["host_routing", "ipip"] {
        let src = format!("bpf/{name}.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.o"));
        let status = Command::new(std::env::var("CLANG").unwrap_or_else(|_| "clang".into()))
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-I{multiarch}"))
            .args(["-c", &src, "-o"])
            .arg(&obj)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("clang failed ({s}) compiling {src}"),
            Err(e) => panic!(
                "clang not found ({e}): the eBPF programs need it to build (apt-get install clang libbpf-dev)"
            ),
        }
    }
}
