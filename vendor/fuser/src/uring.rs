//! FUSE over io_uring (Linux 6.14 and later; `fuse.enable_uring=1`).
//!
//! The kernel keeps one request queue per possible CPU and puts each request on the
//! queue of the CPU its caller runs on. We serve every queue from a thread pinned to
//! that CPU, so a caller that blocks on a request hands its CPU straight to the thread
//! that answers it, instead of waking a reader of `/dev/fuse` on whichever CPU it slept.
//!
//! Each queue thread owns an io_uring (128-byte SQEs) and a few ring entries. An entry
//! is a header buffer (`struct fuse_uring_req_header`) and a payload buffer, registered
//! with `FUSE_IO_URING_CMD_REGISTER`. The kernel completes that command when it puts a
//! request in the entry; we answer with `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`, which
//! hands the reply over and waits for the next request in one command. Only the queue
//! thread submits: io_uring cancels a command when the thread that submitted it exits,
//! so a reply made on another thread is handed to the queue thread (`replied`, and an
//! eventfd the queue thread polls).
//!
//! A request arrives split: its `fuse_in_header` and its opcode's fixed argument in the
//! header buffer, the rest (names, write data) in the payload. The payload buffer keeps
//! room in front of it, where we copy the two headers, so that the request lies in one
//! piece as `/dev/fuse` would deliver it, without copying the payload. A reply goes the
//! other way: its `fuse_out_header` into the header buffer, its body into the payload;
//! a reply made while its request's payload is still borrowed by the handler is staged
//! in a buffer of its own and copied in once the handler returns.
//!
//! Once INIT agrees on io_uring, the kernel holds every request until each queue has
//! registered an entry, and never moves a request to another queue: so the rings are
//! set up before INIT is answered (and INIT declines io_uring if that fails), and a
//! queue thread that fails aborts the connection rather than leave its CPU's callers
//! waiting forever. Forgets and interrupts still come through `/dev/fuse`.

use std::alloc::Layout;
use std::cell::Cell;
use std::fmt;
use std::io;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::error;
use log::warn;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::channel::ChannelSender;
use crate::dev_fuse::DevFuse;
use crate::ll::Operation;
use crate::reply::ReplyEmpty;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// The kernel's ABI (`include/uapi/linux/fuse.h`), as `repr(C)` structs whose sizes and
/// field offsets are checked at compile time against the kernel's; the code reads and
/// writes the kernel's buffers at the offsets derived from them.
#[repr(C)]
#[allow(dead_code)]
struct FuseUringEntInOut {
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// `struct fuse_uring_req_header`.
#[repr(C)]
#[allow(dead_code)]
struct FuseUringReqHeader {
    in_out: [u8; 128],
    op_in: [u8; 128],
    ring_ent_in_out: FuseUringEntInOut,
}

/// `struct fuse_uring_cmd_req`, the command data of an io_uring command.
#[repr(C)]
#[allow(dead_code)]
struct FuseUringCmdReq {
    flags: u64,
    commit_id: u64,
    qid: u16,
    padding: [u8; 6],
}

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<FuseUringEntInOut>() == 32);
    assert!(offset_of!(FuseUringEntInOut, commit_id) == 8);
    assert!(offset_of!(FuseUringEntInOut, payload_sz) == 16);
    assert!(size_of::<FuseUringReqHeader>() == 288);
    assert!(offset_of!(FuseUringReqHeader, op_in) == 128);
    assert!(offset_of!(FuseUringReqHeader, ring_ent_in_out) == 256);
    assert!(size_of::<FuseUringCmdReq>() == 24);
    assert!(offset_of!(FuseUringCmdReq, commit_id) == 8);
    assert!(offset_of!(FuseUringCmdReq, qid) == 16);
};

const HEADER_LEN: usize = std::mem::size_of::<FuseUringReqHeader>();
const OP_IN: usize = std::mem::offset_of!(FuseUringReqHeader, op_in);
const OP_IN_MAX: usize = 128;
/// `fuse_uring_ent_in_out.commit_id` and `.payload_sz` within the header.
const COMMIT_ID: usize = std::mem::offset_of!(FuseUringReqHeader, ring_ent_in_out)
    + std::mem::offset_of!(FuseUringEntInOut, commit_id);
const PAYLOAD_SZ: usize = std::mem::offset_of!(FuseUringReqHeader, ring_ent_in_out)
    + std::mem::offset_of!(FuseUringEntInOut, payload_sz);
