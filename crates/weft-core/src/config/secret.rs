//! BGP passwords: where they come from, kept out of logs.

use super::json::Ctx;
use serde_json::{Map, Value};
use std::fmt;

/// A secret value: `Debug` prints `<redacted>`, so it never reaches a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a BGP peer's TCP MD5 password comes from. net-conf.json is shared (every node reads
/// it, and it is kept in the store): a file or an environment variable on each node keeps the
/// password out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// `Password`: in net-conf.json itself (accepted, with a warning).
    Inline(Secret),
    /// `PasswordFile`: a file only root may read (e.g. a mounted Kubernetes Secret).
    File(std::path::PathBuf),
    /// `PasswordEnv`: the name of an environment variable of the agent.
    Env(String),
}

impl PasswordSource {
    /// The password itself. A file readable by group or others is refused: a key anyone on
    /// the node can read proves nothing.
    pub fn resolve(&self) -> Result<Secret, String> {
        match self {
            PasswordSource::Inline(s) => Ok(s.clone()),
            PasswordSource::Env(v) => std::env::var(v).map(Secret).map_err(|_| {
                format!("PasswordEnv names {v}, which is not set in the agent's environment")
            }),
            PasswordSource::File(p) => {
                use std::os::unix::fs::PermissionsExt;
                let meta = std::fs::metadata(p)
                    .map_err(|e| format!("PasswordFile {}: {e}", p.display()))?;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(format!(
                        "PasswordFile {} is readable by others (mode {mode:o}); chmod 600 it",
                        p.display()
                    ));
                }
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("PasswordFile {}: {e}", p.display()))?;
                Ok(Secret(text.trim_end_matches(['\n', '\r']).to_string()))
            }
        }
    }
}

/// A password given as `<prefix>Password`, `<prefix>PasswordFile` or `<prefix>PasswordEnv` in
/// the JSON object `v` (at most one); an inline one is warned about.
pub(super) fn password_source(
    ctx: &mut Ctx,
    warnings: &mut Vec<String>,
    v: &Value,
    key: &str,
    prefix: &str,
) -> Option<PasswordSource> {
    let str_of = |k: &str| v.get(format!("{prefix}{k}")).and_then(Value::as_str);
    let sources: Vec<PasswordSource> = [
        str_of("Password").map(|s| PasswordSource::Inline(Secret::new(s))),
        str_of("PasswordFile").map(|s| PasswordSource::File(s.into())),
        str_of("PasswordEnv").map(|s| PasswordSource::Env(s.into())),
    ]
    .into_iter()
    .flatten()
    .collect();
    if sources.len() > 1 {
        ctx.problem(
            &format!("{key}.{prefix}Password"),
            None,
            format!("give one of {prefix}Password, {prefix}PasswordFile, {prefix}PasswordEnv"),
            &format!("\"{prefix}PasswordFile\": \"/etc/weft/bgp.key\""),
        );
    }
    if matches!(sources.first(), Some(PasswordSource::Inline(_))) {
        warnings.push(format!("{key}.{prefix}Password is kept in net-conf.json, which every node and the store can read; prefer \"{prefix}PasswordFile\" (a root-only file on each node) or \"{prefix}PasswordEnv\""));
    }
    sources.into_iter().next()
}

/// Where a password comes from, as net-conf.json says it (an inline one as `<set>`).
pub(super) fn password_json(
    m: &mut Map<String, Value>,
    prefix: &str,
    src: Option<&PasswordSource>,
) {
    let (k, v) = match src {
        Some(PasswordSource::Inline(_)) => ("Password", "<set>".to_string()),
        Some(PasswordSource::File(f)) => ("PasswordFile", f.display().to_string()),
        Some(PasswordSource::Env(e)) => ("PasswordEnv", e.clone()),
        None => return,
    };
    m.insert(format!("{prefix}{k}"), Value::String(v));
}
