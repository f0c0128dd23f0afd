//! The single SQLite writer: synchronous statements, group commit.
//!
//! SQLite allows one writer at a time, and with `synchronous = FULL` every `COMMIT` waits for
//! an fsync of the WAL. Two costs dominate a write, and this module removes both:
//!
//! - **One durable commit per request** caps the gateway at a few hundred to about a thousand
//!   writes a second. So write operations share transactions (group commit):
//!   [`Writer::begin`] takes the one connection (a FIFO lock), opens the shared transaction
//!   (`BEGIN IMMEDIATE`) if none is open, and starts a savepoint for this operation;
//!   [`WriteTx::commit`] releases the savepoint, joins the open transaction's member list,
//!   hands the connection on and **waits until the shared transaction has committed** (or
//!   failed: then every member gets the error). Nothing is acknowledged before it is on disk.
//!   A flusher task commits: every `commit` wakes it, and it queues for the connection behind
//!   the operations already waiting, so everything that arrived during the previous fsync goes
//!   into the next one. At low load a batch is one operation; under load batches grow by
//!   themselves, with no timer and no added latency.
//! - **A thread hand-off per statement.** An async driver runs SQLite on a thread of its own
//!   and every statement is a round trip to it (two thread wake-ups, tens of microseconds);
//!   an inbound webhook is about a dozen statements. The writer connection is therefore a
//!   plain [`rusqlite::Connection`] whose statements run synchronously, from prepared-statement
//!   cache, on the task that holds it: an operation's statements take microseconds each and
//!   contain no `.await`, so an operation is never cut off half-way by a dropped future.
//!   Only the `COMMIT` (writing the batch's WAL frames) leaves the async worker (`block_in_place`).
//!
//! - **The fsync inside the critical section.** With `synchronous = FULL` the `COMMIT` itself
//!   waits for the WAL's fsync (about two thirds of a commit's time under load), and no other
//!   write can run meanwhile. The writer connection therefore commits with `synchronous =
//!   NORMAL` (the WAL frames are written, not synced), hands the batch to a syncer thread and
//!   lets the next batch start at once; the syncer calls `fdatasync` on the WAL file and only
//!   then answers the batch's members. `fdatasync` flushes every page of the file written
//!   before the call, whichever descriptor wrote it, so a member is answered only once its
//!   commit record is on disk — the same guarantee as `FULL`. Batches that finish while a
//!   sync runs share the next one. What `NORMAL` alone gives up (the last commits before a
//!   power loss) is never acknowledged; SQLite's recovery truncates the WAL at the first frame
//!   whose checksum does not match, so a commit that did not reach the disk is simply gone,
//!   and checkpoints (on a connection of their own, with `FULL`) sync the WAL before copying
//!   it. A failed `fdatasync` leaves the state of the file unknown (the kernel may drop the
//!   dirty pages): the batch gets an error and the writer refuses every later write until the
//!   gateway is restarted (and `/ready` answers 503), as PostgreSQL does.
//! - **Readers see a commit before its sync.** Other connections read the WAL as soon as the
//!   `COMMIT` returns, a millisecond or two before the sync. That is harmless for a plain
//!   read, but a cursor must never pass a change a power loss could take back (the counter
//!   would hand its number out again and the poller would skip the new change). So every
//!   batch notes the newest change cursor and event cursor it committed, and the syncer
//!   publishes them as [`Durable`] marks after the sync; the cursor reads (`messages?since=`,
//!   the event stream) return a change only once it is within the marks, waiting for the
//!   sync (a millisecond or two) when they found one that is not yet.
//!
//! - **The WAL must start over.** Checkpoints run on a thread of their own (passive: they never
//!   wait; at a lower priority than the threads that answer requests, [`CHECKPOINT_NICE`]),
//!   but SQLite only starts the WAL over from its beginning when a write begins after a
//!   checkpoint caught up while no reader used the WAL, which never happens under steady
//!   load. So once the WAL passes 64 MB the writer restarts it after a commit
//!   ([`restart_wal`], a stall of a few milliseconds every 64 MB of writes, once the
//!   checkpointer has copied and synced nearly everything: [`catch_up`]).
//!
//! An operation that fails (its [`WriteTx`] is dropped without `commit`) is rolled back to
//! its savepoint at once, so it never leaks into the batch. If even that fails, the whole
//! shared transaction is rolled back and its members get the error.
//!
//! Readers stay on sqlx's pool: a read is one or two statements, and concurrent reads need
//! connections of their own anyway.

