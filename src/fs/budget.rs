//! The memory budget for data in flight, shared by every file of a mount.
//!
//! Read-ahead windows and upload parts are the only buffers whose size follows the data (up
//! to 64 MiB per reader, part size × concurrency per upload); everything else is small and
//! fixed. Both draw from one budget (`--max-buffer-memory`, in MiB units) so the daemon's
//! memory stays bounded however many files are open and however large they are.
//!
//! Uploads wait for their share: a part always finishes (or times out), so waiting cannot
//! deadlock. Read-ahead never waits: it is memory held for a reader who may not come back,
//! so a window that does not fit is shrunk or skipped and the reader fetches on demand.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const MIB: u64 = 1024 * 1024;

/// A budget of buffer memory.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    total_mib: u32,
}

impl MemoryBudget {
    /// A budget of `bytes` (rounded down to whole MiB).
    pub fn new(bytes: u64) -> Self {
        let total_mib = u32::try_from(bytes / MIB).unwrap_or(u32::MAX >> 4);
        MemoryBudget {
            permits: Arc::new(Semaphore::new(total_mib as usize)),
            total_mib,
        }
    }

    fn mib_of(&self, bytes: u64) -> u32 {
        // Clamped to the whole budget, so one buffer larger than the budget waits for all
        // of it rather than forever.
        u32::try_from(bytes.div_ceil(MIB))
            .unwrap_or(u32::MAX)
            .min(self.total_mib)
    }

    /// Waits until `bytes` fit, and holds them until the permit is dropped.
    pub async fn reserve(&self, bytes: u64) -> OwnedSemaphorePermit {
        self.permits
            .clone()
            .acquire_many_owned(self.mib_of(bytes))
            .await
            .expect("the budget's semaphore is never closed")
    }

    /// Holds as many whole `unit`s as fit now, up to `units` (halving the request until it
    /// fits); `None` when not even one fits.
    pub fn try_reserve_units(&self, units: u64, unit: u64) -> Option<(u64, OwnedSemaphorePermit)> {
        let mut want = units;
        while want > 0 {
            let mib = u32::try_from((want * unit).div_ceil(MIB)).unwrap_or(u32::MAX);
            if mib <= self.total_mib
                && let Ok(p) = self.permits.clone().try_acquire_many_owned(mib)
            {
                return Some((want, p));
            }
            want /= 2;
        }
        None
    }

    /// MiB not reserved now.
    pub fn available_mib(&self) -> usize {
        self.permits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_are_bounded_and_returned() {
        let b = MemoryBudget::new(10 * MIB);
        let big = b.reserve(64 * MIB).await;
        assert_eq!(b.available_mib(), 0, "clamped to the whole budget");
        assert!(b.try_reserve_units(1, MIB).is_none());
        drop(big);
        let (got, p) = b.try_reserve_units(16, MIB).unwrap();
        assert_eq!((got, b.available_mib()), (8, 2), "halved until it fit");
        drop(p);
        assert_eq!(b.available_mib(), 10);
        let zero = MemoryBudget::new(0);
        drop(zero.reserve(MIB).await);
        assert!(zero.try_reserve_units(1, MIB).is_none());
    }
}
