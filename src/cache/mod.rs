//! Local storage under the cache directory: the block cache of downloaded data
//! ([`blocks`]) and staging files of files being written ([`staging`]). Both work in blocks of
//! [`BLOCK_SIZE`], so a block fetched for a write can come from the cache and vice versa.

pub mod blocks;
pub mod staging;

pub use blocks::BLOCK_SIZE;

/// Bytes available to this user on the filesystem holding `dir` (statvfs).
pub fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: an all-zero statvfs is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}
