//! Local storage under the cache directory: the block cache of downloaded data
//! ([`blocks`]) and staging files of files being written ([`staging`]). Both work in blocks of
//! [`BLOCK_SIZE`], so a block fetched for a write can come from the cache and vice versa.

pub mod blocks;
pub mod staging;

pub use blocks::BLOCK_SIZE;

/// Bytes available to this user on the filesystem holding `dir` (statvfs).
pub fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail * st.f_frsize)
}
