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
//! hands the reply over and waits for the next request in one command.
//!
//! A request arrives split: its `fuse_in_header` and its opcode's fixed argument in the
//! header buffer, the rest (names, write data) in the payload. The payload buffer keeps
//! room in front of it, where we copy the two headers, so that the request lies in one
//! piece as `/dev/fuse` would deliver it, without copying the payload. A reply goes the
//! other way: its `fuse_out_header` into the header buffer, its body into the payload.
//!
//! Forgets and interrupts still come through `/dev/fuse`, as does everything before the
//! ring is ready (every queue registered); the ordinary session threads serve those.

use std::fmt;
use std::io;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU32;
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

/// `struct fuse_uring_req_header`: `in_out` (128 bytes), `op_in` (128), then
/// `struct fuse_uring_ent_in_out` (32).
const HEADER_LEN: usize = 288;
const OP_IN: usize = 128;
const OP_IN_MAX: usize = 128;
/// `fuse_uring_ent_in_out.commit_id` and `.payload_sz`.
const COMMIT_ID: usize = 256 + 8;
const PAYLOAD_SZ: usize = 256 + 16;
const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;
/// Room in front of the payload for the request's two headers.
const FRONT: usize = 256;

/// The user data of the eventfd poll that wakes a queue thread (to stop, or to commit
/// replies made on other threads).
const WAKE: u64 = u64::MAX;

/// One ring entry's buffers. The kernel writes them between our command and its
/// completion; we touch them only in between.
struct Entry {
    /// `HEADER_LEN` bytes.
    header: *mut u8,
    /// `FRONT` bytes, then the payload.
    buf: *mut u8,
    /// The two iovecs `FUSE_IO_URING_CMD_REGISTER` points at.
    iov: Box<[libc::iovec; 2]>,
    /// The command last sent for this entry, to send again if it was not taken.
    last: AtomicU32,
    /// Owners of the memory above (u64 for alignment).
    _mem: (Box<[u64]>, Box<[u64]>),
}

/// One queue: its ring, entries and the CPU it serves.
pub(crate) struct Queue {
    qid: u16,
    dev: Arc<DevFuse>,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    /// Guards the submission queue (only the queue thread pushes; see `RingReply::send`).
    sq: Mutex<()>,
    entries: Box<[Entry]>,
    payload_len: usize,
    thread: Mutex<Option<std::thread::ThreadId>>,
    /// Entries answered on other threads, for the queue thread to commit.
    replied: Mutex<Vec<usize>>,
    /// An eventfd the queue thread polls: written to stop it or to hand it `replied`.
    wake_fd: libc::c_int,
    stopped: AtomicBool,
}

// SAFETY: the raw pointers of `entries` point into memory the queue owns; an entry's
// buffers are touched by one party at a time (the kernel while it holds the entry, the
// queue thread while it parses the request, the reply's sender while it answers).
unsafe impl Send for Queue {}
// SAFETY: as above; the submission queue is behind `sq`, the completion queue is read
// by the queue thread alone.
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

    /// Writes the reply into the entry and commits it.
    pub(crate) fn send(&self, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let q = &self.queue;
        let e = &q.entries[self.entry];
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total < OUT_HEADER_LEN || total - OUT_HEADER_LEN > q.payload_len {
            return Err(io::Error::other(format!(
                "reply of {total} bytes does not fit a ring entry"
            )));
        }
        // SAFETY: the entry is ours until we commit it below: the kernel handed it over
        // with this request, and each request is answered once.
        unsafe {
            let mut at = 0usize;
            for b in bufs {
                for chunk in split_at_header(at, b) {
                    let (dst, off) = if at < OUT_HEADER_LEN {
                        (e.header, at)
                    } else {
                        (e.buf.add(FRONT), at - OUT_HEADER_LEN)
                    };
                    std::ptr::copy_nonoverlapping(chunk.as_ptr(), dst.add(off), chunk.len());
                    at += chunk.len();
                }
            }
            let payload = (total - OUT_HEADER_LEN) as u32;
            std::ptr::copy_nonoverlapping(
                payload.to_ne_bytes().as_ptr(),
                e.header.add(PAYLOAD_SZ),
                4,
            );
        }
        q.commit(self.entry)
    }
}