/// `fuse_uring_cmd_req.commit_id` and `.qid` within the command data.
const CMD_COMMIT_ID: usize = std::mem::offset_of!(FuseUringCmdReq, commit_id);
const CMD_QID: usize = std::mem::offset_of!(FuseUringCmdReq, qid);
const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;
/// Where `unique` lies in both `fuse_in_header` and `fuse_out_header`.
const UNIQUE: usize = 8;
/// Room in front of the payload for the request's two headers.
const FRONT: usize = 256;

/// The user data of the eventfd poll that wakes a queue thread (to stop, or to commit
/// replies made on other threads).
const WAKE: u64 = u64::MAX;

thread_local! {
    /// The queue this thread serves (its address), 0 on other threads.
    static SERVING: Cell<usize> = const { Cell::new(0) };
}

/// Zeroed memory of a fixed size, aligned to 8, freed on drop. The kernel writes into
/// it through the pointer we register, so it is only ever reached through `ptr`.
struct Region {
    ptr: *mut u8,
    layout: Layout,
}

impl Region {
    fn new(len: usize) -> io::Result<Region> {
        let layout = Layout::from_size_align(len.max(8), 8).map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(Region { ptr, layout })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: allocated in `Region::new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// One ring entry. The kernel writes its buffers between our command and its
/// completion; we touch them only in between.
struct Entry {
    /// `HEADER_LEN` bytes.
    header: Region,
    /// `FRONT` bytes, then the payload.
    buf: Region,
    /// The two iovecs `FUSE_IO_URING_CMD_REGISTER` points at.
    iov: Box<[libc::iovec; 2]>,
    /// The command last sent for this entry, to send again if it was not taken.
    last: AtomicU32,
    /// A whole reply (out header and body) waiting to be copied in and committed by
    /// the queue thread.
    staged: Mutex<Option<Vec<u8>>>,
}

/// One queue: its ring, entries and the CPU it serves.
pub(crate) struct Queue {
    qid: u16,
    dev: Arc<DevFuse>,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    entries: Box<[Entry]>,
    payload_len: usize,
    /// Entry + 1 whose request the queue thread is dispatching while its payload is
    /// borrowed by the handler (0: none); a reply to it is staged.
    borrowed: AtomicUsize,
    /// Entries answered on other threads, for the queue thread to commit.
    replied: Mutex<Vec<usize>>,
    /// An eventfd (non-blocking) the queue thread polls: written to stop it or to hand
    /// it `replied`.
    wake_fd: libc::c_int,
    stopped: AtomicBool,
    /// Give the queue thread `SCHED_IDLE` (see `idle_policy`).
    idle: bool,
}

// SAFETY: the raw pointers of `entries` point into memory the queue owns; an entry's
// buffers are touched by one party at a time (the kernel while it holds the entry, the
// queue thread from the completion until the commit); other threads only stage.
unsafe impl Send for Queue {}
// SAFETY: as above; the submission and completion queues are used by the queue thread
// alone (`push` checks it).
unsafe impl Sync for Queue {}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue").field("qid", &self.qid).finish()
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // SAFETY: `wake_fd` is an eventfd this queue opened and still owns.
        unsafe { libc::close(self.wake_fd) };
    }
}

/// The reply side of one request that came through a ring entry.
#[derive(Clone, Debug)]
pub(crate) struct RingReply {
    queue: Arc<Queue>,
    entry: usize,
}

impl RingReply {
    pub(crate) fn dev(&self) -> &Arc<DevFuse> {
        &self.queue.dev
    }

    /// Answers the request: into the entry at once when the queue thread may write
    /// there, else staged for it. A reply that does not fit the entry is answered with
    /// EIO (and reported), so the caller never waits forever.
    pub(crate) fn send(&self, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let q = &self.queue;
        let i = self.entry;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let fits = total >= OUT_HEADER_LEN && total - OUT_HEADER_LEN <= q.payload_len;
        let on_thread = q.on_queue_thread();
        if on_thread && q.borrowed.load(Ordering::Relaxed) != i + 1 {
            if fits {
                // SAFETY: on the queue thread, between the completion that brought the
                // request and the commit below, with no borrow of the payload alive.
                unsafe { q.write_reply(i, bufs) };
            } else {
                q.write_error(i, libc::EIO);
            }
            q.commit(i)?;
        } else {
            let reply = if fits {
                let mut v = Vec::with_capacity(total);
                for b in bufs {
                    v.extend_from_slice(b);
                }
                v
            } else {
                error_reply(q.unique(i), libc::EIO)
            };
            *q.entries[i].staged.lock() = Some(reply);
            if !on_thread {
                q.replied.lock().push(i);
                q.wake()?;
            }
        }
        if fits {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "a reply of {total} bytes does not fit a ring entry; answered EIO"
            )))
        }
    }
}

/// A reply of `errno` alone to request `unique`.
fn error_reply(unique: u64, errno: i32) -> Vec<u8> {
    let mut h = Vec::with_capacity(OUT_HEADER_LEN);
    h.extend_from_slice(&(OUT_HEADER_LEN as u32).to_ne_bytes());
    h.extend_from_slice(&(-errno).to_ne_bytes());
    h.extend_from_slice(&unique.to_ne_bytes());
    h
}

/// `b`, which starts `at` bytes into a reply, cut where the out header ends.
fn split_at_header(at: usize, b: &[u8]) -> impl Iterator<Item = &[u8]> {
    let cut = OUT_HEADER_LEN.saturating_sub(at).min(b.len());
    let (h, rest) = b.split_at(cut);
    [h, rest].into_iter().filter(|c| !c.is_empty())
}

/// Reads `N` bytes at `p`.
///
/// # Safety
/// `p` must point at `N` readable bytes.
unsafe fn read<const N: usize>(p: *const u8) -> [u8; N] {
    let mut v = [0u8; N];
    // SAFETY: the caller names `N` readable bytes at `p`.
    unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), N) };
    v
}

impl Queue {
    fn new(
        qid: u16,
        dev: Arc<DevFuse>,
        depth: usize,
        payload_len: usize,
        idle: bool,
    ) -> io::Result<Self> {
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_cqsize(2 * depth as u32 + 2)
            .build(depth as u32 + 1)?;
        let mut entries = Vec::with_capacity(depth);
        for _ in 0..depth {
            let header = Region::new(HEADER_LEN)?;
            let buf = Region::new(FRONT + payload_len)?;
            let iov = Box::new([
                libc::iovec {
                    iov_base: header.ptr.cast(),
                    iov_len: HEADER_LEN,
                },
                libc::iovec {
                    // SAFETY: `buf` holds FRONT + payload_len bytes.
                    iov_base: unsafe { buf.ptr.add(FRONT) }.cast(),
                    iov_len: payload_len,
                },
            ]);
            entries.push(Entry {
                header,
                buf,
                iov,
                last: AtomicU32::new(CMD_REGISTER),
                staged: Mutex::new(None),
            });
        }
        // SAFETY: plain syscall.
        let wake_fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake_fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Queue {
            qid,
            dev,
            ring,
            entries: entries.into_boxed_slice(),
            payload_len,
            borrowed: AtomicUsize::new(0),
            replied: Mutex::new(Vec::new()),
            wake_fd,
            stopped: AtomicBool::new(false),
            idle,
        })
    }

    fn on_queue_thread(&self) -> bool {
        SERVING.with(|s| s.get() == self as *const Queue as usize)
    }

    /// The `unique` of the request in entry `i` (also where a written reply keeps it).
    fn unique(&self, i: usize) -> u64 {
        // SAFETY: the header holds HEADER_LEN bytes.
        u64::from_ne_bytes(unsafe { read::<8>(self.entries[i].header.ptr.add(UNIQUE)) })
    }

    /// Copies a reply (out header, then body) into entry `i`.
    ///
    /// # Safety
    /// On the queue thread, while the entry is ours (completed, not yet committed),
    /// with no reference into its payload alive; the reply must fit.
    unsafe fn write_reply(&self, i: usize, bufs: &[IoSlice<'_>]) {
        let e = &self.entries[i];
        let mut at = 0usize;
        for b in bufs {
            for chunk in split_at_header(at, b) {
                // SAFETY: the caller's contract; offsets stay within HEADER_LEN and
                // FRONT + payload_len because the reply fits.
                unsafe {
                    let dst = if at < OUT_HEADER_LEN {
                        e.header.ptr.add(at)
                    } else {
                        e.buf.ptr.add(FRONT + at - OUT_HEADER_LEN)
                    };
                    std::ptr::copy_nonoverlapping(chunk.as_ptr(), dst, chunk.len());
                }
                at += chunk.len();
            }
        }
        let payload = (at.saturating_sub(OUT_HEADER_LEN)) as u32;
        // SAFETY: within the header.
        unsafe {
            std::ptr::copy_nonoverlapping(
                payload.to_ne_bytes().as_ptr(),
                e.header.ptr.add(PAYLOAD_SZ),
                4,
            )
        };
    }

    /// Puts an `errno` reply in entry `i` (queue thread, entry ours).
    fn write_error(&self, i: usize, errno: i32) {
        let r = error_reply(self.unique(i), errno);
        // SAFETY: on the queue thread with the entry ours (the callers'); the error
        // reply has no body, so nothing is written into the payload.
        unsafe { self.write_reply(i, &[IoSlice::new(&r)]) };
    }

    /// Copies in and commits a reply staged for entry `i`, if there is one.
    fn commit_staged(&self, i: usize) -> io::Result<()> {
        let Some(reply) = self.entries[i].staged.lock().take() else {
            return Ok(());
        };
        // SAFETY: on the queue thread (every caller), with the entry ours: a staged
        // reply is committed once, by whoever takes it; and no handler runs.
        unsafe { self.write_reply(i, &[IoSlice::new(&reply)]) };
        self.commit(i)
    }

    /// A command for entry `i` of this queue.
    fn command(&self, i: usize, cmd_op: u32, commit_id: u64) -> squeue::Entry128 {
        self.entries[i].last.store(cmd_op, Ordering::Relaxed);
        // A `FuseUringCmdReq` (flags 0) at the front of the command data.
        let mut cmd = [0u8; 80];
        cmd[CMD_COMMIT_ID..CMD_COMMIT_ID + 8].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[CMD_QID..CMD_QID + 2].copy_from_slice(&self.qid.to_ne_bytes());
        let mut b = opcode::UringCmd80::new(types::Fd(self.dev.as_raw_fd()), cmd_op).cmd(cmd);
        if cmd_op == CMD_REGISTER {
            b = b.addr(Some(self.entries[i].iov.as_ptr() as u64));
        }
        let sqe = b.build().user_data(i as u64);
        if cmd_op != CMD_REGISTER {
            return sqe;
        }
        // The register command also names how many iovecs `addr` points at, in the SQE's
        // `len` field, which the builder does not set.
        // SAFETY: `Entry128` is `repr(C)` (io-uring's squeue.rs): a 64-byte
        // `io_uring_sqe`, whose `len` is the u32 at offset 24, then 64 bytes of command
        // data; the builder zeroed every byte it did not set, and any bit pattern is a
        // valid `Entry128`.
        unsafe {
            let mut raw: [u8; 128] = std::mem::transmute(sqe);
            raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
            std::mem::transmute::<[u8; 128], squeue::Entry128>(raw)
        }
    }

    /// Pushes `sqe` for the queue thread's next submit (it submits before it waits).
    fn push(&self, sqe: &squeue::Entry128) -> io::Result<()> {
        if !self.on_queue_thread() {
            return Err(io::Error::other("io_uring push off the queue thread"));
        }
        // SAFETY: only the queue thread (checked above) touches the submission queue.
        let mut sq = unsafe { self.ring.submission_shared() };
        // SAFETY: what the SQE points at (an entry's iovecs) lives as long as the queue.
        unsafe { sq.push(sqe) }.map_err(|_| io::Error::other("io_uring submission queue full"))
    }

    /// Hands the reply in entry `i` back and asks for the next request (queue thread).
    fn commit(&self, i: usize) -> io::Result<()> {
        // SAFETY: the header holds the commit id the kernel gave with the request.
        let id =
            u64::from_ne_bytes(unsafe { read::<8>(self.entries[i].header.ptr.add(COMMIT_ID)) });
        self.push(&self.command(i, CMD_COMMIT_AND_FETCH, id))
    }

    fn wake(&self) -> io::Result<()> {
        let one = 1u64;
        // SAFETY: writing 8 bytes to an eventfd we own.
        if unsafe { libc::write(self.wake_fd, (&one as *const u64).cast(), 8) } != 8 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Arms the poll that wakes the queue thread.
    fn arm_wake(&self) -> io::Result<()> {
        let poll = opcode::PollAdd::new(types::Fd(self.wake_fd), libc::POLLIN as u32)
            .build()
            .user_data(WAKE)
            .into();
        self.push(&poll)
    }

    /// On the queue thread, after a wake: empties the eventfd and commits the replies
    /// made on other threads.
    fn woken(&self) -> io::Result<()> {
        let mut n = 0u64;
        // SAFETY: reading 8 bytes from an eventfd we own into `n`; non-blocking, so an
        // empty counter only fails with EAGAIN.
        unsafe { libc::read(self.wake_fd, (&mut n as *mut u64).cast(), 8) };
        let replied = std::mem::take(&mut *self.replied.lock());
        for i in replied {
            self.commit_staged(i)?;
        }
        self.arm_wake()
    }

    /// Asks the queue thread to stop.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        if let Err(e) = self.wake() {
            error!("cannot stop io_uring queue {}: {e}", self.qid);
        }
    }
}

/// The rings of a session: one queue per possible CPU.
pub(crate) struct Rings {
    queues: Vec<Arc<Queue>>,
}

impl fmt::Debug for Rings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rings")
            .field("queues", &self.queues.len())
            .finish()
    }
}

/// Number of the kernel's queues: `num_possible_cpus()`, which may exceed the CPUs
/// present. The kernel uses the ring only once every queue has entries.
fn possible_cpus() -> usize {
    let from_sysfs = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| count_cpus(&s));
    from_sysfs.unwrap_or_else(|| {
        // SAFETY: plain libc call.
        let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
        usize::try_from(n).unwrap_or(1).max(1)
    })
}

/// How many CPUs a sysfs CPU list such as `0-3,8-11` or `0` names.
fn count_cpus(list: &str) -> Option<usize> {
    let mut n = 0;
    for part in list.trim().split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().ok()?.checked_sub(a.parse().ok()?)? + 1,
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

impl Rings {
    /// Sets up every queue, before INIT is answered: if this fails, INIT declines
    /// io_uring and everything goes through `/dev/fuse`.
    ///
    /// Each CPU's queue gets `depth` entries, spread over `threads` threads (each with
    /// a ring of its own). The kernel gives a request to whichever entry of the queue
    /// is free, so a request need not wait behind one that sleeps (on the disk, on an
    /// fsync) when another thread of its CPU is free.
    pub(crate) fn new(
        dev: &Arc<DevFuse>,
        depth: usize,
        threads: usize,
        payload_len: usize,
        idle: bool,
    ) -> io::Result<Self> {
        let threads = threads.clamp(1, depth.max(1));
        let per_thread = depth.div_ceil(threads);
        let mut queues = Vec::new();
        for q in 0..possible_cpus() {
            let qid = u16::try_from(q).map_err(|_| io::Error::other("too many CPUs"))?;
            for _ in 0..threads {
                queues.push(Arc::new(Queue::new(
                    qid,
                    dev.clone(),
                    per_thread,
                    payload_len,
                    idle,
                )?));
            }
        }
        Ok(Rings { queues })
    }

    /// Starts a thread per queue; each serves `make_loop`'s filesystem. A thread that
    /// fails aborts the connection of `mountpoint` (without one, it only logs). If a
    /// thread cannot be started, the ones started are stopped and joined.
    pub(crate) fn spawn<FS: Filesystem>(
        &self,
        make_loop: impl Fn(String) -> SessionEventLoop<FS>,
        mountpoint: Option<PathBuf>,
    ) -> io::Result<Vec<std::thread::JoinHandle<io::Result<()>>>> {
        let mut threads = Vec::new();
        for (n, q) in self.queues.iter().enumerate() {
            let first = self.queues.iter().position(|o| o.qid == q.qid).unwrap_or(n);
            let name = format!("fuser-ring-{}.{}", q.qid, n - first);
            let ev = make_loop(name.clone());
            let (q, mp) = (q.clone(), mountpoint.clone());
            let spawned = std::thread::Builder::new().name(name).spawn(move || {
                let res = serve(&q, &ev);
                if let Err(e) = &res {
                    error!("io_uring queue {} failed: {e}", q.qid);
                    // The kernel sends this CPU's requests to this queue alone: with it
                    // gone they would wait forever. Fail them instead.
                    match &mp {
                        Some(mp) => abort_connection(mp),
                        None => {
                            error!("no mountpoint known; requests from CPU {} will hang", q.qid)
                        }
                    }
                }
                res
            });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.stop();
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(threads)
    }

    pub(crate) fn stop(&self) {
        for q in &self.queues {
            q.stop();
        }
    }
}

/// Aborts the FUSE connection mounted on `mountpoint` (through
/// `/sys/fs/fuse/connections/N/abort`, found from `/proc/self/mountinfo`, so that no
/// request is made of the filesystem): its requests fail with ENOTCONN.
pub(crate) fn abort_connection(mountpoint: &Path) {
    match try_abort(mountpoint) {
        Ok(()) => error!("aborted the FUSE connection of {}", mountpoint.display()),
        Err(e) => error!(
            "cannot abort the FUSE connection of {}: {e}",
            mountpoint.display()
        ),
    }
}

fn try_abort(mountpoint: &Path) -> io::Result<()> {
    // Not canonicalize(): looking the mountpoint up may itself wait on the
    // filesystem.
    let want = if mountpoint.is_absolute() {
        mountpoint.to_path_buf()
    } else {
        std::env::current_dir()?.join(mountpoint)
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let line = info
        .lines()
        .rev()
        .find(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.len() > 4 && Path::new(&unescape(f[4])) == want
        })
        .ok_or_else(|| io::Error::other("not in /proc/self/mountinfo"))?;
    let dev = line.split(' ').nth(2).unwrap_or("");
    let (major, minor) = dev
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .ok_or_else(|| io::Error::other(format!("device {dev:?}")))?;
    let id = (major << 20) | minor;
    let abort = format!("{FUSECTL}/{id}/abort");
    if !Path::new(&abort).exists() {
        // fusectl is mounted by systemd, not by the kernel: without it (a
        // container, a minimal VM) there is no connection to abort.
        mount_fusectl()?;
    }
    std::fs::write(abort, "1")
}

const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Mounts the FUSE control filesystem on [`FUSECTL`] (needs CAP_SYS_ADMIN).
fn mount_fusectl() -> io::Result<()> {
    let fstype = c"fusectl";
    let target = std::ffi::CString::new(FUSECTL).map_err(io::Error::other)?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, and
    // fusectl takes no mount data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EBUSY) {
        return Ok(()); // mounted meanwhile
    }
    Err(io::Error::new(
        e.kind(),
        format!("mounting fusectl on {FUSECTL}: {e}"),
    ))
}

/// A mountinfo path field with its octal escapes (`\040` for a space) undone.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if b[i] == b'\\'
            && let Some(d) = octal
        {
            out.push(
                d.iter()
                    .fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')),
            );
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity get valid
    // pointers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            warn!(
                "cannot pin ring thread to CPU {cpu}: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// Puts the calling thread under `SCHED_IDLE`, keeping its disk I/O best-effort.
///
/// When the thread answers a request, the kernel wakes the caller; a CPU running only
/// idle-policy threads counts as idle, so the caller stays on this CPU (and preempts
/// us) instead of being sent to whichever other CPU is idle, which costs a cross-CPU
/// wake-up on every request and takes the next request to another queue. An idle-policy
/// thread still runs whenever its CPU has nothing else to do, which a caller waiting
/// for its reply mostly ensures; when other work keeps the CPU busy, requests wait for
/// it (snapfs's BENCHMARKS.md measures how much). Without an I/O priority of its own,
/// an idle-policy thread's disk I/O would be of the idle class, served only when the
/// disk has nothing else.
fn idle_policy() {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread with a valid parameter.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) } != 0 {
        warn!(
            "cannot give ring thread the idle policy: {}",
            io::Error::last_os_error()
        );
    }
    // ioprio_set(IOPRIO_WHO_PROCESS, this thread, IOPRIO_PRIO_VALUE(IOPRIO_CLASS_BE, 4))
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const BEST_EFFORT_4: libc::c_long = (2 << 13) | 4;
    // SAFETY: plain syscall on the calling thread.
    if unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, BEST_EFFORT_4) } != 0 {
        warn!(
            "cannot keep ring thread's I/O best-effort: {}",
            io::Error::last_os_error()
        );
    }
}

/// The queue thread: registers the entries, then answers requests until the
/// connection ends or the session stops it.
fn serve<FS: Filesystem>(q: &Arc<Queue>, ev: &SessionEventLoop<FS>) -> io::Result<()> {
    SERVING.with(|s| s.set(Arc::as_ptr(q) as usize));
    pin(q.qid as usize);
    if q.idle {
        idle_policy();
    }
    q.arm_wake()?;
    for i in 0..q.entries.len() {
        q.push(&q.command(i, CMD_REGISTER, 0))?;
    }
    let mut done = Vec::with_capacity(q.entries.len() + 1);
    loop {
        if q.stopped.load(Ordering::Acquire) {
            return Ok(());
        }
        match q.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        done.clear();
        // SAFETY: only this thread reads the completion queue.
        done.extend(unsafe { q.ring.completion_shared() }.map(|c| (c.user_data(), c.result())));
        for &(data, res) in &done {
            if data == WAKE {
                if q.stopped.load(Ordering::Acquire) {
                    return Ok(());
                }
                if res < 0 {
                    return Err(io::Error::other(format!(
                        "wake-up poll failed: {}",
                        io::Error::from_raw_os_error(-res)
                    )));
                }
                q.woken()?;
                continue;
            }
            let i = data as usize;
            if i >= q.entries.len() {
                return Err(io::Error::other(format!(
                    "completion for unknown entry {data}"
                )));
            }
            match res {
                0 => handle(q, i, ev)?,
                r if r == -libc::EINTR || r == -libc::EAGAIN => {
                    // Not taken: send it again.
                    warn!("ring {}: entry {i} command returned {r}; retrying", q.qid);
                    match q.entries[i].last.load(Ordering::Relaxed) {
                        CMD_REGISTER => q.push(&q.command(i, CMD_REGISTER, 0))?,
                        _ => q.commit(i)?,
                    }
                }
                r if [
                    libc::ENOTCONN,
                    libc::ECONNABORTED,
                    libc::ECANCELED,
                    libc::ENODEV,
                ]
                .contains(&-r) =>
                {
                    debug!("ring {}: connection closed", q.qid);
                    return Ok(());
                }
                r => {
                    return Err(io::Error::other(format!(
                        "entry {i}: {}",
                        io::Error::from_raw_os_error(-r)
                    )));
                }
            }
        }
    }
}

/// Puts the request in entry `i` back in one piece and dispatches it.
fn handle<FS: Filesystem>(q: &Arc<Queue>, i: usize, ev: &SessionEventLoop<FS>) -> io::Result<()> {
    let e = &q.entries[i];
    // SAFETY: the kernel has completed the entry's command: its buffers are ours until
    // we commit. Offsets are within the header (HEADER_LEN) and buffer (FRONT + payload).
    let (len, payload) = unsafe {
        (
            u32::from_ne_bytes(read::<4>(e.header.ptr)) as usize,
            u32::from_ne_bytes(read::<4>(e.header.ptr.add(PAYLOAD_SZ))) as usize,
        )
    };
    let op = len
        .checked_sub(IN_HEADER_LEN + payload)
        .filter(|&op| op <= OP_IN_MAX && payload <= q.payload_len);
    let Some(op) = op else {
        error!(
            "ring {}: malformed request (len {len}, payload {payload})",
            q.qid
        );
        q.write_error(i, libc::EIO);
        return q.commit(i);
    };
    let start = FRONT - IN_HEADER_LEN - op;
    // SAFETY: as above; `start + len` = FRONT + payload lies within the buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(e.header.ptr, e.buf.ptr.add(start), IN_HEADER_LEN);
        std::ptr::copy_nonoverlapping(
            e.header.ptr.add(OP_IN),
            e.buf.ptr.add(start + IN_HEADER_LEN),
            op,
        );
    }
    let mut aligned;
    let data: &[u8] = if start % 8 == 0 {
        // SAFETY: as above; replies to this entry are staged while `data` lives when
        // it covers the payload (`borrowed`), and otherwise never touch bytes before
        // FRONT, where `data` ends.
        unsafe { std::slice::from_raw_parts(e.buf.ptr.add(start), len) }
    } else {
        // Every fixed argument is a multiple of 8 bytes long; should one not be, the
        // request is copied to where fuser's parser can read it.
        aligned = vec![0u64; len.div_ceil(8)];
        let p = aligned.as_mut_ptr().cast::<u8>();
        // SAFETY: both ranges hold `len` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(e.buf.ptr.add(start), p, len);
            std::slice::from_raw_parts(p, len)
        }
    };
    let borrows_payload = payload > 0 && start % 8 == 0;
    q.borrowed
        .store(if borrows_payload { i + 1 } else { 0 }, Ordering::Relaxed);
    let sender = ChannelSender::Ring(RingReply {
        queue: q.clone(),
        entry: i,
    });
    let dispatched =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(
            || match RequestWithSender::new(sender, data) {
                Some(req) => {
                    if let Ok(Operation::Destroy(_)) = req.request.operation() {
                        req.reply::<ReplyEmpty>().ok();
                    } else {
                        req.dispatch(ev);
                    }
                    true
                }
                None => false,
            },
        ));
    q.borrowed.store(0, Ordering::Relaxed);
    match dispatched {
        Ok(true) => {}
        // fuser could not parse it: answer, or the caller waits forever.
        Ok(false) => *e.staged.lock() = Some(error_reply(q.unique(i), libc::EIO)),
        // The reply, dropped unanswered while unwinding, has answered EIO.
        Err(_) => error!("ring {}: a request handler panicked", q.qid),
    }
    q.commit_staged(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The path a failed queue takes: requests that wait on a connection nobody will
    /// answer (here one whose INIT is never read) fail with ENOTCONN once it is
    /// aborted, and fusectl is mounted first if it is not (and left mounted, as
    /// systemd would have it).
    #[test]
    fn abort_fails_the_requests_that_wait() {
        use std::mem::ManuallyDrop;
        use std::sync::mpsc;
        use std::time::Duration;

        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting needs root");
            return;
        }
        // Leaked if the test fails: removing a live mountpoint could hang.
        let tmp = ManuallyDrop::new(tempfile::tempdir().unwrap());
        // As mounted: Mount::new resolves symlinks (a TMPDIR through one).
        let mp = tmp.path().canonicalize().unwrap();
        let (dev, mount) = crate::mnt::Mount::new(&mp, &[], crate::SessionACL::default()).unwrap();
        let (tx, rx) = mpsc::channel();
        let p = mp.clone();
        std::thread::spawn(move || {
            let _ = tx.send(std::fs::metadata(&p).map(|_| ()));
        });
        let early = rx.recv_timeout(Duration::from_millis(300));
        let aborted = try_abort(&mp);
        let res = rx.recv_timeout(Duration::from_secs(10));
        // Detached, because a failed abort leaves the stat inside the mount; then
        // closing the last /dev/fuse file (the Mount holds one) aborts it.
        let c = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        drop(mount);
        drop(dev);
        assert!(early.is_err(), "stat answered before the abort: {early:?}");
        aborted.unwrap();
        let err = res
            .expect("stat still waiting 10 s after the abort")
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
        drop(ManuallyDrop::into_inner(tmp));
    }

    #[test]
    fn count_cpus_of_sysfs_lists() {
        assert_eq!(count_cpus("0\n"), Some(1));
        assert_eq!(count_cpus("0-1\n"), Some(2));
        assert_eq!(count_cpus("0-3,8-11"), Some(8));
        assert_eq!(count_cpus("0,2,5"), Some(3));
        assert_eq!(count_cpus(""), None);
        assert_eq!(count_cpus("3-1"), None);
    }

    #[test]
    fn reply_split_at_the_out_header() {
        let whole: Vec<&[u8]> = split_at_header(0, &[1u8; 20]).collect();
        assert_eq!(whole.iter().map(|c| c.len()).collect::<Vec<_>>(), [16, 4]);
        let tail: Vec<&[u8]> = split_at_header(10, &[1u8; 20]).collect();
        assert_eq!(tail.iter().map(|c| c.len()).collect::<Vec<_>>(), [6, 14]);
        let body: Vec<&[u8]> = split_at_header(16, &[1u8; 3]).collect();
        assert_eq!(body.iter().map(|c| c.len()).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn error_replies_carry_unique_and_negative_errno() {
        let r = error_reply(0x1122_3344_5566_7788, libc::EIO);
        assert_eq!(r.len(), OUT_HEADER_LEN);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 16);
        assert_eq!(i32::from_ne_bytes(r[4..8].try_into().unwrap()), -libc::EIO);
        assert_eq!(
            u64::from_ne_bytes(r[UNIQUE..16].try_into().unwrap()),
            0x1122_3344_5566_7788
        );
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/x\\134y"), "/x\\y");
    }
}
