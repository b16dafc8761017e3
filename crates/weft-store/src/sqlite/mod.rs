//! The embedded store: one SQLite database file (WAL, `synchronous=FULL`).
//!
//! Many agent processes on one machine may share the file: every write is a `BEGIN IMMEDIATE`
//! transaction, so writers queue on SQLite's own lock (with a busy timeout) and a crash at any
//! point leaves either the whole change or none of it. Subnet uniqueness is a UNIQUE constraint.
//! Every change gets a revision and a row in an event log, which watchers poll; the log keeps
//! the last [`EVENT_LOG_KEEP`] changes, an older cursor gets `Compacted`.

mod events;

use crate::{ChangeStream, RawEntry, RawListing, Store, StoreError};
use events::{decode, log_event, sweep};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use weft_core::{Expiry, Lease, LeaseKey};

/// How many changes the event log keeps for watchers that fall behind (per database, in
/// `meta`; this is the default).
pub const EVENT_LOG_KEEP: u64 = 20_000;
/// How often a watcher looks for new changes.
const POLL: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct SqliteStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn expiry_of(ms: Option<i64>) -> Expiry {
    match ms {
        None => Expiry::Never,
        Some(ms) => Expiry::At(UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)),
    }
}

/// A connection as every weft process uses it: WAL, fsync on commit, waiting on writers.
fn connect(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(60))?;
    // Switching a new database to WAL takes an exclusive lock without waiting on the busy
    // handler: processes opening it at once get SQLITE_BUSY. Retried within the same 60 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Ok(()) => break,
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
-- v4_start/v4_end: the IPv4 subnet as numbers; v6_start/v6_end: the IPv6 subnet as 32 hex
-- digits (string order is number order). They make the overlap check an index lookup.
CREATE TABLE IF NOT EXISTS leases (
    key        TEXT PRIMARY KEY,
    node_ip    TEXT,
    v4_start   INTEGER,
    v4_end     INTEGER,
    v6_start   TEXT,
    v6_end     TEXT,
    value      TEXT NOT NULL,
    expires_at INTEGER
);
CREATE INDEX IF NOT EXISTS leases_expiry ON leases(expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS leases_node ON leases(node_ip);
CREATE INDEX IF NOT EXISTS leases_v4 ON leases(v4_start);
CREATE INDEX IF NOT EXISTS leases_v6 ON leases(v6_start);
CREATE TABLE IF NOT EXISTS events (
    rev        INTEGER PRIMARY KEY,
    key        TEXT NOT NULL,
    value      TEXT,
    expires_at INTEGER
);
INSERT OR IGNORE INTO meta (k, v) VALUES ('rev', '0'), ('compacted', '0'), ('keep', '20000');
";

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let err = |source| StoreError::Sqlite {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Invalid(format!(
                    "cannot create the directory of sqlite store {}: {e}",
                    path.display()
                ))
            })?;
        }
        // Leases are the cluster's map of who owns what: readable by root only. SQLite gives
        // its -wal and -shm files the database's permissions.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| {
                    StoreError::Invalid(format!(
                        "cannot create sqlite store {}: {e}",
                        path.display()
                    ))
                })?;
        }
        let mut conn = connect(&path).map_err(err)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute_batch(SCHEMA).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(SqliteStore {
            path,
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Another connection to the same database.
    fn connect(&self) -> Result<Connection, StoreError> {
        connect(&self.path).map_err(self.wrap())
    }

    /// Runs `f` on the connection off the async runtime.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Invalid(format!("sqlite worker failed: {e}")))?
    }

    fn wrap(&self) -> impl Fn(rusqlite::Error) -> StoreError + Clone + Send + 'static {
        let path = self.path.display().to_string();
        move |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        }
    }

    /// A write transaction: expired leases are swept first, so every writer sees live leases.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(
                &rusqlite::Transaction,
                &dyn Fn(rusqlite::Error) -> StoreError,
            ) -> Result<T, StoreError>
            + Send
            + 'static,
    ) -> Result<T, StoreError> {
        let err = self.wrap();
        self.with(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&err)?;
            sweep(&tx, &err)?;
            let out = f(&tx, &err)?;
            tx.commit().map_err(&err)?;
            Ok(out)
        })
        .await
    }

    /// Sweeps expired leases if any are due; a cheap read when none are.
    async fn sweep_if_due(&self) -> Result<(), StoreError> {
        let err = self.wrap();
        let due = self
            .with(move |conn| {
                conn.query_row("SELECT EXISTS (SELECT 1 FROM leases WHERE expires_at IS NOT NULL AND expires_at <= ?1)", [now_ms()], |r| r.get::<_, bool>(0))
                    .map_err(&err)
            })
            .await?;
        if due {
            self.write(|_, _| Ok(())).await?;
        }
        Ok(())
    }
}

