//! Group commit for the single SQLite writer.
//!
//! SQLite allows one writer at a time, and with `synchronous = FULL` every `COMMIT` waits for
//! an fsync of the WAL. One durable commit per request caps the gateway at a few hundred to
//! about a thousand writes a second, whatever the CPU. So write operations share
//! transactions instead:
//!
//! - [`Writer::begin`] takes the one connection (a FIFO lock), opens the shared transaction
//!   (`BEGIN IMMEDIATE`) if none is open, and starts a savepoint for this operation.
//! - [`WriteTx::commit`] releases the savepoint, joins the open transaction's member list,
//!   hands the connection to the next operation and **waits until the shared transaction has
//!   committed** (or failed: then every member gets the error). Nothing is acknowledged
//!   before it is on disk.
//! - A flusher task commits: every `commit` wakes it, and it queues for the connection behind
//!   the operations already waiting, so everything that arrived during the previous fsync
//!   goes into the next one. At low load a batch is one operation; under load, batches grow
//!   by themselves, with no timer and no added latency.
//! - An operation that fails or whose caller goes away (a dropped future) is rolled back to
//!   its savepoint before anyone else uses the connection, so it never leaks into the batch.
//!   If even that fails, the whole shared transaction is rolled back and its members get the
//!   error.

use sqlx::{Executor, SqliteConnection};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch, Mutex, OwnedMutexGuard};

use super::map_err;
use crate::store::{StoreError, StoreResult};

/// The result a batch member waits for: `Err` carries the commit failure's text.
type Outcome = Result<(), String>;

/// The writer connection and the state of the shared transaction on it.
pub(super) struct WriterState {
    conn: SqliteConnection,
    /// `BEGIN IMMEDIATE` was issued and neither committed nor rolled back.
    open: bool,
    /// An operation's savepoint is open: its owner is running, or dropped it unfinished.
    savepoint: bool,
    /// Operations released into the open transaction, waiting for its commit.
    members: Vec<oneshot::Sender<Outcome>>,
    /// Whether a member wrote events (the hub is woken after the commit).
    wrote_events: bool,
}

impl WriterState {
    /// Rolls back a savepoint left open by an operation that did not commit. If that fails
    /// the shared transaction is lost: it is rolled back and its members get the error.
    async fn settle(&mut self) {
        if !self.savepoint {
            return;
        }
        let undone = async {
            self.conn.execute("ROLLBACK TO SAVEPOINT op").await?;
            self.conn.execute("RELEASE SAVEPOINT op").await
        }
        .await;
        self.savepoint = false;
        if let Err(e) = undone {
            self.abort(&format!("rolling back a failed write: {e}")).await;
        }
    }

    /// Rolls the shared transaction back and fails its members.
    async fn abort(&mut self, why: &str) {
        if self.open {
            let _ = self.conn.execute("ROLLBACK").await;
        }
        self.open = false;
        self.wrote_events = false;
        for m in self.members.drain(..) {
            let _ = m.send(Err(why.to_string()));
        }
    }
}

/// The single writer: a connection shared through group commit (see the module docs).
#[derive(Clone)]
pub(super) struct Writer {
    state: Arc<Mutex<WriterState>>,
    flush: mpsc::Sender<()>,
}

/// One write operation's hold on the writer connection, inside its own savepoint. Derefs to
/// the connection; finish with [`WriteTx::commit`], or drop it to roll the operation back.
pub(super) struct WriteTx {
    guard: Option<OwnedMutexGuard<WriterState>>,
    flush: mpsc::Sender<()>,
}

impl Writer {
    /// Takes over `conn` and starts the flusher task, which stops when the last [`Writer`]
    /// clone and [`WriteTx`] are gone. `signal` is bumped after each commit that wrote events.
    pub(super) fn start(conn: SqliteConnection, signal: watch::Sender<u64>) -> Self {
        let state = Arc::new(Mutex::new(WriterState {
            conn,
            open: false,
            savepoint: false,
            members: Vec::new(),
            wrote_events: false,
        }));
        let (flush, mut wake) = mpsc::channel::<()>(1);
        let flusher_state = state.clone();
        tokio::spawn(async move {
            while wake.recv().await.is_some() {
                let mut s = flusher_state.lock().await;
                commit_batch(&mut s, &signal).await;
            }
            // Every handle is gone: finish what is open, then close the connection.
            let mut s = flusher_state.lock().await;
            commit_batch(&mut s, &signal).await;
        });
        Self { state, flush }
    }

    /// Starts a write operation: waits for the connection (first come, first served), opens
    /// the shared transaction if needed and a savepoint for this operation.
    pub(super) async fn begin(&self) -> StoreResult<WriteTx> {
        let mut guard = self.state.clone().lock_owned().await;
        guard.settle().await;
        if !guard.open {
            guard.conn.execute("BEGIN IMMEDIATE").await.map_err(map_err)?;
            guard.open = true;
        }
        guard.conn.execute("SAVEPOINT op").await.map_err(map_err)?;
        guard.savepoint = true;
        Ok(WriteTx {
            guard: Some(guard),
            flush: self.flush.clone(),
        })
    }

    /// Whether an operation holds the connection now (for the pool gauge).
    pub(super) fn busy(&self) -> bool {
        self.state.try_lock().is_err()
    }
}

/// Commits the shared transaction, if one is open, and tells its members how it went.
async fn commit_batch(s: &mut WriterState, signal: &watch::Sender<u64>) {
    s.settle().await;
    if !s.open {
        return;
    }
    if s.members.is_empty() {
        // Only failed or abandoned operations ran in it: nothing to keep.
        s.abort("nothing to commit").await;
        return;
    }
    match s.conn.execute("COMMIT").await {
        Ok(_) => {
            s.open = false;
            metrics::histogram!("switchboard_db_group_commit_size").record(s.members.len() as f64);
            for m in s.members.drain(..) {
                let _ = m.send(Ok(()));
            }
            if std::mem::take(&mut s.wrote_events) {
                signal.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
        Err(e) => s.abort(&format!("commit failed: {e}")).await,
    }
}

impl WriteTx {
    /// Ends the operation: releases its savepoint into the shared transaction and waits
    /// until that transaction is durable. `wrote_events` says whether it wrote events.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the shared transaction failed to commit (nothing of
    /// this operation was kept), or the database error of the release.
    pub(super) async fn commit(mut self, wrote_events: bool) -> StoreResult<()> {
        let mut guard = self.guard.take().expect("a WriteTx holds the writer until it commits");
        if let Err(e) = guard.conn.execute("RELEASE SAVEPOINT op").await {
            // Still marked open: the next holder rolls it back.
            drop(guard);
            let _ = self.flush.try_send(());
            return Err(map_err(e));
        }
        guard.savepoint = false;
        guard.wrote_events |= wrote_events;
        let (done, outcome) = oneshot::channel();
        guard.members.push(done);
        drop(guard);
        // A full channel means a flush is already due, and it will run after us.
        let _ = self.flush.try_send(());
        match outcome.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(StoreError::Unavailable(why)),
            Err(_) => Err(StoreError::Unavailable("the SQLite writer stopped".into())),
        }
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if self.guard.take().is_some() {
            // Unfinished: its savepoint is still open and is rolled back by the next holder;
            // make sure one comes even if no other write does.
            let _ = self.flush.try_send(());
        }
    }
}

impl std::ops::Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self
            .guard
            .as_ref()
            .expect("a WriteTx holds the writer until it commits")
            .conn
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self
            .guard
            .as_mut()
            .expect("a WriteTx holds the writer until it commits")
            .conn
    }
}