use anyhow::Context;
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Mutex, OwnedMutexGuard};

use super::event_tail::EventTail;
use crate::events::EventRecord;
use crate::store::{StoreError, StoreResult};

/// The result a batch member waits for: `Err` carries the commit failure's text.
type Outcome = Result<(), String>;

/// Prepared statements kept per connection: every distinct SQL text of the write paths, with
/// room to spare (an evicted statement is only re-prepared).
const STATEMENT_CACHE: usize = 256;

/// The writer connection and the state of the shared transaction on it.
pub(super) struct WriterState {
    conn: Connection,
    /// `BEGIN IMMEDIATE` was issued and neither committed nor rolled back.
    open: bool,
    /// Operations released into the open transaction, waiting for its commit.
    members: Vec<oneshot::Sender<Outcome>>,
    /// The events those operations wrote, in cursor order (for the [`EventTail`]).
    events: Vec<EventRecord>,
    /// Set by the checkpointer when the WAL has grown past [`WAL_RESTART_FRAMES`]: the writer
    /// then restarts it after its next commit ([`restart_wal`]).
    wal_restart_due: Arc<AtomicBool>,
}

impl WriterState {
    fn run(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.execute([]).map(|_| ())
    }

    /// Rolls the shared transaction back and fails its members.
    fn abort(&mut self, why: &str) {
        if self.open {
            let _ = self.run("ROLLBACK");
        }
        self.open = false;
        self.events.clear();
        for m in self.members.drain(..) {
            let _ = m.send(Err(why.to_string()));
        }
    }

    /// Commits the shared transaction, if one is open, and returns its members to answer once
    /// the WAL is synced (a failed commit answers them here, with the error).
    fn commit_batch(&mut self) -> Option<Batch> {
        if !self.open {
            return None;
        }
        if self.members.is_empty() {
            // Only failed operations ran in it: nothing to keep.
            self.abort("nothing to commit");
            return None;
        }
        // The full-text indexes take the batch's new rows in one go (search_index.rs); FTS5
        // may merge index segments then, which can take milliseconds, so this leaves the
        // async worker together with the COMMIT.
        let started = std::time::Instant::now();
        let committed = off_the_runtime(|| {
            super::search_index::index_pending(&self.conn)
                .map_err(|e| format!("indexing the batch for search failed: {e}"))?;
            let marks = Marks::read(&self.conn).map_err(|e| format!("reading the batch's cursors failed: {e}"))?;
            self.run("COMMIT").map_err(|e| format!("commit failed: {e}"))?;
            if self.wal_restart_due.swap(false, Ordering::AcqRel) {
                restart_wal(&self.conn);
            }
            Ok::<_, String>(marks)
        });
        metrics::histogram!("switchboard_db_commit_seconds").record(started.elapsed().as_secs_f64());
        match committed {
            Ok(marks) => {
                self.open = false;
                metrics::histogram!("switchboard_db_group_commit_size").record(self.members.len() as f64);
                Some(Batch {
                    members: std::mem::take(&mut self.members),
                    marks,
                    events: std::mem::take(&mut self.events),
                })
            }
            Err(why) => {
                self.abort(&why);
                None
            }
        }
    }
}

/// A committed batch waiting for the WAL sync: whom to answer, the newest cursors it
/// committed and the events it wrote.
struct Batch {
    members: Vec<oneshot::Sender<Outcome>>,
    marks: Marks,
    events: Vec<EventRecord>,
}

/// The newest message change cursor (`counters.change_seq`) and event cursor (`events.seq`).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Marks {
    pub change_seq: i64,
    pub event_seq: i64,
}

impl Marks {
    /// The cursors as the connection sees them now.
    fn read(conn: &Connection) -> rusqlite::Result<Self> {
        conn.prepare_cached(
            "SELECT (SELECT value FROM counters WHERE name = 'change_seq'), \
             COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)",
        )?
        .query_row([], |r| {
            Ok(Marks {
                change_seq: r.get(0)?,
                event_seq: r.get(1)?,
            })
        })
    }
}

