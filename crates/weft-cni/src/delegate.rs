//! Handing addressing to an IPAM plugin (e.g. the reference `host-local`), as the spec says:
//! the plugin is found in CNI_PATH and run with our environment and our stdin.

use crate::spec::{code, CniError, CniResult};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn find(plugin: &str) -> Result<PathBuf, CniError> {
    if plugin.contains('/') {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("ipam.type {plugin:?} must be a plugin name, not a path"),
        ));
    }
    let path = std::env::var("CNI_PATH").unwrap_or_default();
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d).join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("IPAM plugin {plugin:?} not found in CNI_PATH={path:?}"),
            )
        })
}

/// Runs the IPAM plugin for `command`; its result for ADD, an empty one otherwise.
pub fn exec(plugin: &str, command: &str, stdin: &[u8]) -> Result<CniResult, CniError> {
    let bin = find(plugin)?;
    let mut child = Command::new(&bin)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            CniError::new(
                code::IO,
                format!("running IPAM plugin {}: {e}", bin.display()),
            )
        })?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin).map_err(|e| {
            CniError::new(code::IO, format!("writing to IPAM plugin {plugin}: {e}"))
        })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::new(code::IO, format!("waiting for IPAM plugin {plugin}: {e}")))?;
    let v: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
    if !out.status.success() {
        // Pass the plugin's own error on, code and all.
        let (c, msg) = match &v {
            Some(e) => (
                e.get("code")
                    .and_then(|c| c.as_u64())
                    .unwrap_or(code::IO as u64) as u32,
                e.get("msg")
                    .and_then(|m| m.as_str())
                    .unwrap_or("failed")
                    .to_string(),
            ),
            None => (
                code::IO,
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ),
        };
        return Err(CniError::new(
            c,
            format!("IPAM plugin {plugin} {command}: {msg}"),
        ));
    }
    match (command, v) {
        ("ADD", Some(v)) => CniResult::from_json(&v),
        ("ADD", None) => Err(CniError::new(
            code::DECODE,
            format!("IPAM plugin {plugin} returned no result"),
        )),
        _ => Ok(CniResult::default()),
    }
}
