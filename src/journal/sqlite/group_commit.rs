//! Group commit: the journal's hot writes (reservations, delivery outcomes, settlements) that
//! queue while another runs share one transaction, each in a savepoint of its own, and one
//! `fsync` of the write-ahead log.
//!
//! The connection serves one call at a time, so while one write commits, the poller's next
//! reservation, a sink's outcomes and the settler's acknowledgements wait for their turn. The
//! caller whose turn comes first takes every write waiting at that moment (its own included,
//! unless an earlier group took it) and runs them in order. Each write's answer is sent only
//! after the commit that makes it durable: a write that fails is rolled back to its savepoint
//! and the others still commit; a commit that fails fails every write of the group.

use rusqlite::Connection;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// One queued write: the operation, and where its answer goes once the group is committed.
pub(super) trait QueuedWrite: Send {
    /// The caller stopped waiting (its future was dropped before the write ran): not run.
    fn abandoned(&self) -> bool;
    /// Runs the write inside the open transaction; keeps its result. `true` if it succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller: the write's own result, or `commit`'s error if the group could not
    /// be committed (the write's changes were rolled back with it).
    fn answer(self: Box<Self>, commit: &Result<(), Arc<anyhow::Error>>);
}

/// A write of result type `R`, queued for the next group.
pub(super) struct Write<R, F> {
    op: Option<F>,
    result: Option<anyhow::Result<R>>,
    reply: oneshot::Sender<anyhow::Result<R>>,
}

impl<R, F> Write<R, F>
where
    F: FnOnce(&Connection) -> anyhow::Result<R> + Send + 'static,
    R: Send + 'static,
{
    /// The write, and the receiver its caller awaits.
    pub(super) fn queued(op: F) -> (Box<dyn QueuedWrite>, oneshot::Receiver<anyhow::Result<R>>) {
        let (reply, answer) = oneshot::channel();
        let write = Write {
            op: Some(op),
            result: None,
            reply,
        };
        (Box::new(write), answer)
    }
}

impl<R, F> QueuedWrite for Write<R, F>
where
    F: FnOnce(&Connection) -> anyhow::Result<R> + Send + 'static,
    R: Send + 'static,
{
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn run(&mut self, conn: &Connection) -> bool {
        let result = match self.op.take() {
            Some(op) => op(conn),
            None => Err(anyhow::anyhow!("journal write ran twice")),
        };
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, commit: &Result<(), Arc<anyhow::Error>>) {
        let this = *self;
        let answer = match (this.result, commit) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (Some(Ok(_)), Err(e)) => Err(anyhow::anyhow!("{e:#}")),
            (None, Err(e)) => Err(anyhow::anyhow!("{e:#}")),
            (None, Ok(())) => Err(anyhow::anyhow!("journal write was not run")),
        };
        // A caller that stopped waiting gets nothing: its write stands or fell with the group.
        let _ = this.reply.send(answer);
    }
}

/// The writes waiting for the next group, in the order they were queued.
pub(super) type WriteQueue = Arc<Mutex<Vec<Box<dyn QueuedWrite>>>>;

/// Takes every write waiting in `queue`.
pub(super) fn take_all(queue: &WriteQueue) -> Vec<Box<dyn QueuedWrite>> {
    std::mem::take(
        &mut *queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    )
}

/// Runs `writes` in one transaction on `conn` and answers each. Returns how many ran.
pub(super) fn commit_group(conn: &mut Connection, mut writes: Vec<Box<dyn QueuedWrite>>) -> usize {
    writes.retain(|write| !write.abandoned());
    if writes.is_empty() {
        return 0;
    }
    let commit = run_in_one_transaction(conn, &mut writes).map_err(Arc::new);
    let ran = writes.len();
    for write in writes {
        write.answer(&commit);
    }
    ran
}

