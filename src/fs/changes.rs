//! Keys this mount is changing, so that listings running at the same time leave them alone.
//!
//! A listing is answered by the server at some moment between its start and its end; a
//! change this mount makes (a PUT, a DELETE, a copy, then the row that records it) may land
//! on either side of that moment. If the listing saw the bucket before the change and the
//! table after it, applying the listing would undo the change: a deleted file would come
//! back, a new directory would be inserted twice, and the directory's clock would move for a
//! change that came from this mount. So every change to the bucket is registered here from
//! before its first request until after its row is written ([`LocalChanges::begin`]), and a
//! listing or probe that started before a change ended treats the names it touched as the
//! mount's own ([`LocalChanges::busy`]); the next listing, which starts after, sees them.
//!
//! Entries are dropped once no listing in flight started before they ended, so the map holds
//! only the changes of the last moments. "Before" is counted in events under one lock, not
//! read off the wall clock, which may step back.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::meta::{Busy, now_ns};

/// The changes in progress or recently finished, and the listings that may overlap them.
#[derive(Debug, Default)]
pub(super) struct LocalChanges {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Counts the starts and ends of changes and reads: their order.
    events: u64,
    /// By key: an object (`a/b`, a marker `a/b/`) or, for a subtree, its prefix.
    keys: BTreeMap<String, Activity>,
    /// Listings and probes in flight, by the event that started them.
    reads: BTreeMap<u64, usize>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Activity {
    /// Changes of this key running now.
    running: usize,
    /// Whether one of them moves everything under the key (a directory rename).
    subtree: bool,
    /// The event that ended the last one.
    ended: u64,
}

impl Activity {
    fn overlaps(&self, read: u64) -> bool {
        self.running > 0 || self.ended > read
    }
}

/// A change in progress; it ends when dropped.
#[derive(Debug)]
pub(super) struct ChangeGuard {
    inner: Arc<Mutex<Inner>>,
    key: String,
}

/// A listing or probe in flight, started at [`ReadGuard::started`].
#[derive(Debug)]
pub(super) struct ReadGuard {
    inner: Arc<Mutex<Inner>>,
    event: u64,
    started: i64,
}

impl ReadGuard {
    /// When the read started (ns since the epoch): rows changed later are newer than it.
    pub fn started(&self) -> i64 {
        self.started
    }
}

impl LocalChanges {
    /// Registers a change of the object `key` (a file, or a directory's marker `dir/`).
    pub fn begin(&self, key: &str) -> ChangeGuard {
        self.register(key, false)
    }

    /// Registers a change of everything under `prefix` (which ends with `/`): a directory
    /// moving.
    pub fn begin_subtree(&self, prefix: &str) -> ChangeGuard {
        self.register(prefix, true)
    }

    fn register(&self, key: &str, subtree: bool) -> ChangeGuard {
        let mut inner = self.inner.lock().unwrap();
        inner.events += 1;
        let a = inner.keys.entry(key.to_string()).or_default();
        a.running += 1;
        a.subtree |= subtree;
        ChangeGuard {
            inner: self.inner.clone(),
            key: key.to_string(),
        }
    }

    /// Registers a listing or probe starting now.
    pub fn start_read(&self) -> ReadGuard {
        let mut inner = self.inner.lock().unwrap();
        inner.events += 1;
        let event = inner.events;
        *inner.reads.entry(event).or_default() += 1;
        ReadGuard {
            inner: self.inner.clone(),
            event,
            started: now_ns(),
        }
    }

    /// What `read` of the directory with key prefix `prefix` (`""` for the bucket's root)
    /// must leave alone: entries with a change that overlapped it, and everything if the
    /// directory or one above it was moving.
    pub fn busy(&self, prefix: &str, read: &ReadGuard) -> Busy {
        let started = read.event;
        let inner = self.inner.lock().unwrap();
        let moving_above = prefix
            .match_indices('/')
            .map(|(i, _)| &prefix[..=i])
            .filter_map(|p| inner.keys.get(p))
            .any(|a| a.subtree && a.overlaps(started));
        if moving_above {
            return Busy::All;
        }
        let mut names = HashSet::new();
        let mut marker = false;
        for (key, a) in inner.keys.range(prefix.to_string()..) {
            let Some(rest) = key.strip_prefix(prefix) else {
                break;
            };
            if !a.overlaps(started) {
                continue;
            }
            match rest.split('/').next() {
                Some("") | None => marker = true,
                Some(name) => {
                    names.insert(name.to_string());
                }
            }
        }
        if names.is_empty() && !marker {
            Busy::Nothing
        } else {
            Busy::Names { names, marker }
        }
    }
}

impl Inner {
    /// Drops finished changes that no read in flight could have overlapped.
    fn prune(&mut self) {
        let oldest = self.reads.keys().next().copied();
        self.keys
            .retain(|_, a| a.running > 0 || oldest.is_some_and(|s| a.ended > s));
    }
}

impl Drop for ChangeGuard {
    fn drop(&mut self) {
        let mut inner = self.inner.lock().unwrap();
        inner.events += 1;
        let event = inner.events;
        if let Some(a) = inner.keys.get_mut(&self.key) {
            a.running -= 1;
            a.ended = event;
        }
        inner.prune();
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(n) = inner.reads.get_mut(&self.event) {
            *n -= 1;
            if *n == 0 {
                inner.reads.remove(&self.event);
            }
        }
        inner.prune();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(busy: Busy) -> Vec<String> {
        match busy {
            Busy::Names { names, .. } => {
                let mut v: Vec<_> = names.into_iter().collect();
                v.sort();
                v
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_change_overlapping_a_read_makes_its_name_busy() {
        let c = LocalChanges::default();
        let read = c.start_read();
        assert_eq!(c.busy("d/", &read), Busy::Nothing);
        let file = c.begin("d/f");
        let deep = c.begin("d/sub/x");
        assert_eq!(names(c.busy("d/", &read)), ["f", "sub"]);
        drop(file);
        drop(deep);
        assert_eq!(
            names(c.busy("d/", &read)),
            ["f", "sub"],
            "ended after the read started"
        );
        drop(read);
        let later = c.start_read();
        assert_eq!(c.busy("d/", &later), Busy::Nothing);
        assert!(c.inner.lock().unwrap().keys.is_empty(), "pruned");
    }

    #[test]
    fn a_moving_directory_makes_reads_inside_it_unreliable() {
        let c = LocalChanges::default();
        let read = c.start_read();
        let mv = c.begin_subtree("a/b/");
        assert_eq!(c.busy("a/b/c/", &read), Busy::All);
        assert_eq!(c.busy("a/b/", &read), Busy::All);
        assert_eq!(names(c.busy("a/", &read)), ["b"]);
        assert_eq!(c.busy("x/", &read), Busy::Nothing);
        drop(mv);
        let marker = c.begin("x/");
        match c.busy("x/", &read) {
            Busy::Names { names, marker } => assert!(names.is_empty() && marker),
            other => panic!("{other:?}"),
        }
        drop(marker);
    }

    #[test]
    fn the_root_of_an_unprefixed_bucket_sees_every_top_level_change() {
        let c = LocalChanges::default();
        let read = c.start_read();
        let _g = c.begin("top");
        assert_eq!(names(c.busy("", &read)), ["top"]);
    }
}
