//! The io_uring block device (DESIGN §6.2): the production path.
//!
//! One ring per device, driven by a dedicated OS thread (`plex-uring`). Callers hand requests to
//! that thread over a channel and wake it through an eventfd on which the ring itself always has a
//! read pending, so the thread blocks only in `io_uring_enter` and a new request is submitted at
//! once even while others are in flight. The thread moves every queued request into the
//! submission queue, submits them with one `io_uring_enter`, and answers each caller through a
//! oneshot channel when its completion arrives.
//!
//! Invariants:
//! - the ring thread owns every request's buffer from the moment the request is handed over until
//!   its last completion has been reaped; a caller that drops its future only drops the receiving
//!   end of the answer, so the kernel never reads or writes memory that has been freed. If the
//!   ring itself breaks, the buffers the kernel may still hold are leaked, never freed;
//! - at most as many requests as the ring has submission entries (`entries`, which the kernel
//!   rounds up to a power of two) are in the kernel at once, plus the eventfd read; the rest wait
//!   in the thread's queue, in arrival order. The completion queue (twice as large) therefore
//!   never overflows;
//! - a short read or write is resubmitted for its remainder; a read or write that makes no
//!   progress (end of file) is an error, not a loop;
//! - after a failed write or flush the device refuses writes and flushes with
//!   `DeviceError::Failed` until it is reopened (S10); a failed flush is never retried, and
//!   writes still queued behind the failure are refused too;
//! - a flush is `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`: it covers the writes that had
//!   completed when it was issued, which is all the `BlockDevice` contract promises;
//! - bad input (misaligned, outside the device) is refused before anything reaches the thread,
//!   and the buffer comes back;
//! - dropping the device lets the requests in flight complete, then stops and joins the thread.
//!
//! O_DIRECT is used where the file system allows it (`DirectIo::Auto`); on one that refuses it
//! with EINVAL at open (tmpfs on older kernels; 6.18 accepts it) the device falls back to
//! buffered I/O and `direct()` says so.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};
use tokio::sync::oneshot;

use crate::buf::AlignedBuf;
use crate::device::{BLOCK_BYTES, BlockDevice, DeviceError, IoFuture, check_range};

/// The `user_data` of the eventfd read; request slots use their index.
const WAKE_USER_DATA: u64 = u64::MAX;
/// The largest single read or write handed to the kernel; longer buffers go in pieces, as the
/// remainder of a short transfer does.
const MAX_CHUNK_BYTES: u32 = 1 << 30;
/// How often a read or write that the kernel answers with EAGAIN or EINTR is submitted again
/// before it becomes an error. (A flush is never submitted again.)
const MAX_RETRIES: u32 = 16;
/// How long the thread pauses when `io_uring_enter` says EAGAIN with nothing to reap.
const BUSY_PAUSE: Duration = Duration::from_micros(50);
/// The kernel's limit on submission queue entries.
const MAX_ENTRIES: u32 = 32768;

/// Whether the device bypasses the page cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirectIo {
    /// O_DIRECT if the file system accepts it at open, buffered otherwise.
    #[default]
    Auto,
    /// O_DIRECT or fail to open.
    Always,
    /// Buffered I/O through the page cache.
    Never,
}

/// How to open a `UringDevice`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UringOptions {
    /// Submission queue entries, and so the most requests in the kernel at once (2..=32768; the
    /// kernel rounds it up to a power of two). Further requests wait in the ring thread.
    pub entries: u32,
    /// O_DIRECT or not.
    pub direct: DirectIo,
}

impl Default for UringOptions {
    fn default() -> UringOptions {
        UringOptions { entries: 128, direct: DirectIo::Auto }
    }
}

