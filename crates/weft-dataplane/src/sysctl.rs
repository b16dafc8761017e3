//! sysctls under /proc/sys, for the namespace of the calling thread (net.* are per namespace).

use crate::DataplaneError;

/// Writes `value` to the file at `path` under /proc/sys, unless it holds it already.
fn write(path: &str, name: &str, value: &str) -> Result<(), DataplaneError> {
    if std::fs::read_to_string(path)
        .map(|v| v.trim() == value)
        .unwrap_or(false)
    {
        return Ok(());
    }
    std::fs::write(path, value).map_err(|e| DataplaneError::Io {
        what: format!("setting {name}={value}"),
        source: e,
    })
}

/// Writes `value` to `key` (dotted, e.g. `net.ipv4.ip_forward`), unless it holds it already.
pub fn set(key: &str, value: &str) -> Result<(), DataplaneError> {
    write(&format!("/proc/sys/{}", key.replace('.', "/")), key, value)
}

/// Writes a per-interface sysctl; interface names may hold dots, which the path keeps.
pub fn set_iface(family: &str, iface: &str, key: &str, value: &str) -> Result<(), DataplaneError> {
    write(
        &format!("/proc/sys/net/{family}/conf/{iface}/{key}"),
        &format!("net.{family}.conf.{iface}.{key}"),
        value,
    )
}

/// Writes a per-interface neighbour setting (`net.ipv4.neigh.<iface>.<key>`).
pub fn set_neigh(family: &str, iface: &str, key: &str, value: &str) -> Result<(), DataplaneError> {
    write(
        &format!("/proc/sys/net/{family}/neigh/{iface}/{key}"),
        &format!("net.{family}.neigh.{iface}.{key}"),
        value,
    )
}

pub fn get(key: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/")))
        .ok()
        .map(|v| v.trim().to_string())
}
