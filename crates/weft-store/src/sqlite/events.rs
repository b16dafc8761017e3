//! The event log: every change gets a revision and a row (trimmed to the last `keep`), expired
//! leases are swept into it, and watchers poll it.

use super::{expiry_of, now_ms, POLL};
use crate::{Change, ChangeStream, Corrupt, RawEntry, StoreError};
use rusqlite::{params, Connection};
use tokio::sync::mpsc;
use weft_core::Lease;

fn bump(
    tx: &rusqlite::Transaction,
    err: &dyn Fn(rusqlite::Error) -> StoreError,
) -> Result<u64, StoreError> {
    let rev: u64 = tx
        .query_row("UPDATE meta SET v = CAST(v AS INTEGER) + 1 WHERE k = 'rev' RETURNING CAST(v AS INTEGER)", [], |r| r.get(0))
        .map_err(err)?;
    let keep: u64 = tx
        .query_row(
            "SELECT CAST(v AS INTEGER) FROM meta WHERE k = 'keep'",
            [],
            |r| r.get(0),
        )
        .map_err(err)?;
    // Trim in steps of a tenth of the log, not on every write.
    if rev.is_multiple_of((keep / 10).max(1)) && rev > keep {
        let upto = rev - keep;
        tx.execute("DELETE FROM events WHERE rev <= ?1", [upto])
            .map_err(err)?;
        tx.execute(
            "UPDATE meta SET v = ?1 WHERE k = 'compacted'",
            [upto.to_string()],
        )
        .map_err(err)?;
    }
    Ok(rev)
}

pub(super) fn log_event(
    tx: &rusqlite::Transaction,
    err: &dyn Fn(rusqlite::Error) -> StoreError,
    key: &str,
    value: Option<&str>,
    expires: Option<i64>,
) -> Result<u64, StoreError> {
    let rev = bump(tx, err)?;
    tx.execute(
        "INSERT INTO events (rev, key, value, expires_at) VALUES (?1, ?2, ?3, ?4)",
        params![rev, key, value, expires],
    )
    .map_err(err)?;
    Ok(rev)
}

pub(super) fn sweep(
    tx: &rusqlite::Transaction,
    err: &dyn Fn(rusqlite::Error) -> StoreError,
) -> Result<(), StoreError> {
    let expired: Vec<String> = {
        let mut stmt = tx
            .prepare("DELETE FROM leases WHERE expires_at IS NOT NULL AND expires_at <= ?1 RETURNING key")
            .map_err(err)?;
        let rows = stmt.query_map([now_ms()], |r| r.get(0)).map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)?
    };
    for key in expired {
        tracing::info!(lease = %key, "lease expired");
        log_event(tx, err, &key, None, None)?;
    }
    Ok(())
}

pub(super) fn decode(key: &str, value: &str, expires: Option<i64>) -> Result<Lease, Corrupt> {
    RawEntry {
        name: key.to_string(),
        value: value.as_bytes().to_vec(),
        expiry: expiry_of(expires),
    }
    .decode()
}

/// The changes from `from` on, at most 1000; `Compacted` when the log no longer has `from`.
fn poll_events(
    conn: &Connection,
    err: &dyn Fn(rusqlite::Error) -> StoreError,
    from: u64,
) -> Result<Vec<Change>, StoreError> {
    let tx = conn.unchecked_transaction().map_err(err)?;
    let compacted: u64 = tx
        .query_row(
            "SELECT CAST(v AS INTEGER) FROM meta WHERE k = 'compacted'",
            [],
            |r| r.get(0),
        )
        .map_err(err)?;
    if from <= compacted {
        return Err(StoreError::Compacted(from));
    }
    let mut stmt = tx
        .prepare_cached("SELECT rev, key, value, expires_at FROM events WHERE rev >= ?1 ORDER BY rev LIMIT 1000")
        .map_err(err)?;
    let mut rows = stmt.query([from]).map_err(err)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(err)? {
        let rev: u64 = r.get(0).map_err(err)?;
        let key: String = r.get(1).map_err(err)?;
        let value: Option<String> = r.get(2).map_err(err)?;
        let expires: Option<i64> = r.get(3).map_err(err)?;
        out.push(match value {
            Some(v) => match decode(&key, &v, expires) {
                Ok(lease) => Change::Put { lease, rev },
                Err(corrupt) => Change::Corrupt { corrupt, rev },
            },
            None => match key.parse() {
                Ok(key) => Change::Delete { key, rev },
                Err(e) => Change::Corrupt {
                    corrupt: Corrupt {
                        key,
                        reason: format!("{e}"),
                    },
                    rev,
                },
            },
        });
    }
    Ok(out)
}

/// The changes from `from` on, as a stream: a thread with a connection of its own, where an
/// idle poll is one `PRAGMA data_version` (which moves only when another connection
/// commits), no thread hop, no query; expired leases are swept when their deadline passes.
pub(super) fn watch(
    conn: Connection,
    err: impl Fn(rusqlite::Error) -> StoreError + Send + 'static,
    from: u64,
) -> Result<ChangeStream, StoreError> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::Builder::new()
        .name("weft-sqlite-watch".into())
        .spawn(move || {
            let mut next = from;
            let mut seen_version: Option<i64> = None;
            let mut next_expiry: Option<i64> = None;
            loop {
                if tx.is_closed() {
                    return;
                }
                let version: Option<i64> =
                    conn.query_row("PRAGMA data_version", [], |r| r.get(0)).ok();
                let expiry_due = next_expiry.is_some_and(|e| e <= now_ms());
                if version.is_none() || version != seen_version || expiry_due {
                    seen_version = version;
                    let result = (|| {
                        if expiry_due {
                            let t = conn.unchecked_transaction().map_err(&err)?;
                            sweep(&t, &err)?;
                            t.commit().map_err(&err)?;
                        }
                        let batch = poll_events(&conn, &err, next)?;
                        next_expiry = conn
                            .query_row(
                                "SELECT MIN(expires_at) FROM leases WHERE expires_at IS NOT NULL",
                                [],
                                |r| r.get(0),
                            )
                            .map_err(&err)?;
                        Ok(batch)
                    })();
                    match result {
                        Ok(batch) if batch.is_empty() => {}
                        Ok(batch) => {
                            let full = batch.len() >= 1000;
                            next = batch.last().map_or(next, |c| c.rev() + 1);
                            if tx.blocking_send(Ok(batch)).is_err() {
                                return;
                            }
                            if full {
                                seen_version = None; // more to read at once
                                continue;
                            }
                        }
                        Err(e) => {
                            let _ = tx.blocking_send(Err(e));
                            return;
                        }
                    }
                }
                std::thread::sleep(POLL);
            }
        })
        .map_err(|e| StoreError::Invalid(format!("starting the sqlite watch thread: {e}")))?;
    Ok(rx)
}