/// `lease` with the expiry `ttl` gives it from now, and that deadline in milliseconds.
fn stamped(lease: &Lease, ttl: Option<Duration>) -> (Lease, Option<i64>) {
    let expires = ttl.map(|t| now_ms() + t.as_millis() as i64);
    let mut lease = lease.clone();
    lease.expiry = expiry_of(expires);
    (lease, expires)
}

/// The numeric bounds of a key's subnets, for the overlap columns.
struct Bounds {
    v4: Option<(i64, i64)>,
    v6: Option<(String, String)>,
}

fn bounds(key: &LeaseKey) -> Bounds {
    Bounds {
        v4: key.v4.map(|n| {
            (
                u32::from(n.network()) as i64,
                u32::from(n.broadcast()) as i64,
            )
        }),
        v6: key.v6.map(|n| {
            (
                format!("{:032x}", u128::from(n.network())),
                format!("{:032x}", u128::from(n.broadcast())),
            )
        }),
    }
}

/// Whether a stored lease overlaps `b`. Leases never overlap each other, so only the lease
/// starting last at or before `b`'s end can reach into it.
fn overlaps_stored(
    tx: &rusqlite::Transaction,
    err: &dyn Fn(rusqlite::Error) -> StoreError,
    b: &Bounds,
) -> Result<bool, StoreError> {
    if let Some((lo, hi)) = b.v4 {
        let r: Option<(i64, i64)> = tx
            .query_row("SELECT v4_start, v4_end FROM leases WHERE v4_start <= ?1 ORDER BY v4_start DESC LIMIT 1", [hi], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(err)?;
        if r.is_some_and(|(_, end)| end >= lo) {
            return Ok(true);
        }
    }
    if let Some((lo, hi)) = &b.v6 {
        let r: Option<(String, String)> = tx
            .query_row("SELECT v6_start, v6_end FROM leases WHERE v6_start <= ?1 ORDER BY v6_start DESC LIMIT 1", [hi], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(err)?;
        if r.is_some_and(|(_, end)| end >= *lo) {
            return Ok(true);
        }
    }
    Ok(false)
}

impl Store for SqliteStore {
    async fn get_config(&self) -> Result<Option<String>, StoreError> {
        let err = self.wrap();
        self.with(move |c| {
            c.query_row("SELECT v FROM meta WHERE k = 'config'", [], |r| r.get(0))
                .optional()
                .map_err(&err)
        })
        .await
    }

    async fn put_config(&self, text: &str) -> Result<(), StoreError> {
        let text = text.to_string();
        self.write(move |tx, err| {
            tx.execute("INSERT INTO meta (k, v) VALUES ('config', ?1) ON CONFLICT (k) DO UPDATE SET v = excluded.v", [text])
                .map_err(err)?;
            Ok(())
        })
        .await
    }

    async fn list_raw(&self) -> Result<RawListing, StoreError> {
        self.sweep_if_due().await?;
        let err = self.wrap();
        self.with(move |conn| {
            // One read transaction: the leases and the revision are of the same moment.
            let tx = conn.transaction().map_err(&err)?;
            let revision: u64 = tx.query_row("SELECT CAST(v AS INTEGER) FROM meta WHERE k = 'rev'", [], |r| r.get(0)).map_err(&err)?;
            let mut listing = RawListing {
                revision,
                entries: Vec::new(),
            };
            {
                let mut stmt = tx
                    .prepare("SELECT key, value, expires_at FROM leases WHERE expires_at IS NULL OR expires_at > ?1")
                    .map_err(&err)?;
                let mut rows = stmt.query([now_ms()]).map_err(&err)?;
                while let Some(r) = rows.next().map_err(&err)? {
                    let expires: Option<i64> = r.get(2).map_err(&err)?;
                    listing.entries.push(RawEntry {
                        name: r.get(0).map_err(&err)?,
                        value: r.get::<_, String>(1).map_err(&err)?.into_bytes(),
                        expiry: expiry_of(expires),
                    });
                }
            }
            tx.commit().map_err(&err)?;
            Ok(listing)
        })
        .await
    }

    async fn create(&self, lease: &Lease, ttl: Option<Duration>) -> Result<Lease, StoreError> {
        let (lease, expires) = stamped(lease, ttl);
        self.write(move |tx, err| {
            let (key, value) = (lease.key.to_string(), lease.attrs.to_json());
            let b = bounds(&lease.key);
            let node_ip = lease.attrs.node_ip().to_string();
            let node_held: bool = tx
                .query_row("SELECT EXISTS (SELECT 1 FROM leases WHERE node_ip = ?1)", [&node_ip], |r| r.get(0))
                .map_err(err)?;
            if node_held || overlaps_stored(tx, err, &b)? {
                return Err(StoreError::Conflict(lease.key));
            }
            let inserted = tx
                .execute(
                    "INSERT INTO leases (key, node_ip, v4_start, v4_end, v6_start, v6_end, value, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
                    params![key, node_ip, b.v4.map(|x| x.0), b.v4.map(|x| x.1), b.v6.as_ref().map(|x| &x.0), b.v6.as_ref().map(|x| &x.1), value, expires],
                )
                .map_err(err)?;
            if inserted == 0 {
                return Err(StoreError::Conflict(lease.key));
            }
            log_event(tx, err, &key, Some(&value), expires)?;
            Ok(lease)
        })
        .await
    }

    async fn update(&self, lease: &Lease, ttl: Option<Duration>) -> Result<Lease, StoreError> {
        let (lease, expires) = stamped(lease, ttl);
        self.write(move |tx, err| {
            let (key, value) = (lease.key.to_string(), lease.attrs.to_json());
            // Compare-and-swap on the owner: a lease that lapsed and was taken by another node
            // is that node's now, and renewing must not take it back.
            let n = tx
                .execute(
                    "UPDATE leases SET value = ?2, expires_at = ?3 WHERE key = ?1 AND node_ip = ?4",
                    params![key, value, expires, lease.attrs.node_ip().to_string()],
                )
                .map_err(err)?;
            if n == 0 {
                let held: Option<String> = tx
                    .query_row("SELECT node_ip FROM leases WHERE key = ?1", [&key], |r| {
                        r.get(0)
                    })
                    .optional()
                    .map_err(err)?;
                return Err(match held {
                    Some(_) => StoreError::Conflict(lease.key),
                    None => StoreError::NotFound(lease.key),
                });
            }
            log_event(tx, err, &key, Some(&value), expires)?;
            Ok(lease)
        })
        .await
    }

    async fn find_node(&self, ip: std::net::IpAddr) -> Result<Option<Lease>, StoreError> {
        self.sweep_if_due().await?;
        let err = self.wrap();
        let ip = ip.to_string();
        let row = self
            .with(move |c| {
                c.query_row(
                    "SELECT key, value, expires_at FROM leases WHERE node_ip = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
                    params![ip, now_ms()],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<i64>>(2)?)),
                )
                .optional()
                .map_err(&err)
            })
            .await?;
        match row {
            None => Ok(None),
            Some((k, v, e)) => match decode(&k, &v, e) {
                Ok(l) => Ok(Some(l)),
                Err(c) => {
                    tracing::warn!(key = %c.key, reason = %c.reason, "the node's stored lease cannot be read");
                    Ok(None)
                }
            },
        }
    }

    async fn delete(&self, key: &LeaseKey) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.write(move |tx, err| {
            let n = tx
                .execute("DELETE FROM leases WHERE key = ?1", [&key])
                .map_err(err)?;
            if n > 0 {
                log_event(tx, err, &key, None, None)?;
            }
            Ok(n > 0)
        })
        .await
    }

    async fn changes(&self, from: u64) -> Result<ChangeStream, StoreError> {
        events::watch(self.connect()?, self.wrap(), from)
    }

    async fn resolve_expiry(&self, _leases: &mut [Lease]) -> Result<(), StoreError> {
        Ok(()) // SQLite keeps the deadline in the row: listings carry it already.
    }
}

impl SqliteStore {
    /// Sets how many changes the event log keeps (default [`EVENT_LOG_KEEP`]).
    pub async fn set_event_log_keep(&self, keep: u64) -> Result<(), StoreError> {
        self.write(move |tx, err| {
            tx.execute(
                "UPDATE meta SET v = ?1 WHERE k = 'keep'",
                [keep.max(1).to_string()],
            )
            .map_err(err)?;
            Ok(())
        })
        .await
    }

    /// Writes a raw row, bypassing every check: for tests of corrupt values.
    #[doc(hidden)]
    pub async fn put_raw(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let (key, value) = (key.to_string(), value.to_string());
        self.write(move |tx, err| {
            tx.execute(
                "INSERT OR REPLACE INTO leases (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map_err(err)?;
            log_event(tx, err, &key, Some(&value), None)?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_store_file_is_root_only() {
        let d = tempfile::tempdir().expect("tmp");
        let path = d.path().join("store.db");
        let _s = SqliteStore::open(&path).expect("open");
        for f in std::fs::read_dir(d.path()).expect("dir").flatten() {
            let mode = f.metadata().expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.path().display());
        }
    }
}
