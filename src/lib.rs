//! s3bridge: an S3 bucket as a POSIX directory.
//!
//! The layers, outermost first: [`fuse`] decodes kernel requests and runs them on tokio;
//! [`fs`] holds the filesystem semantics; [`meta`] keeps the inode table in SQLite;
//! [`cache`] keeps local data; [`store`] is the only code that speaks S3.

#![warn(missing_docs)]

pub mod blocking;
pub mod buffers;
pub mod cache;
pub mod config;
pub mod control;
pub mod fs;
pub mod fuse;
pub mod meta;
pub mod store;