/// A file or block device used through io_uring (DESIGN §6.2).
pub struct UringDevice {
    size: u64,
    path: PathBuf,
    direct: bool,
    entries: u32,
    failed: Arc<AtomicBool>,
    sender: mpsc::Sender<Message>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for UringDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringDevice")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("direct", &self.direct)
            .field("entries", &self.entries)
            .field("failed", &self.failed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl UringDevice {
    /// Creates a new sparse file of `size_bytes` (a non-zero multiple of 4 KiB) and opens it with
    /// the default options; fails if the file exists.
    pub fn create(path: &Path, size_bytes: u64) -> io::Result<UringDevice> {
        UringDevice::create_with(path, size_bytes, UringOptions::default())
    }

    /// As `create`, with `options`.
    pub fn create_with(path: &Path, size_bytes: u64, options: UringOptions) -> io::Result<UringDevice> {
        crate::file::create_sparse(path, size_bytes)?;
        UringDevice::open_with(path, options)
    }

    /// Opens an existing file or block device with the default options; its size must be a
    /// non-zero multiple of 4 KiB.
    pub fn open(path: &Path) -> io::Result<UringDevice> {
        UringDevice::open_with(path, UringOptions::default())
    }

    /// Opens an existing file or block device with `options`. Fails, rather than falling back to
    /// another engine, if the kernel refuses to set up the ring.
    pub fn open_with(path: &Path, options: UringOptions) -> io::Result<UringDevice> {
        if !(2..=MAX_ENTRIES).contains(&options.entries) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("entries must be in 2..={MAX_ENTRIES}, got {}", options.entries),
            ));
        }
        let (mut file, direct) = open_file(path, options.direct)?;
        // `seek` rather than `metadata`: it gives the size of a block device too.
        let size = file.seek(SeekFrom::End(0))?;
        if size == 0 || !size.is_multiple_of(BLOCK_BYTES) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is {size} bytes, not a non-zero multiple of 4 KiB", path.display()),
            ));
        }
        let waker = Arc::new(Waker::new()?);
        let failed = Arc::new(AtomicBool::new(false));
        let (sender, receiver) = mpsc::channel();
        let (ready_sender, ready) = mpsc::sync_channel(1);
        let thread = {
            let (waker, failed) = (Arc::clone(&waker), Arc::clone(&failed));
            let entries = options.entries;
            thread::Builder::new().name("plex-uring".into()).spawn(move || {
                // The ring is built on the thread that submits to it.
                match Ring::new(file, entries, receiver, waker, failed) {
                    Ok(ring) => {
                        if ready_sender.send(Ok(())).is_ok() {
                            ring.run();
                        }
                    }
                    Err(e) => {
                        // The opener is waiting for this answer; if it is gone there is no one to
                        // tell.
                        let _ = ready_sender.send(Err(e));
                    }
                }
            })?
        };
        let setup =
            ready.recv().unwrap_or_else(|_| Err(io::Error::other("the io_uring thread died at setup")));
        if let Err(e) = setup {
            // The thread has returned (or is returning) after sending the error.
            let _ = thread.join();
            return Err(io::Error::new(e.kind(), format!("set up io_uring for {}: {e}", path.display())));
        }
        Ok(UringDevice {
            size,
            path: path.to_path_buf(),
            direct,
            entries: options.entries,
            failed,
            sender,
            waker,
            thread: Some(thread),
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file was opened with O_DIRECT (false: buffered, through the page cache).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The most requests in the kernel at once, as asked for at open.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Hands `request` to the ring thread; gives it back if the thread has stopped.
    fn send(&self, request: Request) -> Result<(), Request> {
        match self.sender.send(Message::Io(request)) {
            Ok(()) => {
                self.waker.wake();
                Ok(())
            }
            Err(mpsc::SendError(message)) => match message {
                Message::Io(request) => Err(request),
                // Not what was sent; there is nothing to give back.
                Message::Shutdown => Ok(()),
            },
        }
    }

    /// Sends a read or write and waits for its answer.
    async fn io(&self, op: Op, offset: u64, buf: AlignedBuf) -> (Result<(), DeviceError>, AlignedBuf) {
        let len = buf.len();
        let (reply, answer) = oneshot::channel();
        let request = Request { op, offset, buf, done: 0, retries: 0, reply: Reply::Data(reply) };
        if let Err(request) = self.send(request) {
            return (Err(thread_gone(op, offset)), request.buf);
        }
        match answer.await {
            Ok(result) => result,
            // The thread stopped with the request in the kernel and kept (leaked) its buffer.
            Err(_) => (Err(thread_gone(op, offset)), AlignedBuf::zeroed(len)),
        }
    }
}

impl Drop for UringDevice {
    fn drop(&mut self) {
        // The thread finishes what is queued and in flight, then returns. If it has already
        // stopped, the send fails and the join returns at once.
        let _ = self.sender.send(Message::Shutdown);
        self.waker.signal();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl BlockDevice for UringDevice {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        Box::pin(async move {
            if let Err(e) = check_range(offset, buf.len(), self.size) {
                return (Err(e), buf);
            }
            self.io(Op::Read, offset, buf).await
        })
    }

    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        Box::pin(async move {
            if self.failed.load(Ordering::Acquire) {
                return (Err(DeviceError::Failed), buf);
            }
            if let Err(e) = check_range(offset, buf.len(), self.size) {
                return (Err(e), buf);
            }
            self.io(Op::Write, offset, buf).await
        })
    }

    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            if self.failed.load(Ordering::Acquire) {
                return Err(DeviceError::Failed);
            }
            let (reply, answer) = oneshot::channel();
            let request = Request {
                op: Op::Flush,
                offset: 0,
                buf: AlignedBuf::zeroed(0),
                done: 0,
                retries: 0,
                reply: Reply::Flush(reply),
            };
            if self.send(request).is_err() {
                return Err(thread_gone(Op::Flush, 0));
            }
            answer.await.unwrap_or_else(|_| Err(thread_gone(Op::Flush, 0)))
        })
    }
}

