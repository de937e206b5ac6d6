//! The io_uring device latches after a real failed write (S10). A test binary of its own: it
//! lowers the process's file size limit, which would break other tests running beside it.
#![allow(clippy::unwrap_used)]

use plex::testing::pattern;
use plex::uring::{DirectIo, UringDevice, UringOptions};
use plex::{BLOCK_BYTES, BlockDevice, DeviceError};

const SIZE: u64 = 64 * BLOCK_BYTES;

/// Sets the soft file size limit of this process, with SIGXFSZ ignored so that a write past it
/// fails with EFBIG instead of killing the process.
fn limit_file_size(bytes: u64) {
    // SAFETY: SIG_IGN is a valid disposition for SIGXFSZ; no handler code runs.
    let previous = unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    assert_ne!(previous, libc::SIG_ERR);
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of the call.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit) }, 0);
    limit.rlim_cur = bytes.min(limit.rlim_max);
    // SAFETY: `limit` is a valid rlimit for the duration of the call.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) }, 0);
}

/// A write the kernel fails (EFBIG past the file size limit) latches the device: later writes and
/// flushes are refused until it is reopened, reads still work, and the error names the write.
#[tokio::test]
async fn a_failed_write_latches_the_uring_device_until_reopened() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for direct in [DirectIo::Never, DirectIo::Auto] {
        let path = dir.path().join(format!("{direct:?}"));
        let options = UringOptions { entries: 4, direct };
        let device = UringDevice::create_with(&path, SIZE, options).unwrap();
        device.write(0, pattern(1, 1)).await.0.unwrap();
        limit_file_size(SIZE / 2);

        let (result, back) = device.write(SIZE - BLOCK_BYTES, pattern(2, 1)).await;
        match result {
            Err(DeviceError::Io { op: "write", offset, source }) => {
                assert_eq!(offset, SIZE - BLOCK_BYTES);
                assert_eq!(source.raw_os_error(), Some(libc::EFBIG), "{source}");
            }
            other => panic!("{direct:?}: a write past the file size limit gave {other:?}"),
        }
        assert_eq!(back, pattern(2, 1), "the buffer of a failed write comes back");
        // Below the limit the write would succeed, but the device is latched (S10).
        let (result, _) = device.write(0, pattern(3, 1)).await;
        assert!(matches!(result, Err(DeviceError::Failed)), "{direct:?}: {result:?}");
        assert!(matches!(device.flush().await, Err(DeviceError::Failed)));
        let (result, buf) = device.read(0, plex::AlignedBuf::zeroed(4096)).await;
        result.unwrap();
        assert_eq!(buf, pattern(1, 1), "the refused write landed");

        limit_file_size(u64::MAX);
        drop(device);
        let device = UringDevice::open_with(&path, options).unwrap();
        device.write(0, pattern(3, 1)).await.0.unwrap();
        device.flush().await.unwrap();
    }
}
