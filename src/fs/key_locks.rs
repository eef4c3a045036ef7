//! Locks on keys and key prefixes: a directory move excludes the writes inside the directory
//! it moves, and nothing else.
//!
//! S3 cannot rename a directory: the move lists every object under the old prefix, copies
//! each and deletes the originals, and only then do the rows take their new names. A write
//! inside the directory meanwhile (an upload, a chmod's CopyObject onto the file's own key, a
//! create, a delete, a file rename) would compute its key from the old names and land under
//! the old prefix after the move listed it: lost, or left behind as a second copy. So every
//! write of an object holds its key *shared* ([`KeyLocks::write`]), and a directory move holds
//! its old and new prefixes *exclusively* ([`KeyLocks::moving`]) from before it lists until
//! its rows have the new names. A key is covered by a prefix it starts with.
//!
//! Writes elsewhere never wait for a move, and a move never waits for writes elsewhere (a
//! single mount-wide lock stopped every `close()` on the mount for the whole copy of a
//! 2,000-file folder). A move waiting for its prefixes stops new writes under them, so that a
//! steady stream of saves inside a folder cannot postpone its move forever; overlapping
//! moves go in the order they came.
//!
//! A request takes all its key locks at once, after its directory locks and before any
//! file's change or content lock, and asks for no more while it holds them: that order is what keeps a
//! waiting move and the writes it waits for from waiting on each other.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::Notify;

/// The keys being written and the directory moves of one mount.
#[derive(Debug, Default)]
pub struct KeyLocks {
    state: Mutex<State>,
    /// Woken whenever a lock is released (waiters then look again).
    released: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Keys being written, each with how many writers hold it.
    writing: HashMap<String, usize>,
    /// Directory moves, those running and those waiting, in the order they came.
    moves: Vec<Move>,
    next_move: u64,
}

#[derive(Debug)]
struct Move {
    id: u64,
    prefixes: Vec<String>,
}

impl State {
    fn covered(&self, key: &str) -> bool {
        self.moves
            .iter()
            .any(|m| m.prefixes.iter().any(|p| key.starts_with(p.as_str())))
    }

    /// Whether move `id` may run: no write under its prefixes, and no earlier move that
    /// overlaps it.
    fn may_move(&self, id: u64) -> bool {
        let Some(me) = self.moves.iter().find(|m| m.id == id) else {
            return false;
        };
        let overlaps = |a: &str, b: &str| a.starts_with(b) || b.starts_with(a);
        let writes_under = self
            .writing
            .keys()
            .any(|k| me.prefixes.iter().any(|p| k.starts_with(p.as_str())));
        let earlier_overlapping = self.moves.iter().any(|m| {
            m.id < id
                && m.prefixes
                    .iter()
                    .any(|a| me.prefixes.iter().any(|b| overlaps(a, b)))
        });
        !writes_under && !earlier_overlapping
    }
}

/// Keys held for writing; released on drop.
#[derive(Debug)]
pub struct WriteGuard<'a> {
    locks: &'a KeyLocks,
    keys: Vec<String>,
}

/// Prefixes held by a directory move (or waited for); released on drop.
#[derive(Debug)]
pub struct MoveGuard<'a> {
    locks: &'a KeyLocks,
    id: u64,
}

impl KeyLocks {
    /// Holds for writing the keys `keys_now` gives, once no directory move covering any of
    /// them runs or waits. The keys are computed again once held, and the wait repeats if
    /// they changed: a move (or a rename) that ran meanwhile renamed the entries.
    pub async fn write<const N: usize, E>(
        &self,
        keys_now: impl Fn() -> Result<[String; N], E>,
    ) -> Result<([String; N], WriteGuard<'_>), E> {
        hold_as_computed(keys_now, |keys| self.write_these(keys)).await
    }

    /// Holds the prefixes `prefixes_now` gives for a directory move, once no write under
    /// them and no earlier overlapping move runs; new writes under them wait from the moment
    /// this is called. Computed again once held, like [`Self::write`]'s keys.
    pub async fn moving<const N: usize, E>(
        &self,
        prefixes_now: impl Fn() -> Result<[String; N], E>,
    ) -> Result<([String; N], MoveGuard<'_>), E> {
        hold_as_computed(prefixes_now, |prefixes| self.move_these(prefixes)).await
    }

    async fn write_these(&self, keys: Vec<String>) -> WriteGuard<'_> {
        self.wait_for(|state| {
            if keys.iter().any(|k| state.covered(k)) {
                return false;
            }
            for k in &keys {
                *state.writing.entry(k.clone()).or_default() += 1;
            }
            true
        })
        .await;
        WriteGuard { locks: self, keys }
    }

    async fn move_these(&self, prefixes: Vec<String>) -> MoveGuard<'_> {
        let guard = {
            let mut state = self.state.lock().unwrap();
            let id = state.next_move;
            state.next_move += 1;
            state.moves.push(Move { id, prefixes });
            // Dropped while waiting (the request was abandoned): the entry goes with it.
            MoveGuard { locks: self, id }
        };
        self.wait_for(|state| state.may_move(guard.id)).await;
        guard
    }

    /// Waits until `take` succeeds on the state (it is tried again after each release).
    async fn wait_for(&self, mut take: impl FnMut(&mut State) -> bool) {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the state is looked at, so a release in between wakes it.
            released.as_mut().enable();
            if take(&mut self.state.lock().unwrap()) {
                return;
            }
            released.await;
        }
    }

    /// How many keys are held for writing and how many moves run or wait (for tests).
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap();
        (state.writing.len(), state.moves.len())
    }
}