/// Opens `path` read-write, with O_DIRECT as `direct` asks; returns whether O_DIRECT is on.
fn open_file(path: &Path, direct: DirectIo) -> io::Result<(File, bool)> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).custom_flags(libc::O_CLOEXEC);
    let mut with_direct = options.clone();
    with_direct.custom_flags(libc::O_CLOEXEC | libc::O_DIRECT);
    match direct {
        DirectIo::Never => Ok((options.open(path)?, false)),
        DirectIo::Always => Ok((with_direct.open(path)?, true)),
        DirectIo::Auto => match with_direct.open(path) {
            Ok(file) => Ok((file, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((options.open(path)?, false)),
            Err(e) => Err(e),
        },
    }
}

fn thread_gone(op: Op, offset: u64) -> DeviceError {
    DeviceError::Io { op: op.name(), offset, source: io::Error::other("the io_uring thread has stopped") }
}

/// Wakes the ring thread: an eventfd the ring always has a read pending on, and a flag that
/// spares the write when a wake-up is already on its way.
#[derive(Debug)]
struct Waker {
    eventfd: OwnedFd,
    /// Set by the first caller after the thread last drained its channel; cleared by the thread
    /// when the eventfd read completes, before it drains the channel again. While it is set, a
    /// wake-up is pending and later callers need not write.
    notified: AtomicBool,
}

impl Waker {
    fn new() -> io::Result<Waker> {
        // Blocking (no EFD_NONBLOCK): io_uring then waits for the counter with its internal poll
        // instead of completing the read with EAGAIN.
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Waker { eventfd, notified: AtomicBool::new(false) })
    }

    /// Wakes the thread unless a wake-up is already pending.
    fn wake(&self) {
        if !self.notified.swap(true, Ordering::AcqRel) {
            self.signal();
        }
    }

    /// Adds one to the eventfd counter, which completes the ring's pending read.
    fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        loop {
            // SAFETY: `one` is 8 readable bytes that live across the call; the descriptor is owned
            // by `self`.
            let written = unsafe { libc::write(self.eventfd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
            if written >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                // A blocking eventfd write fails only on a counter near u64::MAX, which one
                // increment per wake-up never reaches; nothing useful can be done about it here.
                return;
            }
        }
    }

    /// Called by the thread when the eventfd read completed, before draining the channel.
    fn woken(&self) {
        self.notified.store(false, Ordering::SeqCst);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
        }
    }
}

enum Reply {
    Data(oneshot::Sender<(Result<(), DeviceError>, AlignedBuf)>),
    Flush(oneshot::Sender<Result<(), DeviceError>>),
}

/// A request, from the caller's send until its answer.
struct Request {
    op: Op,
    offset: u64,
    /// Empty for a flush.
    buf: AlignedBuf,
    /// Bytes transferred so far (short transfers are resubmitted for the rest).
    done: usize,
    /// Submissions answered with EAGAIN or EINTR so far.
    retries: u32,
    reply: Reply,
}