/// The newest cursors known to be on disk: what a cursor read may return (module docs).
#[derive(Debug)]
pub(super) struct Durable {
    marks: watch::Sender<Marks>,
    /// Taken by the syncer around each sync; the test suite holds it to look at a batch that
    /// is committed but not yet synced ([`super::SqliteStore::hold_wal_syncs`]).
    pub(super) gate: std::sync::Mutex<()>,
}

/// How long a cursor read waits for the sync of a change it found (normally one sync, about
/// 2 ms) before it leaves that change for the next read.
const SYNC_WAIT: Duration = Duration::from_millis(500);

impl Durable {
    fn new(marks: Marks) -> Self {
        Self {
            marks: watch::Sender::new(marks),
            gate: std::sync::Mutex::new(()),
        }
    }

    /// Moves the marks up to `m`; returns whether the event cursor moved (new events are on
    /// disk).
    fn advance(&self, m: Marks) -> bool {
        let mut new_events = false;
        self.marks.send_if_modified(|cur| {
            let next = Marks {
                change_seq: cur.change_seq.max(m.change_seq),
                event_seq: cur.event_seq.max(m.event_seq),
            };
            new_events = next.event_seq != cur.event_seq;
            let moved = new_events || next.change_seq != cur.change_seq;
            *cur = next;
            moved
        });
        new_events
    }

    /// The newest cursors on disk once `ready` holds for them, or after [`SYNC_WAIT`]: a
    /// reader that found a change waits for it to be synced rather than leave it out.
    pub(super) async fn wait_for(&self, ready: impl Fn(&Marks) -> bool) -> Marks {
        let mut marks = self.marks.subscribe();
        let _ = tokio::time::timeout(SYNC_WAIT, marks.wait_for(|m| ready(m))).await;
        *self.marks.borrow()
    }

    /// Keeps of `items` (read in cursor order, `cursor` of each) those on disk: waits for the
    /// newest one's sync (see [`Durable::wait_for`]) and drops any still unsynced after that.
    /// `mark` picks the cursor kind from the marks. Cursors are handed out in commit order,
    /// so the newest one being on disk means all the others are.
    pub(super) async fn keep_on_disk<T>(
        &self,
        items: &mut Vec<T>,
        cursor: impl Fn(&T) -> i64,
        mark: impl Fn(&Marks) -> i64,
    ) {
        let Some(newest) = items.last().map(&cursor) else {
            return;
        };
        let on_disk = mark(&self.wait_for(|m| mark(m) >= newest).await);
        items.retain(|i| cursor(i) <= on_disk);
    }
}

/// Starts the thread that makes committed batches durable (module docs): it takes every batch
/// queued, calls `fdatasync` on the WAL once for all of them, then appends their events to
/// `tail`, advances `durable`, answers their members and bumps `signal` if any wrote events.
/// On a failed sync it sets `poisoned`.
fn start_syncer(
    wal: PathBuf,
    signal: watch::Sender<u64>,
    poisoned: Arc<AtomicBool>,
    durable: Arc<Durable>,
    tail: Arc<EventTail>,
) -> std::io::Result<std::sync::mpsc::Sender<Batch>> {
    let (queue, batches) = std::sync::mpsc::channel::<Batch>();
    std::thread::Builder::new()
        .name("sqlite-wal-sync".into())
        .spawn(move || {
            while let Ok(first) = batches.recv() {
                let mut due = vec![first];
                due.extend(batches.try_iter());
                let gate = durable.gate.lock().unwrap_or_else(|e| e.into_inner());
                let started = std::time::Instant::now();
                let synced = std::fs::File::open(&wal).and_then(|f| f.sync_data());
                drop(gate);
                metrics::histogram!("switchboard_db_wal_sync_seconds").record(started.elapsed().as_secs_f64());
                let outcome = synced.map_err(|e| {
                    poisoned.store(true, Ordering::SeqCst);
                    tracing::error!(error = %e, wal = %wal.display(), "fdatasync of the SQLite WAL failed; refusing further writes until restart");
                    format!("syncing the database to disk failed: {e}")
                });
                let mut wake = false;
                if outcome.is_ok() {
                    for b in &mut due {
                        tail.extend(std::mem::take(&mut b.events));
                        wake |= durable.advance(b.marks);
                    }
                }
                for m in due.into_iter().flat_map(|b| b.members) {
                    let _ = m.send(outcome.clone());
                }
                if wake {
                    signal.send_modify(|v| *v = v.wrapping_add(1));
                }
            }
        })?;
    Ok(queue)
}

