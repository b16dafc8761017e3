//! ip-masq's nftables table, kept as reconciled state: made when wanted, compared with what the
//! kernel holds on every pass and replaced (one transaction) on drift, removed when ip-masq is
//! off. Only the tables `ip weft` and `ip6 weft` are ever touched.
//!
//! Through the `nft` tool (nftables' own parser and netlink code): the kernel's listing after
//! our last write is remembered, so a pass with nothing changed is one `nft list`.

use crate::DataplaneError;
use std::io::Write;
use std::process::{Command, Stdio};
use weft_backend::masq::{family_of, Masq, TABLE};

/// ip-masq's tables: `ip weft` and, with IPv6, `ip6 weft`.
#[derive(Debug, Default)]
pub struct MasqTable {
    v4: FamilyTable,
    v6: FamilyTable,
}

impl MasqTable {
    /// Makes `ip weft` hold exactly `want` (or not exist); true when it wrote anything.
    pub fn sync(&mut self, want: Option<&Masq>) -> Result<bool, DataplaneError> {
        self.v4.sync(false, want)
    }

    /// The same for `ip6 weft`.
    pub fn sync6(&mut self, want: Option<&Masq>) -> Result<bool, DataplaneError> {
        self.v6.sync(true, want)
    }
}

/// What weft last wrote in one family's table, and how the kernel listed it afterwards.
#[derive(Debug, Default)]
struct FamilyTable {
    applied: Option<(Masq, String)>,
    /// Without ip-masq: whether a table left by an earlier run was looked for already.
    checked_absent: bool,
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<(bool, String, String), DataplaneError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| DataplaneError::Io {
            what: "running nft for --ip-masq (apt-get install nftables)".into(),
            source: e,
        })?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(text.as_bytes())
            .map_err(|e| DataplaneError::Io {
                what: "writing weft's ruleset to nft".into(),
                source: e,
            })?;
    }
    let out = child.wait_with_output().map_err(|e| DataplaneError::Io {
        what: "waiting for nft".into(),
        source: e,
    })?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The kernel's listing of `<family> weft`, or None when there is no such table.
fn listing(family: &str) -> Result<Option<String>, DataplaneError> {
    let (ok, out, err) = nft(&["list", "table", family, TABLE], None)?;
    if ok {
        Ok(Some(out))
    } else if err.contains("No such file") || err.contains("does not exist") {
        Ok(None)
    } else {
        Err(DataplaneError::Other(format!(
            "nft list table {family} {TABLE}: {}",
            err.trim()
        )))
    }
}

impl FamilyTable {
    fn sync(&mut self, v6: bool, want: Option<&Masq>) -> Result<bool, DataplaneError> {
        let family = family_of(v6);
        if want.is_none() && self.applied.is_none() && !self.checked_absent {
            // Without ip-masq a node needs no nftables at all: look once for a table a previous
            // run left (and remove it), then not again.
            self.checked_absent = true;
        } else if want.is_none() && self.applied.is_none() {
            return Ok(false);
        }
        let have = match listing(family) {
            Err(DataplaneError::Io { source, .. })
                if want.is_none() && source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(false); // no nft: nothing can have made the table
            }
            other => other?,
        };
        match want {
            None => {
                self.applied = None;
                if have.is_none() {
                    return Ok(false);
                }
                let (ok, _, err) = nft(&["delete", "table", family, TABLE], None)?;
                if !ok {
                    return Err(DataplaneError::Other(format!(
                        "removing nftables table {family} {TABLE} (ip-masq is off): {}",
                        err.trim()
                    )));
                }
                tracing::info!("ip-masq off: removed nftables table {family} {TABLE}");
                Ok(true)
            }
            Some(m) => {
                if let (Some((am, listed)), Some(h)) = (&self.applied, &have) {
                    if am == m && listed == h {
                        return Ok(false);
                    }
                }
                if have.is_some() && self.applied.is_some() {
                    tracing::warn!(
                        "nftables table {family} {TABLE} drifted from weft's rules; replacing it"
                    );
                }
                let (ok, _, err) = nft(&["-f", "-"], Some(&m.replace_script()))?;
                if !ok {
                    return Err(DataplaneError::Other(format!(
                        "nft refused weft's ip-masq rules: {}",
                        err.trim()
                    )));
                }
                let now = listing(family)?.unwrap_or_default();
                self.applied = Some((m.clone(), now));
                Ok(true)
            }
        }
    }
}