impl Request {
    /// Answers the caller with `result` and the buffer. A caller that has gone away (dropped its
    /// future) no longer wants the answer; the buffer is then freed here, after its completion.
    fn finish(self, result: Result<(), DeviceError>) {
        match self.reply {
            Reply::Data(reply) => {
                let _ = reply.send((result, self.buf));
            }
            Reply::Flush(reply) => {
                let _ = reply.send(result);
            }
        }
    }

    /// Answers with an error, keeping (leaking) the buffer because the kernel may still use it.
    fn abandon(self, error: DeviceError) {
        let len = self.buf.len();
        std::mem::forget(self.buf);
        match self.reply {
            Reply::Data(reply) => {
                let _ = reply.send((Err(error), AlignedBuf::zeroed(len)));
            }
            Reply::Flush(reply) => {
                let _ = reply.send(Err(error));
            }
        }
    }

    /// The submission for the rest of this request (all of it for a flush).
    fn entry(&mut self, fd: types::Fd, user_data: u64) -> squeue::Entry {
        let offset = self.offset + self.done as u64;
        let entry = match self.op {
            Op::Read => {
                let rest = &mut self.buf.as_mut_slice()[self.done..];
                let len = u32::try_from(rest.len()).unwrap_or(MAX_CHUNK_BYTES).min(MAX_CHUNK_BYTES);
                opcode::Read::new(fd, rest.as_mut_ptr(), len).offset(offset).build()
            }
            Op::Write => {
                let rest = &self.buf.as_slice()[self.done..];
                let len = u32::try_from(rest.len()).unwrap_or(MAX_CHUNK_BYTES).min(MAX_CHUNK_BYTES);
                opcode::Write::new(fd, rest.as_ptr(), len).offset(offset).build()
            }
            Op::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
        };
        entry.user_data(user_data)
    }
}

enum Message {
    Io(Request),
    /// The device is being dropped: finish what is queued and in flight, then return.
    Shutdown,
}

/// Requests in the kernel, by slot; the slot index is the submission's `user_data`.
#[derive(Default)]
struct Slots {
    slots: Vec<Option<Request>>,
    free: Vec<usize>,
    len: usize,
}

impl Slots {
    fn insert(&mut self, request: Request) -> usize {
        self.len += 1;
        match self.free.pop() {
            Some(index) => {
                self.slots[index] = Some(request);
                index
            }
            None => {
                self.slots.push(Some(request));
                self.slots.len() - 1
            }
        }
    }

    fn get_mut(&mut self, index: usize) -> Option<&mut Request> {
        self.slots.get_mut(index).and_then(Option::as_mut)
    }

    fn remove(&mut self, index: usize) -> Option<Request> {
        let request = self.slots.get_mut(index).and_then(Option::take)?;
        self.len -= 1;
        self.free.push(index);
        Some(request)
    }

    fn drain(&mut self) -> impl Iterator<Item = Request> + '_ {
        self.len = 0;
        self.free.clear();
        self.slots.drain(..).flatten()
    }
}

/// The ring thread's state.
struct Ring {
    ring: IoUring,
    fd: types::Fd,
    /// Keeps the descriptor in `fd` open as long as the ring.
    _file: File,
    receiver: mpsc::Receiver<Message>,
    waker: Arc<Waker>,
    failed: Arc<AtomicBool>,
    /// Requests received but not yet in the kernel, in arrival order.
    queue: VecDeque<Request>,
    slots: Slots,
    /// The most requests in the kernel at once.
    capacity: usize,
    /// Where the pending eventfd read lands; boxed so that its address never moves.
    wake_buf: Box<u64>,
    wake_armed: bool,
    shutting_down: bool,
    completions: Vec<(u64, i32)>,
}