/// Runs a call that waits on the disk. On a multi-threaded runtime the worker hands its other
/// tasks to the rest of the pool first; a single-threaded runtime (tests) just runs it.
fn off_the_runtime<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// How often the checkpointer copies committed WAL frames back into the database file. Before
/// [`catch_up`] it also bounded the writer's stall in [`restart_wal`]: every 500 ms, restarts
/// stalled the writer 37–98 ms (75 on average); every 100 ms, about 40 on average; every 50
/// ms, 21–26 (docs/BENCHMARKS.md).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

/// WAL length (frames of one page, 4 KiB by default: 64 MB) past which the writer restarts
/// the WAL ([`restart_wal`]).
const WAL_RESTART_FRAMES: i64 = 16_384;

/// The WAL file is cut back to this size (bytes) when it starts over, so that a burst does
/// not leave a large file behind (`PRAGMA journal_size_limit`).
pub(super) const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// How long a WAL restart waits for readers still reading from the WAL before it gives up
/// (the checkpointer asks again after its next passive checkpoint): the writer is stalled
/// meanwhile.
const RESTART_WAIT: Duration = Duration::from_millis(20);

/// The writer's busy timeout outside [`restart_wal`] (as set in `open_writer`).
pub(super) const WRITER_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Makes the WAL start over from its beginning: a `RESTART` checkpoint on the writer's own
/// connection, right after a commit, so no write is open. If readers keep it from completing,
/// the checkpointer asks again after its next passive checkpoint.
///
/// Why: a passive checkpoint copies frames into the database file but never resets the WAL;
/// SQLite starts it over only when a write begins after a checkpoint caught up with every
/// frame while no reader was using the WAL. Under steady load that moment never comes (the
/// writer commits every few milliseconds and some reader is always reading), and the WAL
/// grew without bound: 1.6 GB after 35 s of the benchmark's inbound load, with its index
/// (the `-shm` file, mapped by every connection) counted in the gateway's resident memory.
/// `RESTART` copies the frames the passive checkpoints have not copied yet, syncs the database
/// file — measured, that is the whole stall (the wait for readers took about 25 µs), which is
/// why the checkpointer has already copied nearly everything and synced it ([`catch_up`]) —
/// and waits for the readers on the WAL to finish (at most
/// [`RESTART_WAIT`]; new readers then read from the database file); the next write starts the
/// WAL over and cuts the file to [`WAL_SIZE_LIMIT`]. The WAL is synced before frames are
/// copied (`synchronous = NORMAL` does so for checkpoints), so nothing the syncer has not
/// made durable yet reaches the database file unsynced.
fn restart_wal(conn: &Connection) {
    if let Err(e) = conn.busy_timeout(RESTART_WAIT) {
        tracing::warn!(error = %e, "WAL restart: could not set the busy timeout");
        return;
    }
    let started = std::time::Instant::now();
    let done = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0));
    if let Err(e) = conn.busy_timeout(WRITER_BUSY_TIMEOUT) {
        tracing::warn!(error = %e, "WAL restart: could not restore the busy timeout");
    }
    let outcome = match done {
        // busy = 0: every frame copied and every reader off the WAL.
        Ok(0) => "restarted",
        Ok(_) => "readers_busy",
        Err(e) => {
            tracing::warn!(error = %e, "WAL restart failed; the checkpointer will ask again");
            "error"
        }
    };
    metrics::histogram!("switchboard_db_wal_restart_seconds", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

/// Runs WAL checkpoints on a connection and thread of their own, off the commit path.
/// SQLite's automatic checkpoint runs inside the `COMMIT` that crosses 1,000 WAL pages, so one
/// batch in every few hundred also copied megabytes into the database file and waited for its
/// fsync while every later write queued behind it. A passive checkpoint never waits for the
/// writer or the readers; once the WAL is past its limit the thread asks the writer to make
/// it start over ([`restart_wal`]). The thread ends once the writer is gone (the connection's
/// close checkpoints what is left).
/// Returns whether the thread started.
fn start_checkpointer(
    conn: Connection,
    writer: Weak<Mutex<WriterState>>,
    wal_restart_due: Arc<AtomicBool>,
    wal_restart_frames: Arc<AtomicI64>,
) -> bool {
    let spawned = std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || {
            lower_priority();
            loop {
                std::thread::sleep(CHECKPOINT_EVERY);
                if writer.strong_count() == 0 {
                    break;
                }
                match passive_checkpoint(&conn) {
                    Ok(frames) if frames >= wal_restart_frames.load(Ordering::Relaxed) => {
                        catch_up(&conn, frames);
                        wal_restart_due.store(true, Ordering::Release);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; retrying"),
                }
            }
        });
    match spawned {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "could not start the WAL checkpoint thread; the writer checkpoints as it commits");
            false
        }
    }
}