/// `b`, which starts `at` bytes into a reply, cut where the out header ends.
fn split_at_header(at: usize, b: &[u8]) -> impl Iterator<Item = &[u8]> {
    let cut = OUT_HEADER_LEN.saturating_sub(at).min(b.len());
    let (h, rest) = b.split_at(cut);
    [h, rest].into_iter().filter(|c| !c.is_empty())
}

/// Reads a native-endian integer of `N` bytes at `p`.
unsafe fn read<const N: usize>(p: *const u8) -> [u8; N] {
    let mut v = [0u8; N];
    // SAFETY: the caller names `N` readable bytes at `p`.
    unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), N) };
    v
}

impl Queue {
    fn new(qid: u16, dev: Arc<DevFuse>, depth: usize, payload_len: usize) -> io::Result<Self> {
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_cqsize(2 * depth as u32 + 2)
            .build(depth as u32 + 1)?;
        let mut entries = Vec::with_capacity(depth);
        for _ in 0..depth {
            let mut header = vec![0u64; HEADER_LEN / 8].into_boxed_slice();
            let mut buf = vec![0u64; (FRONT + payload_len).div_ceil(8)].into_boxed_slice();
            let hp = header.as_mut_ptr().cast::<u8>();
            let bp = buf.as_mut_ptr().cast::<u8>();
            let iov = Box::new([
                libc::iovec {
                    iov_base: hp.cast(),
                    iov_len: HEADER_LEN,
                },
                libc::iovec {
                    // SAFETY: `buf` holds FRONT + payload_len bytes.
                    iov_base: unsafe { bp.add(FRONT) }.cast(),
                    iov_len: payload_len,
                },
            ]);
            entries.push(Entry {
                header: hp,
                buf: bp,
                iov,
                last: AtomicU32::new(CMD_REGISTER),
                _mem: (header, buf),
            });
        }
        // SAFETY: plain syscall.
        let wake_fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if wake_fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Queue {
            qid,
            dev,
            ring,
            sq: Mutex::new(()),
            entries: entries.into_boxed_slice(),
            payload_len,
            thread: Mutex::new(None),
            replied: Mutex::new(Vec::new()),
            wake_fd,
            stopped: AtomicBool::new(false),
        })
    }

    /// A command for entry `i` of this queue.
    fn command(&self, i: usize, cmd_op: u32, commit_id: u64) -> squeue::Entry128 {
        self.entries[i].last.store(cmd_op, Ordering::Relaxed);
        // struct fuse_uring_cmd_req: flags u64, commit_id u64, qid u16, padding.
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
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
        // SAFETY: `Entry128` is `repr(C)`: a 64-byte `io_uring_sqe` (whose `len` is the
        // u32 at offset 24) and 64 bytes of command data.
        unsafe {
            let mut raw: [u8; 128] = std::mem::transmute(sqe);
            raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
            std::mem::transmute::<[u8; 128], squeue::Entry128>(raw)
        }
    }

    fn on_queue_thread(&self) -> bool {
        *self.thread.lock() == Some(std::thread::current().id())
    }

    /// Pushes `sqe`, for the queue thread's next submit (it submits before it waits).
    /// Only the queue thread submits: io_uring ties a command to the thread that
    /// submitted it and cancels it when that thread exits, and a commit is also the
    /// fetch of the entry's next request.
    fn push(&self, sqe: &squeue::Entry128) -> io::Result<()> {
        let _g = self.sq.lock();
        // SAFETY: pushes are serialised by `sq`; only pushes use the submission queue.
        let mut sq = unsafe { self.ring.submission_shared() };
        // SAFETY: what the SQE points at (an entry's iovecs) lives as long as the queue.
        unsafe { sq.push(sqe) }.map_err(|_| io::Error::other("io_uring submission queue full"))
    }

    /// Hands the reply in entry `i` back and asks for the next request: at once on the
    /// queue thread, else through the queue thread.
    fn commit(&self, i: usize) -> io::Result<()> {
        if self.on_queue_thread() {
            // SAFETY: the entry's header holds the commit id the kernel gave with the
            // request.
            let id =
                u64::from_ne_bytes(unsafe { read::<8>(self.entries[i].header.add(COMMIT_ID)) });
            self.push(&self.command(i, CMD_COMMIT_AND_FETCH, id))
        } else {
            self.replied.lock().push(i);
            self.wake()
        }
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
        // SAFETY: reading 8 bytes from an eventfd we own into `n`.
        unsafe { libc::read(self.wake_fd, (&mut n as *mut u64).cast(), 8) };
        let replied = std::mem::take(&mut *self.replied.lock());
        for i in replied {
            self.commit(i)?;
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

/// Number of the kernel's queues: one per possible CPU (`num_possible_cpus()`), which
/// may exceed the CPUs present. The ring is used only once every queue has entries.
fn possible_cpus() -> usize {
    let from_sysfs = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| last_cpu(&s))
        .map(|last| last + 1);
    from_sysfs.unwrap_or_else(|| {
        // SAFETY: plain libc call.
        let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
        usize::try_from(n).unwrap_or(1).max(1)
    })
}

/// The highest CPU of a sysfs CPU list such as `0-3,8-11` or `0`.
fn last_cpu(list: &str) -> Option<usize> {
    let last = list.trim().rsplit(',').next()?;
    last.rsplit('-').next()?.parse().ok()
}

impl Rings {
    pub(crate) fn new(dev: &Arc<DevFuse>, depth: usize, payload_len: usize) -> io::Result<Self> {
        let queues = (0..possible_cpus())
            .map(|q| {
                let qid = u16::try_from(q).map_err(|_| io::Error::other("too many CPUs"))?;
                Queue::new(qid, dev.clone(), depth, payload_len).map(Arc::new)
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Rings { queues })
    }

    /// Starts a thread per queue; each serves `event_loop`'s filesystem.
    pub(crate) fn spawn<FS: Filesystem>(
        &self,
        make_loop: impl Fn(String) -> SessionEventLoop<FS>,
    ) -> io::Result<Vec<std::thread::JoinHandle<io::Result<()>>>> {
        let mut threads = Vec::new();
        for q in &self.queues {
            let name = format!("fuser-ring-{}", q.qid);
            let ev = make_loop(name.clone());
            let q = q.clone();
            threads.push(std::thread::Builder::new().name(name).spawn(move || {
                let res = serve(&q, &ev);
                if let Err(e) = &res {
                    error!("io_uring queue {} stopped: {e}", q.qid);
                }
                res
            })?);
        }
        Ok(threads)
    }

    pub(crate) fn stop(&self) {
        for q in &self.queues {
            q.stop();
        }
    }
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

/// Puts the calling thread under `SCHED_IDLE`.
///
/// When the thread answers a request, the kernel wakes the caller; a CPU running only
/// idle-policy threads counts as idle, so the caller stays on this CPU (and preempts
/// us) instead of being sent to whichever other CPU is idle, which costs a cross-CPU
/// wake-up on every request and takes the next request to another queue. An idle-policy
/// thread still runs whenever its CPU has nothing else to do, and a caller waiting for
/// its reply leaves its CPU with nothing else to do; under CPU load (measured with
/// sixteen busy loops on two CPUs) requests were still answered faster than by the
/// `/dev/fuse` threads.
fn idle_policy() {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread with a valid parameter.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) } != 0 {
        warn!(
            "cannot give ring thread the idle policy: {}",
            io::Error::last_os_error()
        );
    }
}

/// The queue thread: registers the entries, then answers requests until the
/// connection ends or the session stops it.
fn serve<FS: Filesystem>(q: &Arc<Queue>, ev: &SessionEventLoop<FS>) -> io::Result<()> {
    *q.thread.lock() = Some(std::thread::current().id());
    pin(q.qid as usize);
    idle_policy();
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
                q.woken()?;
                continue;
            }
            let i = data as usize;
            if i >= q.entries.len() {
                error!("ring {}: completion for unknown entry {data}", q.qid);
                continue;
            }
            match res {
                0 => handle(q, i, ev),
                r if r == -libc::EINTR || r == -libc::EAGAIN => {
                    // Not taken: send it again.
                    warn!("ring {}: entry {i} command returned {r}; retrying", q.qid);
                    match q.entries[i].last.load(Ordering::Relaxed) {
                        CMD_REGISTER => q.push(&q.command(i, CMD_REGISTER, 0))?,
                        _ => q.commit(i)?,
                    }
                }
                r if r == -libc::ENOTCONN || r == -libc::ECANCELED || r == -libc::ENODEV => {
                    debug!("ring {}: connection closed", q.qid);
                    return Ok(());
                }
                r => {
                    return Err(io::Error::other(format!(
                        "ring {} entry {i}: {}",
                        q.qid,
                        io::Error::from_raw_os_error(-r)
                    )));
                }
            }
        }
    }
}