impl Ring {
    fn new(
        file: File,
        entries: u32,
        receiver: mpsc::Receiver<Message>,
        waker: Arc<Waker>,
        failed: Arc<AtomicBool>,
    ) -> io::Result<Ring> {
        let ring = IoUring::new(entries)?;
        let capacity = usize::try_from(ring.params().sq_entries()).unwrap_or(usize::MAX);
        // Requests in flight plus the eventfd read must fit the completion queue (the kernel makes
        // it twice the submission queue), so that no completion is ever held back.
        let completion_entries = usize::try_from(ring.params().cq_entries()).unwrap_or(usize::MAX);
        if completion_entries <= capacity {
            return Err(io::Error::other(format!(
                "the completion queue has {completion_entries} entries for {capacity} submissions"
            )));
        }
        Ok(Ring {
            fd: types::Fd(file.as_raw_fd()),
            ring,
            _file: file,
            receiver,
            waker,
            failed,
            queue: VecDeque::new(),
            slots: Slots::default(),
            capacity,
            wake_buf: Box::new(0),
            wake_armed: false,
            shutting_down: false,
            completions: Vec::new(),
        })
    }

    fn run(mut self) {
        let result = self.serve().and_then(|()| self.disarm());
        if let Err(error) = result {
            self.abandon(&error);
        }
    }

    /// Submits and completes requests until shut down with nothing left in flight.
    fn serve(&mut self) -> io::Result<()> {
        loop {
            self.receive();
            if self.shutting_down && self.queue.is_empty() && self.slots.len == 0 {
                return Ok(());
            }
            if !self.wake_armed && !self.shutting_down {
                self.arm_wake()?;
            }
            self.dispatch()?;
            self.submit_and_wait(1)?;
            self.reap()?;
        }
    }

    /// Moves everything the callers sent into the queue.
    fn receive(&mut self) {
        loop {
            match self.receiver.try_recv() {
                Ok(Message::Io(request)) => self.queue.push_back(request),
                Ok(Message::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => {
                    self.shutting_down = true;
                    return;
                }
                Err(mpsc::TryRecvError::Empty) => return,
            }
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let target: *mut u64 = &mut *self.wake_buf;
        let entry = opcode::Read::new(types::Fd(self.waker.eventfd.as_raw_fd()), target.cast(), 8)
            .build()
            .user_data(WAKE_USER_DATA);
        // SAFETY: `wake_buf` is a heap allocation owned by this `Ring`, which does not free or
        // replace it while the read is armed: `disarm` waits for the read's completion before the
        // ring is dropped, and `abandon` leaks the box if it cannot. The eventfd is owned by
        // `waker`, which this `Ring` keeps alive.
        unsafe { self.push(&entry)? };
        self.wake_armed = true;
        Ok(())
    }

    /// Puts queued requests into the kernel while there is room.
    fn dispatch(&mut self) -> io::Result<()> {
        while self.slots.len < self.capacity {
            let Some(request) = self.queue.pop_front() else { return Ok(()) };
            if request.op != Op::Read && self.failed.load(Ordering::Acquire) {
                // A write or flush queued behind a failure (S10).
                request.finish(Err(DeviceError::Failed));
                continue;
            }
            if request.op != Op::Flush && request.buf.is_empty() {
                request.finish(Ok(()));
                continue;
            }
            let index = self.slots.insert(request);
            self.submit_slot(index)?;
        }
        Ok(())
    }

    /// Queues the submission for (the rest of) the request in slot `index`.
    fn submit_slot(&mut self, index: usize) -> io::Result<()> {
        let fd = self.fd;
        let Some(request) = self.slots.get_mut(index) else { return Ok(()) };
        let entry = request.entry(fd, index as u64);
        // SAFETY: the entry points into the request's buffer, a heap allocation that moves with
        // the `AlignedBuf` but never changes address. The request stays in slot `index`, and the
        // buffer with it, until the completion with this `user_data` has been reaped (`reap`
        // removes it only then); if the ring breaks first, `abandon` leaks the buffer. The file
        // descriptor stays open as long as the ring (`_file`).
        unsafe { self.push(&entry) }
    }

    /// Pushes `entry`, submitting what is queued first if the submission queue is full.
    ///
    /// # Safety
    /// Whatever `entry` points to must stay valid until its completion has been reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller keeps the entry's memory valid until its completion.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.submit_and_wait(0)?;
        }
    }