/// Holds, with `lock`, the keys `keys_now` gives; computes them again once held, and starts
/// over if they changed meanwhile.
async fn hold_as_computed<const N: usize, E, G, F>(
    keys_now: impl Fn() -> Result<[String; N], E>,
    lock: impl Fn(Vec<String>) -> F,
) -> Result<([String; N], G), E>
where
    F: std::future::Future<Output = G>,
{
    loop {
        let keys = keys_now()?;
        let guard = lock(keys.to_vec()).await;
        if keys_now()? == keys {
            return Ok((keys, guard));
        }
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        {
            let mut state = self.locks.state.lock().unwrap();
            for k in &self.keys {
                if let Some(n) = state.writing.get_mut(k) {
                    *n -= 1;
                    if *n == 0 {
                        state.writing.remove(k);
                    }
                }
            }
        }
        self.locks.released.notify_waiters();
    }
}

impl Drop for MoveGuard<'_> {
    fn drop(&mut self) {
        self.locks
            .state
            .lock()
            .unwrap()
            .moves
            .retain(|m| m.id != self.id);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    async fn write<'a>(locks: &'a KeyLocks, key: &str) -> WriteGuard<'a> {
        locks.write_these(vec![key.to_string()]).await
    }

    async fn moving<'a>(locks: &'a KeyLocks, prefix: &str) -> MoveGuard<'a> {
        locks.move_these(vec![prefix.to_string()]).await
    }

    /// Whether `fut` is still pending after the others had time to run.
    async fn pending<F: std::future::Future>(fut: &mut std::pin::Pin<Box<F>>) -> bool {
        tokio::time::timeout(Duration::from_millis(20), fut.as_mut())
            .await
            .is_err()
    }

    #[tokio::test]
    async fn a_move_waits_only_for_writes_under_its_prefixes() {
        let locks = Arc::new(KeyLocks::default());
        let inside = write(&locks, "a/b/f").await;
        let outside = write(&locks, "a/c").await;
        let mut mv = Box::pin(locks.move_these(vec!["a/b/".to_string(), "x/".to_string()]));
        assert!(pending(&mut mv).await);
        drop(outside);
        assert!(
            pending(&mut mv).await,
            "a write elsewhere ended: still waiting"
        );
        drop(inside);
        let held = mv.await;
        assert_eq!(locks.held(), (0, 1));
        drop(held);
        assert_eq!(locks.held(), (0, 0));
    }

    #[tokio::test]
    async fn writes_under_a_waiting_or_running_move_wait_and_others_do_not() {
        let locks = Arc::new(KeyLocks::default());
        let inside = write(&locks, "a/b/f").await;
        let mut mv = Box::pin(moving(&locks, "a/b/"));
        assert!(pending(&mut mv).await);
        // The move waits: a new write under it waits too, one elsewhere goes ahead.
        let mut late = Box::pin(write(&locks, "a/b/g"));
        assert!(pending(&mut late).await);
        let elsewhere = tokio::time::timeout(Duration::from_secs(1), write(&locks, "a/bc")).await;
        assert!(elsewhere.is_ok(), "a key outside the prefix must not wait");
        drop(elsewhere);
        drop(inside);
        let running = mv.await;
        assert!(
            pending(&mut late).await,
            "the move runs: writes under it wait"
        );
        drop(running);
        late.await;
    }

    #[tokio::test]
    async fn a_write_that_waited_for_a_move_takes_the_keys_the_move_left() {
        let locks = KeyLocks::default();
        let key = Arc::new(Mutex::new("a/b/f".to_string()));
        let running = moving(&locks, "a/b/").await;
        let now = key.clone();
        let mut waiting = Box::pin(locks.write(move || Ok::<_, ()>([now.lock().unwrap().clone()])));
        assert!(pending(&mut waiting).await);
        // The move renames the entry, then ends.
        *key.lock().unwrap() = "x/b/f".to_string();
        drop(running);
        let (keys, _held) = waiting.await.unwrap();
        assert_eq!(keys, ["x/b/f"]);
        assert_eq!(locks.held(), (1, 0));
    }

    #[tokio::test]
    async fn overlapping_moves_go_in_order_and_an_abandoned_one_frees_its_prefixes() {
        let locks = Arc::new(KeyLocks::default());
        let first = moving(&locks, "a/b/").await;
        let mut nested = Box::pin(moving(&locks, "a/b/c/"));
        let mut outer = Box::pin(moving(&locks, "a/"));
        assert!(pending(&mut nested).await && pending(&mut outer).await);
        let unrelated = tokio::time::timeout(Duration::from_secs(1), moving(&locks, "z/")).await;
        assert!(unrelated.is_ok(), "a move elsewhere must not wait");
        drop(unrelated);
        drop(first);
        let second = nested.await;
        assert!(pending(&mut outer).await);
        drop(second);
        let third = outer.await;
        // A waiting move that is given up leaves no trace.
        let mut given_up = Box::pin(moving(&locks, "a/"));
        assert!(pending(&mut given_up).await);
        drop(given_up);
        drop(third);
        assert_eq!(locks.held(), (0, 0));
        tokio::time::timeout(Duration::from_secs(1), write(&locks, "a/x"))
            .await
            .expect("nothing covers a/x any more");
    }
}