fn run_in_one_transaction(
    conn: &mut Connection,
    writes: &mut [Box<dyn QueuedWrite>],
) -> anyhow::Result<()> {
    let tx = conn.transaction()?;
    if let [only] = writes {
        // Alone, the write needs no savepoint: if it fails, nothing of the transaction stays.
        if !only.run(&tx) {
            return Err(anyhow::anyhow!("journal write failed"));
        }
    } else {
        for write in writes.iter_mut() {
            tx.execute_batch("SAVEPOINT journal_write")?;
            if write.run(&tx) {
                tx.execute_batch("RELEASE journal_write")?;
            } else {
                // Some errors (a full disk, an I/O error) end the whole transaction: then
                // rolling back to the savepoint fails, and so does the group.
                tx.execute_batch("ROLLBACK TO journal_write; RELEASE journal_write")?;
            }
        }
    }
    if tx.is_autocommit() {
        anyhow::bail!("the journal's transaction was rolled back by SQLite");
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (n INTEGER PRIMARY KEY)")
            .unwrap();
        conn
    }

    fn insert(n: i64) -> impl FnOnce(&Connection) -> anyhow::Result<i64> + Send + 'static {
        move |conn| {
            conn.execute("INSERT INTO t (n) VALUES (?1)", [n])?;
            Ok(n)
        }
    }

    fn rows(conn: &Connection) -> Vec<i64> {
        conn.prepare("SELECT n FROM t ORDER BY n")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn a_failed_write_is_rolled_back_alone_and_the_others_commit() {
        let mut conn = journal();
        let (a, a_answer) = Write::queued(insert(1));
        let (b, mut b_answer) = Write::queued(|conn: &Connection| -> anyhow::Result<i64> {
            conn.execute("INSERT INTO t (n) VALUES (2)", [])?;
            conn.execute("INSERT INTO t (n) VALUES (1)", [])?; // the primary key refuses
            Ok(2)
        });
        let (c, c_answer) = Write::queued(insert(3));
        assert_eq!(commit_group(&mut conn, vec![a, b, c]), 3);
        assert_eq!(a_answer.blocking_recv().unwrap().unwrap(), 1);
        let err = b_answer.try_recv().unwrap().unwrap_err();
        assert!(err.to_string().contains("UNIQUE"), "{err:#}");
        assert_eq!(c_answer.blocking_recv().unwrap().unwrap(), 3);
        assert_eq!(
            rows(&conn),
            [1, 3],
            "the failed write left nothing, not even its row 2"
        );
        assert!(conn.is_autocommit(), "the group's transaction is closed");
    }

    #[test]
    fn a_lone_write_that_fails_leaves_nothing() {
        let mut conn = journal();
        let (a, a_answer) = Write::queued(|conn: &Connection| -> anyhow::Result<()> {
            conn.execute("INSERT INTO t (n) VALUES (7)", [])?;
            anyhow::bail!("refused after writing")
        });
        assert_eq!(commit_group(&mut conn, vec![a]), 1);
        let err = a_answer.blocking_recv().unwrap().unwrap_err();
        assert_eq!(err.to_string(), "refused after writing");
        assert!(rows(&conn).is_empty());
        assert!(conn.is_autocommit());
    }

    #[test]
    fn a_commit_that_fails_fails_every_write_of_the_group() {
        let mut conn = journal();
        // A deferred foreign key is checked at commit: the group cannot commit.
        conn.execute_batch(
            "PRAGMA foreign_keys = ON;
             CREATE TABLE child (p INTEGER REFERENCES t(n) DEFERRABLE INITIALLY DEFERRED);",
        )
        .unwrap();
        let (a, a_answer) = Write::queued(insert(1));
        let (b, b_answer) = Write::queued(|conn: &Connection| -> anyhow::Result<()> {
            conn.execute("INSERT INTO child (p) VALUES (99)", [])?;
            Ok(())
        });
        assert_eq!(commit_group(&mut conn, vec![a, b]), 2);
        for err in [
            a_answer.blocking_recv().unwrap().map(|_| ()).unwrap_err(),
            b_answer.blocking_recv().unwrap().unwrap_err(),
        ] {
            assert!(err.to_string().contains("FOREIGN KEY"), "{err:#}");
        }
        assert!(conn.is_autocommit(), "the transaction did not stay open");
        assert!(rows(&conn).is_empty(), "nothing of the group stayed");
    }

    #[test]
    fn a_write_whose_caller_left_is_not_run() {
        let mut conn = journal();
        let (a, a_answer) = Write::queued(insert(1));
        let (b, b_answer) = Write::queued(insert(2));
        drop(a_answer);
        assert_eq!(commit_group(&mut conn, vec![a, b]), 1);
        assert_eq!(b_answer.blocking_recv().unwrap().unwrap(), 2);
        assert_eq!(rows(&conn), [2]);
    }
}