    /// Submits everything queued and waits for `want` completions, riding out EINTR, EAGAIN and
    /// EBUSY. With `want == 0` (making room in a full submission queue) it returns only once the
    /// kernel has taken something.
    fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN | libc::EBUSY) => {
                        // The kernel is short of resources. If completions wait, reaping them is
                        // progress; otherwise wait a moment. (The completion queue never
                        // overflows: it has room for every request in flight, see `Ring::new`.)
                        if want > 0 && !self.ring.completion().is_empty() {
                            return Ok(());
                        }
                        thread::sleep(BUSY_PAUSE);
                    }
                    _ => return Err(e),
                },
            }
        }
    }

    /// Handles every completion in the completion queue.
    fn reap(&mut self) -> io::Result<()> {
        let mut completions = std::mem::take(&mut self.completions);
        completions.extend(self.ring.completion().map(|cqe| (cqe.user_data(), cqe.result())));
        let mut result = Ok(());
        for &(user_data, res) in &completions {
            result = if user_data == WAKE_USER_DATA {
                self.woken(res)
            } else {
                usize::try_from(user_data).map_or(Ok(()), |index| self.complete(index, res))
            };
            if result.is_err() {
                break;
            }
        }
        completions.clear();
        self.completions = completions;
        result
    }

    fn woken(&mut self, res: i32) -> io::Result<()> {
        self.wake_armed = false;
        self.waker.woken();
        if res < 0 && res != -libc::EINTR && res != -libc::EAGAIN && res != -libc::ECANCELED {
            return Err(io::Error::from_raw_os_error(-res));
        }
        Ok(())
    }

    /// Handles the completion of the request in slot `index` with result `res`.
    fn complete(&mut self, index: usize, res: i32) -> io::Result<()> {
        let Some(request) = self.slots.get_mut(index) else { return Ok(()) };
        let op = request.op;
        let error = if res < 0 {
            let retry = op != Op::Flush
                && (res == -libc::EAGAIN || res == -libc::EINTR)
                && request.retries < MAX_RETRIES;
            if retry {
                request.retries += 1;
                return self.submit_slot(index);
            }
            io::Error::from_raw_os_error(-res)
        } else if op == Op::Flush {
            return self.finish(index, Ok(()));
        } else if res == 0 {
            match op {
                Op::Read => io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the file"),
                _ => io::Error::new(io::ErrorKind::WriteZero, "the write made no progress"),
            }
        } else {
            request.done += usize::try_from(res).unwrap_or(0);
            if request.done < request.buf.len() {
                // A short transfer: submit the rest.
                return self.submit_slot(index);
            }
            return self.finish(index, Ok(()));
        };
        if op != Op::Read {
            // S10: refuse writes and flushes from now on, before anyone hears of the failure.
            self.failed.store(true, Ordering::Release);
        }
        let offset = request.offset;
        self.finish(index, Err(DeviceError::Io { op: op.name(), offset, source: error }))
    }

    fn finish(&mut self, index: usize, result: Result<(), DeviceError>) -> io::Result<()> {
        if let Some(request) = self.slots.remove(index) {
            request.finish(result);
        }
        Ok(())
    }

    /// Completes the pending eventfd read, so that its buffer can be freed with the ring.
    fn disarm(&mut self) -> io::Result<()> {
        while self.wake_armed {
            self.waker.signal();
            self.submit_and_wait(1)?;
            self.reap()?;
        }
        Ok(())
    }

    /// The ring failed: answers every request with an error and leaks whatever the kernel may
    /// still touch. The device refuses writes from now on, and later requests find the thread
    /// gone.
    fn abandon(&mut self, error: &io::Error) {
        self.failed.store(true, Ordering::Release);
        let lost = |op: Op, offset: u64| DeviceError::Io {
            op: op.name(),
            offset,
            source: io::Error::new(error.kind(), format!("the io_uring ring failed: {error}")),
        };
        for request in self.slots.drain() {
            let (op, offset) = (request.op, request.offset);
            request.abandon(lost(op, offset));
        }
        if self.wake_armed {
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
        }
        while let Ok(message) = self.receiver.try_recv() {
            if let Message::Io(request) = message {
                self.queue.push_back(request);
            }
        }
        for request in self.queue.drain(..) {
            let (op, offset) = (request.op, request.offset);
            request.finish(Err(lost(op, offset)));
        }
    }
}
