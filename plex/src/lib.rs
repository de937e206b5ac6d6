//! Disks, disk labels, plexes and mirrored aggregates: the storage side of SyncMirror
//! (DESIGN §6).
//!
//! This crate is filled by the plex issue. It will hold the `BlockDevice` trait with its
//! io_uring, pread/pwrite and fault-injecting in-memory implementations, the two-copy disk
//! label, plexes, the mirrored aggregate with its persistent dirty bitmap, and resync whose
//! direction follows the plex generations only (S4, S5). It knows nothing of `nvlog`,
//! `proto` or the daemons.