/// The nice value of the checkpointer thread: it yields the cores to the threads that answer
/// requests. A checkpoint copies a few megabytes of WAL at a time, a burst of CPU of several
/// milliseconds; at the same priority as the runtime's workers, on two cores it delayed
/// whichever requests were waiting for one. On the million-message database, six alternating
/// pairs at 1,500 webhooks/s offered: p99 37–90 → 24–61 ms (lower in every pair), the closed
/// loop 1,890 → 2,100/s on average, the WAL no longer than before (about 70 MB at most) — it
/// still gets the idle time, and its share of the CPU when none is idle (docs/BENCHMARKS.md).
pub const CHECKPOINT_NICE: i32 = 10;

/// Gives the calling thread the nice value [`CHECKPOINT_NICE`] (on Linux the nice value is
/// per thread). A failure only costs latency, so it is logged and ignored.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), CHECKPOINT_NICE) {
        tracing::debug!(error = %e, "could not lower the WAL checkpointer's priority");
    }
}

/// A passive checkpoint; returns the number of frames in the WAL (all of them copied unless
/// a reader still needed some).
fn passive_checkpoint(conn: &Connection) -> rusqlite::Result<i64> {
    // (busy, frames in the WAL, frames copied)
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1))
}

/// Frames appended during a passive checkpoint below which [`catch_up`] stops copying: about
/// what a few commits write.
const CAUGHT_UP_FRAMES: i64 = 128;

/// Frames appended while [`catch_up`] synced the database file below which it stops syncing:
/// the restart then has about that many frames' pages to copy and sync.
const SYNCED_UP_FRAMES: i64 = 32;

/// Copy-and-sync rounds [`catch_up`] runs at most.
const CATCH_UP_ROUNDS: usize = 3;

/// Prepares a WAL restart on the checkpointer's connection, so that the restart itself, which
/// every write waits for, has little left to do: its checkpoint copies the frames no passive
/// checkpoint has copied yet and syncs every page of the database file written since the last
/// sync, and that sync is its cost (a few milliseconds per hundred scattered pages).
///
/// A passive checkpoint that did not copy every frame (under load, one never does: commits go
/// on while it copies) leaves the pages it wrote unsynced; without any preparation the
/// restart synced the whole WAL cycle's pages (measured: `fsync` of the database 7–9 ms, the
/// restart about 12 ms, every 64 MB of WAL). So, in rounds: passive checkpoints back to back
/// (a few at most) until one finds fewer than [`CAUGHT_UP_FRAMES`] new frames, an `fsync` of
/// the database file, and a passive checkpoint that copies what was committed during the sync.
/// A sync takes milliseconds, and the commits it overlaps leave the next round fewer pages, so
/// the rounds stop once fewer than [`SYNCED_UP_FRAMES`] frames came during one (at most
/// [`CATCH_UP_ROUNDS`]). With a single round the restart still synced what came during that
/// sync: 3–26 ms on a VM with slow syncs (docs/BENCHMARKS.md).
fn catch_up(conn: &Connection, mut frames: i64) {
    let Some(db) = conn.path().filter(|p| !p.is_empty()).map(PathBuf::from) else {
        return;
    };
    for _ in 0..CATCH_UP_ROUNDS {
        for _ in 0..4 {
            match passive_checkpoint(conn) {
                Ok(now) if now.saturating_sub(frames) >= CAUGHT_UP_FRAMES => frames = now,
                Ok(now) => {
                    frames = now;
                    break;
                }
                Err(_) => return,
            }
        }
        if let Err(e) = std::fs::File::open(&db).and_then(|f| f.sync_all()) {
            tracing::warn!(error = %e, "syncing the database file before a WAL restart failed");
            return;
        }
        match passive_checkpoint(conn) {
            Ok(now) if now.saturating_sub(frames) >= SYNCED_UP_FRAMES => frames = now,
            _ => return,
        }
    }
}

