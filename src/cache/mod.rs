//! Local storage under the cache directory: staging files of files being written.
//!
//! The persistent block cache of downloaded data (design.md §5) joins this module later;
//! reads go through `fs::read` meanwhile, which keeps the seam for it.

pub mod staging;
