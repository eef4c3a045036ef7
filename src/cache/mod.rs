//! Local storage under the cache directory: the block cache of downloaded data
//! ([`blocks`]) and staging files of files being written ([`staging`]). Both work in blocks of
//! [`BLOCK_SIZE`], so a block fetched for a write can come from the cache and vice versa.

pub mod blocks;
pub mod staging;

pub use blocks::BLOCK_SIZE;