/// The single writer: a connection shared through group commit (see the module docs).
#[derive(Clone)]
pub(super) struct Writer {
    state: Arc<Mutex<WriterState>>,
    flush: mpsc::Sender<()>,
    /// Set when a WAL sync failed: every later write is refused.
    poisoned: Arc<AtomicBool>,
    /// The newest cursors on disk.
    durable: Arc<Durable>,
    /// The newest events on disk.
    tail: Arc<EventTail>,
    /// WAL length (frames) past which the WAL is restarted; [`WAL_RESTART_FRAMES`] but for
    /// tests.
    wal_restart_frames: Arc<AtomicI64>,
}

/// One write operation's hold on the writer connection, inside its own savepoint. Derefs to
/// the connection; finish with [`WriteTx::commit`], or drop it to roll the operation back.
pub(super) struct WriteTx {
    guard: Option<OwnedMutexGuard<WriterState>>,
    /// When it got the connection (for `switchboard_db_writer_hold_seconds`).
    acquired: std::time::Instant,
    flush: mpsc::Sender<()>,
}

impl Writer {
    /// Takes over `conn` (switching it to `synchronous = NORMAL`: the syncer thread makes
    /// commits durable) and starts the flusher task, which stops when the last [`Writer`]
    /// clone and [`WriteTx`] are gone. `signal` is bumped after each durable commit that
    /// wrote events.
    ///
    /// # Errors
    /// The database error of the pragma; the I/O error of syncing the WAL file once (it must
    /// exist and accept `fdatasync`) or of starting the syncer thread.
    pub(super) fn start(conn: Connection, path: &Path, signal: watch::Sender<u64>) -> anyhow::Result<Self> {
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let poisoned = Arc::new(AtomicBool::new(false));
        // The WAL is the database file's name + "-wal", where SQLite resolved that name (it
        // follows symbolic links); the start-up write in `open_writer` has created it.
        let mut wal = conn
            .path()
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| path.to_path_buf())
            .into_os_string();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        // Whatever an earlier process left in the WAL is made durable before it counts as such.
        std::fs::File::open(&wal)
            .and_then(|f| f.sync_data())
            .with_context(|| format!("syncing the SQLite WAL {}", wal.display()))?;
        let marks = Marks::read(&conn)?;
        let tail = Arc::new(EventTail::new(marks.event_seq));
        let durable = Arc::new(Durable::new(marks));
        let syncer = start_syncer(wal, signal, poisoned.clone(), durable.clone(), tail.clone())?;
        // FULL, explicitly: a checkpoint syncs the WAL before it copies frames into the
        // database file, so it never copies a commit the syncer has not made durable yet.
        let checkpoints =
            match Connection::open(path).and_then(|c| c.pragma_update(None, "synchronous", "FULL").map(|()| c)) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "no WAL checkpoint connection: the writer checkpoints as it commits");
                    None
                }
            };
        let wal_restart_due = Arc::new(AtomicBool::new(false));
        let wal_restart_frames = Arc::new(AtomicI64::new(WAL_RESTART_FRAMES));
        let state = Arc::new(Mutex::new(WriterState {
            conn,
            open: false,
            members: Vec::new(),
            events: Vec::new(),
            wal_restart_due: wal_restart_due.clone(),
        }));
        let (flush, mut wake) = mpsc::channel::<()>(1);
        let flusher_state = state.clone();
        tokio::spawn(async move {
            while wake.recv().await.is_some() {
                // The lock is released before the sync: the next batch runs meanwhile.
                let batch = flusher_state.lock().await.commit_batch();
                if let Some(b) = batch {
                    let _ = syncer.send(b);
                }
            }
            // Every handle is gone: finish what is open; the connection closes with the state.
            let batch = flusher_state.lock().await.commit_batch();
            if let Some(b) = batch {
                let _ = syncer.send(b);
            }
        });
        if let Some(c) = checkpoints {
            if start_checkpointer(c, Arc::downgrade(&state), wal_restart_due, wal_restart_frames.clone()) {
                // Nothing else holds the writer yet; if something did, SQLite's automatic
                // checkpoint would simply stay on.
                if let Ok(s) = state.try_lock() {
                    if let Err(e) = s.conn.pragma_update(None, "wal_autocheckpoint", 0) {
                        tracing::warn!(error = %e, "could not move WAL checkpoints off the writer");
                    }
                }
            }
        }
        Ok(Self {
            state,
            flush,
            poisoned,
            durable,
            tail,
            wal_restart_frames,
        })
    }

    /// Starts a write operation: waits for the connection (first come, first served), opens
    /// the shared transaction if needed and a savepoint for this operation.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] once a WAL sync has failed; the database error of `BEGIN` or
    /// `SAVEPOINT`, mapped by `From<rusqlite::Error> for StoreError`.
    pub(super) async fn begin(&self) -> StoreResult<WriteTx> {
        self.check_writable()?;
        let started = std::time::Instant::now();
        let mut guard = self.state.clone().lock_owned().await;
        let acquired = std::time::Instant::now();
        metrics::histogram!("switchboard_db_writer_wait_seconds").record((acquired - started).as_secs_f64());
        if !guard.open {
            guard.run("BEGIN IMMEDIATE")?;
            guard.open = true;
        }
        guard.run("SAVEPOINT op")?;
        Ok(WriteTx {
            acquired,
            guard: Some(guard),
            flush: self.flush.clone(),
        })
    }

    /// Whether writes are still taken (`/ready` asks through the store's ping).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] once a WAL sync has failed.
    pub(super) fn check_writable(&self) -> StoreResult<()> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "an earlier sync of the database to disk failed; restart the gateway".into(),
            ));
        }
        Ok(())
    }

    /// Test support: restart the WAL past `frames` frames instead of [`WAL_RESTART_FRAMES`].
    pub(super) fn set_wal_restart_frames(&self, frames: i64) {
        self.wal_restart_frames.store(frames.max(1), Ordering::Relaxed);
    }

    /// The newest cursors known to be on disk (what cursor reads may return).
    pub(super) fn durable(&self) -> &Durable {
        &self.durable
    }

    /// The newest events on disk.
    pub(super) fn tail(&self) -> &EventTail {
        &self.tail
    }

    /// Whether an operation holds the connection now (for the pool gauge).
    pub(super) fn busy(&self) -> bool {
        self.state.try_lock().is_err()
    }
}

