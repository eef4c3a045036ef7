//! Per-directory async locks.
//!
//! Operations that change a directory's entries (create, unlink, rename, ...) serialize on the
//! directory, so two creates of one name cannot both succeed, while operations in different
//! directories — and all reads — run concurrently. Listings of one directory are coalesced on
//! a separate lock so a burst of `ls` costs one LIST. Entries are dropped when unused, so the
//! maps stay as small as the set of directories being worked on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

type Slots = Arc<Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>>;

/// Lock tables keyed by directory inode.
#[derive(Debug, Default)]
pub struct LockMap {
    entries: Slots,
    listings: Slots,
}

/// A held lock; dropping it releases the lock and frees the slot when nobody waits.
#[derive(Debug)]
pub struct DirGuard {
    slots: Slots,
    ino: u64,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        let guard = self.guard.take();
        let mut slots = self.slots.lock().unwrap();
        drop(guard);
        if let Some(slot) = slots.get(&self.ino)
            && Arc::strong_count(slot) == 1
        {
            slots.remove(&self.ino);
        }
    }
}

async fn acquire(slots: &Slots, ino: u64) -> DirGuard {
    let slot = slots.lock().unwrap().entry(ino).or_default().clone();
    let guard = slot.lock_owned().await;
    DirGuard {
        slots: slots.clone(),
        ino,
        guard: Some(guard),
    }
}

impl LockMap {
    /// Locks the entries of directory `ino`.
    pub async fn lock(&self, ino: u64) -> DirGuard {
        acquire(&self.entries, ino).await
    }

    /// Locks the entries of two directories (once if they are the same), in inode order so
    /// that two renames in opposite directions cannot deadlock.
    pub async fn lock_two(&self, a: u64, b: u64) -> (DirGuard, Option<DirGuard>) {
        if a == b {
            return (self.lock(a).await, None);
        }
        let (first, second) = (a.min(b), a.max(b));
        let g1 = self.lock(first).await;
        let g2 = self.lock(second).await;
        (g1, Some(g2))
    }

    /// Locks the listing of directory `ino`.
    pub async fn lock_listing(&self, ino: u64) -> DirGuard {
        acquire(&self.listings, ino).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_are_freed_when_released() {
        let locks = LockMap::default();
        {
            let _a = locks.lock(5).await;
            let _b = locks.lock_two(6, 7).await;
            assert_eq!(locks.entries.lock().unwrap().len(), 3);
        }
        assert!(locks.entries.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_held_lock_excludes_others() {
        let locks = Arc::new(LockMap::default());
        let g = locks.lock(1).await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(1).await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(g);
        waiter.await.unwrap();
    }
}
