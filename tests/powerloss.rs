//! Power loss at any point, played on a simulated disk (`snapfs::store::disk::sim`):
//! only what was made durable survives, plus a random part of what was not, torn at
//! 4 KiB pages. After each crash the store is opened with the real store code and
//! must be clean (fsck), with every fsync-acknowledged file and every snapshot intact
//! and nothing falsified: every page a file reads is a page some write put there.
//!
//! The kill -9 tests elsewhere keep the page cache, so they cannot see a missing
//! fsync; these can. `POWERLOSS_SEEDS` (default 2) workloads are run, and every
//! `POWERLOSS_EVERY`th I/O step (default 3) is a crash point; `bench/crash.sh` runs
//! many more.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use snapfs::fs::{Caller, Fs, Inner, SNAPDIR_INO};
use snapfs::store::StoreConfig;
use snapfs::store::disk::sim::SimDisk;
use snapfs::store::schema::{ROOT_INO, Ts};

const ROOT: Caller = Caller {
    uid: 0,
    gid: 0,
    pid: 0,
};

const STORE: &str = "/s";

/// Deterministic pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// What one file may read after a crash.
#[derive(Clone, Debug, Default)]
struct FileModel {
    /// The content fsync acknowledged (`None`: acknowledged deleted, or never).
    acked: Option<Vec<u8>>,
    /// Whether anything was acknowledged at all.
    ever_acked: bool,
    /// Contents written since (`None`: deleted since).
    since: Vec<Option<Vec<u8>>>,
}

impl FileModel {
    fn latest(&self) -> Option<&Vec<u8>> {
        match self.since.last() {
            Some(v) => v.as_ref(),
            None => self.acked.as_ref(),
        }
    }
    fn ack(&mut self) {
        if let Some(v) = self.since.pop() {
            self.acked = v;
            self.ever_acked = true;
            self.since.clear();
        }
    }
}

/// What the workload was told, shared with the crash hook.
#[derive(Clone, Debug, Default)]
struct Model {
    files: BTreeMap<String, FileModel>,
    /// Snapshots whose creation returned, with every file's content then.
    snaps: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// A snapshot being created or deleted right now: it may or may not be there.
    in_flight: Option<(String, BTreeMap<String, Vec<u8>>)>,
    /// Making the store returned.
    created: bool,
}