impl WriteTx {
    /// Ends the operation: releases its savepoint into the shared transaction and waits
    /// until that transaction is committed and synced to disk. `events` are the rows the
    /// operation wrote to `events`, in cursor order (they join the [`EventTail`] once durable).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the shared transaction failed to commit (nothing of
    /// this operation was kept), or the database error of the release.
    pub(super) async fn commit(mut self, events: Vec<EventRecord>) -> StoreResult<()> {
        let mut guard = self.guard.take().expect("a WriteTx holds the writer until it commits");
        if let Err(e) = guard.run("RELEASE SAVEPOINT op") {
            undo(&mut guard);
            return Err(e.into());
        }
        let (done, outcome) = oneshot::channel();
        guard.members.push(done);
        guard.events.extend(events);
        drop(guard);
        record_hold(self.acquired);
        // A full channel means a flush is already due, and it will run after us.
        let _ = self.flush.try_send(());
        match outcome.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(StoreError::Unavailable(why)),
            Err(_) => Err(StoreError::Unavailable("the SQLite writer stopped".into())),
        }
    }
}

/// Records how long an operation held the writer (`switchboard_db_writer_hold_seconds`): with
/// the commits' time (`switchboard_db_commit_seconds`), how busy the single writer is.
fn record_hold(acquired: std::time::Instant) {
    metrics::histogram!("switchboard_db_writer_hold_seconds").record(acquired.elapsed().as_secs_f64());
}

/// Rolls back the savepoint of an operation that did not commit. If that fails the shared
/// transaction is lost: it is rolled back and its members get the error.
fn undo(s: &mut WriterState) {
    let undone = s
        .run("ROLLBACK TO SAVEPOINT op")
        .and_then(|()| s.run("RELEASE SAVEPOINT op"));
    if let Err(e) = undone {
        s.abort(&format!("rolling back a failed write: {e}"));
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if let Some(mut guard) = self.guard.take() {
            undo(&mut guard);
            drop(guard);
            record_hold(self.acquired);
            // A transaction may be open with no member left to wake the flusher.
            let _ = self.flush.try_send(());
        }
    }
}

impl std::ops::Deref for WriteTx {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self
            .guard
            .as_ref()
            .expect("a WriteTx holds the writer until it commits")
            .conn
    }
}