/// Puts the request in entry `i` back in one piece and dispatches it.
fn handle<FS: Filesystem>(q: &Arc<Queue>, i: usize, ev: &SessionEventLoop<FS>) {
    let e = &q.entries[i];
    // SAFETY: the kernel has completed the entry's command: its buffers are ours until
    // we commit. Offsets are within the header (HEADER_LEN) and buffer (FRONT + payload).
    unsafe {
        let len = u32::from_ne_bytes(read::<4>(e.header)) as usize;
        let unique = u64::from_ne_bytes(read::<8>(e.header.add(8)));
        let payload = u32::from_ne_bytes(read::<4>(e.header.add(PAYLOAD_SZ))) as usize;
        let op = len
            .checked_sub(IN_HEADER_LEN + payload)
            .filter(|&op| op <= OP_IN_MAX && payload <= q.payload_len);
        let Some(op) = op else {
            error!(
                "ring {}: malformed request (len {len}, payload {payload})",
                q.qid
            );
            fail(q, i, unique, libc::EIO);
            return;
        };
        let start = FRONT - IN_HEADER_LEN - op;
        std::ptr::copy_nonoverlapping(e.header, e.buf.add(start), IN_HEADER_LEN);
        std::ptr::copy_nonoverlapping(e.header.add(OP_IN), e.buf.add(start + IN_HEADER_LEN), op);
        let mut aligned;
        let data: &[u8] = if start % 8 == 0 {
            std::slice::from_raw_parts(e.buf.add(start), len)
        } else {
            // Every fixed argument is a multiple of 8 bytes long; should one not be, the
            // request is copied to where fuser's parser can read it.
            aligned = vec![0u64; len.div_ceil(8)];
            let p = aligned.as_mut_ptr().cast::<u8>();
            std::ptr::copy_nonoverlapping(e.buf.add(start), p, len);
            std::slice::from_raw_parts(p, len)
        };
        let sender = ChannelSender::Ring(RingReply {
            queue: q.clone(),
            entry: i,
        });
        match RequestWithSender::new(sender, data) {
            Some(req) => {
                if let Ok(Operation::Destroy(_)) = req.request.operation() {
                    req.reply::<ReplyEmpty>().ok();
                } else {
                    req.dispatch(ev);
                }
            }
            None => fail(q, i, unique, libc::EIO),
        }
    }
}

/// Answers the request in entry `i` with `errno`.
fn fail(q: &Arc<Queue>, i: usize, unique: u64, errno: i32) {
    let mut h = [0u8; OUT_HEADER_LEN];
    h[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&(-errno).to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    let r = RingReply {
        queue: q.clone(),
        entry: i,
    };
    if let Err(e) = r.send(&[IoSlice::new(&h)]) {
        error!("ring {}: cannot answer a request: {e}", q.qid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_cpu_of_sysfs_lists() {
        assert_eq!(last_cpu("0\n"), Some(0));
        assert_eq!(last_cpu("0-1\n"), Some(1));
        assert_eq!(last_cpu("0-3,8-11"), Some(11));
        assert_eq!(last_cpu("0,2,5"), Some(5));
        assert_eq!(last_cpu(""), None);
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
}