impl Model {
    fn now(&self) -> BTreeMap<String, Vec<u8>> {
        self.files
            .iter()
            .filter_map(|(n, f)| Some((n.clone(), f.latest()?.clone())))
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads file `name` under directory `dir`, `None` if absent.
fn read(core: &mut Inner, dir: u64, name: &str) -> Result<Option<Vec<u8>>, String> {
    let ino = match core.lookup(dir, name.as_bytes()) {
        Ok(a) => a.ino,
        Err(e) if e.errno() == libc::ENOENT => return Ok(None),
        Err(e) => return Err(format!("lookup {name}: {e}")),
    };
    let size = core.getattr(ino).map_err(|e| e.to_string())?.rec.size;
    core.read(ino, 0, size as u32 + 1)
        .map(Some)
        .map_err(|e| format!("read {name}: {e}"))
}

/// The names in directory `dir`.
fn names(core: &mut Inner, dir: u64) -> Result<BTreeSet<String>, String> {
    let fh = core.opendir(dir).map_err(|e| e.to_string())?;
    let out = core
        .readdir(fh, 0)
        .map_err(|e| e.to_string())?
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .filter(|n| n != "." && n != ".." && n != ".snapshots")
        .collect();
    core.releasedir(fh).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Whether every 4 KiB page of `got` is that page of one of `versions` (or zeros
/// past a version's end), and its length one of theirs.
fn made_of(got: &[u8], versions: &[&Vec<u8>]) -> bool {
    if !versions.iter().any(|v| v.len() == got.len()) {
        return false;
    }
    got.chunks(4096).enumerate().all(|(i, page)| {
        versions.iter().any(|v| {
            let at = i * 4096;
            let theirs = v.get(at..(at + page.len()).min(v.len())).unwrap_or(&[]);
            page.starts_with(theirs) && page[theirs.len()..].iter().all(|b| *b == 0)
        })
    })
}

/// Opens the crashed disk with the real store code and checks it against `model`.
fn verify(disk: SimDisk, model: &Model) -> Result<(), String> {
    let fs = match Fs::open_on(Arc::new(disk), Path::new(STORE), None) {
        Ok(fs) => fs,
        // Made by the mount that was cut short: nothing was promised yet.
        Err(_) if !model.created => return Ok(()),
        Err(e) => return Err(format!("the store does not open: {e}")),
    };
    let mut core = fs.lock();
    let rep = snapfs::check::fsck(core.store(), true, &mut |_, _| {})
        .map_err(|e| format!("fsck failed: {e}"))?;
    if !rep.clean() {
        return Err(format!("fsck: {}", rep.summary()));
    }
    let present = names(&mut core, ROOT_INO)?;
    for name in &present {
        if !model.files.contains_key(name) {
            return Err(format!("{name} was never made"));
        }
    }
    for (name, f) in &model.files {
        let got = read(&mut core, ROOT_INO, name)?;
        let mut may: Vec<Option<&Vec<u8>>> = f.since.iter().map(Option::as_ref).collect();
        may.push(f.acked.as_ref());
        if !f.ever_acked {
            may.push(None);
        }
        match got {
            None if may.contains(&None) => {}
            None => return Err(format!("{name} is lost")),
            Some(got) => {
                let versions: Vec<&Vec<u8>> = may.iter().flatten().copied().collect();
                if f.since.is_empty() && f.acked.as_ref() != Some(&got) {
                    return Err(format!("{name} does not read what fsync acknowledged"));
                }
                if !made_of(&got, &versions) {
                    return Err(format!("{name} reads bytes never written"));
                }
            }
        }
    }
    let snaps = names(&mut core, SNAPDIR_INO)?;
    for (name, files) in &model.snaps {
        let optional = model.in_flight.as_ref().is_some_and(|(n, _)| n == name);
        if !snaps.contains(name) {
            if optional {
                continue;
            }
            return Err(format!("snapshot {name} is lost"));
        }
        check_snapshot(&mut core, name, files)?;
    }
    for name in &snaps {
        if model.snaps.contains_key(name) {
            continue;
        }
        match &model.in_flight {
            Some((n, files)) if n == name => check_snapshot(&mut core, name, files)?,
            _ => return Err(format!("snapshot {name} was never made, or was deleted")),
        }
    }
    Ok(())
}

fn check_snapshot(
    core: &mut Inner,
    name: &str,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<(), String> {
    let top = core
        .lookup(SNAPDIR_INO, name.as_bytes())
        .map_err(|e| format!("snapshot {name}: {e}"))?
        .ino;
    let got = names(core, top)?;
    let want: BTreeSet<String> = files.keys().cloned().collect();
    if got != want {
        return Err(format!("snapshot {name} lists {got:?}, not {want:?}"));
    }
    for (f, bytes) in files {
        if read(core, top, f)?.as_ref() != Some(bytes) {
            return Err(format!("snapshot {name}: {f} is not what it was"));
        }
    }
    Ok(())
}

/// Runs the workload of `seed` on `disk`; the hook (set by the caller) sees `model`.
/// With `tolerate_errors`, a failed call ends the workload (fault injection) instead
/// of failing the test.
fn workload(disk: &SimDisk, model: &Arc<Mutex<Model>>, seed: u64, tolerate_errors: bool) {
    let fs = match Fs::open_on(
        Arc::new(disk.clone()),
        Path::new(STORE),
        Some(&StoreConfig::default()),
    ) {
        Ok(fs) => fs,
        Err(_) if tolerate_errors => return,
        Err(e) => panic!("making the store: {e}"),
    };
    lock(model).created = true;
    let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let mut snap_no = 0;
    macro_rules! call {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) if tolerate_errors => {
                    let _ = e;
                    return;
                }
                Err(e) => panic!("{} failed: {e}", stringify!($e)),
            }
        };
    }
    for _ in 0..120 {
        let name = format!("f{}", rng.below(8));
        let op = rng.below(100);
        let mut core = fs.lock();
        match op {
            // Write a file whole (new or replaced), fsync it half the time.
            0..=39 => {
                let len = [0, 100, 4096, 65536, 100_000, 200_000][rng.below(6) as usize];
                // A third of the time another file's bytes: a deduplicated write.
                let other = format!("f{}", rng.below(8));
                let copy = match rng.below(3) {
                    0 => lock(model)
                        .files
                        .get(&other)
                        .and_then(|f| f.latest().cloned()),
                    _ => None,
                };
                let data = copy.unwrap_or_else(|| rng.bytes(len));
                let ino = match core.lookup(ROOT_INO, name.as_bytes()) {
                    Ok(a) => a.ino,
                    Err(_) => {
                        call!(core.mknod(
                            ROOT_INO,
                            name.as_bytes(),
                            libc::S_IFREG | 0o644,
                            0,
                            0,
                            b"",
                            ROOT
                        ))
                        .ino
                    }
                };
                // Made or cut to nothing: a state that may last if what follows fails.
                lock(model)
                    .files
                    .entry(name.clone())
                    .or_default()
                    .since
                    .push(Some(Vec::new()));
                let fh = call!(core.open(ino, libc::O_WRONLY));
                call!(core.setattr(
                    ino,
                    ROOT,
                    snapfs::fs::SetAttr {
                        size: Some(0),
                        ..Default::default()
                    }
                ));
                call!(core.write(fh, ino, 0, &data, &[]));
                lock(model)
                    .files
                    .entry(name.clone())
                    .or_default()
                    .since
                    .push(Some(data));
                if rng.below(2) == 0 {
                    call!(core.fsync(ino, false));
                    lock(model).files.get_mut(&name).unwrap().ack();
                }
                call!(core.release(fh));
            }
            // Overwrite part of a file in place (fragments), fsync it.
            40..=59 => {
                let Some(old) = lock(model)
                    .files
                    .get(&name)
                    .and_then(|f| f.latest().cloned())
                else {
                    continue;
                };
                let ino = call!(core.lookup(ROOT_INO, name.as_bytes())).ino;
                let at = rng.below(old.len() as u64 + 1) as usize;
                let n = 1 + rng.below(20_000) as usize;
                let piece = rng.bytes(n);
                let mut new = old.clone();
                if new.len() < at + piece.len() {
                    new.resize(at + piece.len(), 0);
                }
                new[at..at + piece.len()].copy_from_slice(&piece);
                let fh = call!(core.open(ino, libc::O_WRONLY));
                call!(core.write(fh, ino, at as u64, &piece, &[]));
                lock(model)
                    .files
                    .get_mut(&name)
                    .unwrap()
                    .since
                    .push(Some(new));
                call!(core.fsync(ino, false));
                lock(model).files.get_mut(&name).unwrap().ack();
                call!(core.release(fh));
            }
            // Delete a file.
            60..=69 => {
                if core.lookup(ROOT_INO, name.as_bytes()).is_err() {
                    continue;
                }
                call!(core.remove(ROOT_INO, name.as_bytes(), false));
                lock(model).files.get_mut(&name).unwrap().since.push(None);
            }
            // Everything durable.
            70..=79 => {
                call!(core.sync_all());
                for f in lock(model).files.values_mut() {
                    f.ack();
                }
            }
            // A snapshot (flushes and commits durably).
            80..=87 => {
                snap_no += 1;
                let s = format!("s{snap_no}");
                {
                    let mut m = lock(model);
                    let now = m.now();
                    m.in_flight = Some((s.clone(), now));
                }
                call!(core.snapshot_create(s.as_bytes(), Ts::now()));
                let mut m = lock(model);
                let (s, files) = m.in_flight.take().unwrap();
                m.snaps.insert(s, files);
                for f in m.files.values_mut() {
                    f.ack();
                }
            }
            // Delete the oldest snapshot.
            88..=93 => {
                let Some((s, files)) = lock(model).snaps.pop_first() else {
                    continue;
                };
                {
                    let mut m = lock(model);
                    m.snaps.insert(s.clone(), files.clone());
                    m.in_flight = Some((s.clone(), files));
                }
                call!(core.snapshot_delete(s.as_bytes()));
                let mut m = lock(model);
                m.snaps.remove(&s);
                m.in_flight = None;
            }
            // The background tick: group commit, durable point, compaction.
            _ => {
                call!(core.tick(rng.below(2) == 0));
                if let Ok(()) = core.sync_all() {
                    for f in lock(model).files.values_mut() {
                        f.ack();
                    }
                }
            }
        }
    }
    drop(fs);
}

/// Crash points of one workload: every `every`th step; returns (points, failures).
fn crash_run(seed: u64, every: u64) -> (u64, Vec<String>) {
    let disk = SimDisk::new();
    let model = Arc::new(Mutex::new(Model::default()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let points = Arc::new(Mutex::new(0u64));
    {
        let (model, failures, points) = (model.clone(), failures.clone(), points.clone());
        disk.set_hook(Box::new(move |step, d| {
            // Before the store's first durable commit there is nothing to keep.
            if step < 8 || step % every != 0 {
                return;
            }
            let m = lock(&model).clone();
            let crashed = d.image().crash(seed ^ step.wrapping_mul(0x9E37));
            *lock(&points) += 1;
            if let Err(e) = verify(crashed, &m) {
                lock(&failures).push(format!("seed {seed}, crash at step {step}: {e}"));
            }
        }));
    }
    workload(&disk, &model, seed, false);
    // And after the workload, as it was left.
    let m = lock(&model).clone();
    *lock(&points) += 1;
    if let Err(e) = verify(disk.image().crash(seed), &m) {
        lock(&failures).push(format!("seed {seed}, crash at the end: {e}"));
    }
    let n = *lock(&points);
    let f = lock(&failures).clone();
    (n, f)
}

/// Prints `what` with the count of `failures` (the line bench/crash.sh reads), and
/// fails the test on any, showing the first twenty.
fn report(what: &str, failures: &[String]) {
    println!("{what}, {} failures", failures.len());
    assert!(
        failures.is_empty(),
        "{}",
        failures[..failures.len().min(20)].join("\n")
    );
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn every_acknowledged_write_survives_power_loss_at_any_point() {
    let seeds = env("POWERLOSS_SEEDS", 2);
    let every = env("POWERLOSS_EVERY", 3).max(1);
    let (mut points, mut failures) = (0, Vec::new());
    for seed in 1..=seeds {
        let (n, f) = crash_run(seed, every);
        points += n;
        failures.extend(f);
    }
    assert!(points > 50, "only {points} crash points");
    report(
        &format!("power loss: {points} crash points tried"),
        &failures,
    );
}

/// An I/O error at any step: whatever was acknowledged before or after it survives a
/// crash, so an error that mattered reached the caller and was not swallowed.
#[test]
fn an_io_error_at_any_step_never_loses_what_was_acknowledged() {
    let seed = env("POWERLOSS_FAULT_SEED", 3);
    let every = env("POWERLOSS_FAULT_EVERY", 13).max(1);
    // How many steps the workload takes.
    let total = {
        let disk = SimDisk::new();
        workload(&disk, &Arc::new(Mutex::new(Model::default())), seed, false);
        disk.steps()
    };
    let mut failures = Vec::new();
    let mut tried = 0;
    for (i, step) in (8..total).step_by(every as usize).enumerate() {
        let errno = if i % 2 == 0 { libc::EIO } else { libc::ENOSPC };
        let disk = SimDisk::new();
        disk.fail_at(step, errno);
        let model = Arc::new(Mutex::new(Model::default()));
        workload(&disk, &model, seed, true);
        tried += 1;
        let m = lock(&model).clone();
        if let Err(e) = verify(disk.image().crash(step), &m) {
            failures.push(format!("errno {errno} at step {step}: {e}"));
        }
    }
    assert!(tried > 20);
    report(
        &format!("faults: {tried} steps failed in turn (of {total})"),
        &failures,
    );
}

/// After a failed data sync the store is in its error state; closing it must not make
/// what it still had pending durable (redb's close would), since that names extents
/// whose bytes the failed sync lost.
#[test]
fn closing_after_a_failed_sync_keeps_the_last_durable_state() {
    let disk = SimDisk::new();
    let old: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let new: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    {
        let fs = Fs::open_on(
            Arc::new(disk.clone()),
            Path::new(STORE),
            Some(&StoreConfig::default()),
        )
        .unwrap();
        let mut core = fs.lock();
        let ino = core
            .mknod(ROOT_INO, b"f", libc::S_IFREG | 0o644, 0, 0, b"", ROOT)
            .unwrap()
            .ino;
        let fh = core.open(ino, libc::O_WRONLY).unwrap();
        core.write(fh, ino, 0, &old, &[]).unwrap();
        core.sync_all().unwrap();
        // New bytes, committed but not durably; then their data sync fails.
        core.write(fh, ino, 0, &new, &[]).unwrap();
        core.flush_all().unwrap();
        core.store().commit_group(false).unwrap();
        core.store().segs.fail_next_syncs(1);
        assert!(core.sync_all().is_err());
        core.release(fh).unwrap();
    }
    // The store was closed (dropped); then the power goes.
    let crashed = disk.image().crash(5);
    let fs = Fs::open_on(Arc::new(crashed), Path::new(STORE), None).unwrap();
    let mut core = fs.lock();
    let rep = snapfs::check::fsck(core.store(), true, &mut |_, _| {}).unwrap();
    assert!(rep.clean(), "{}", rep.summary());
    assert_eq!(read(&mut core, ROOT_INO, "f").unwrap(), Some(old));
}
