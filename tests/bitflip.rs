//! Single bit flips in the metadata file: each flip must give an error, never other
//! bytes, and fsck must say the store is damaged whenever anything reads wrong.
//!
//! The store is driven through the core in this process (no mount), so that thousands
//! of flips take seconds. `BITFLIP_STRIDE` (default 97) chooses every how many bits
//! are flipped; `BITFLIP_MAX` bounds how many flips are tried (default: all).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;

use common::pattern;
use snapfs::fs::{Caller, Fs, SNAPDIR_INO};
use snapfs::store::StoreConfig;
use snapfs::store::schema::{ROOT_INO, Ts};

const ROOT: Caller = Caller {
    uid: 0,
    gid: 0,
    pid: 0,
};

/// What each view should read: view (`live` or a snapshot name) -> path -> bytes.
type Model = BTreeMap<String, BTreeMap<Vec<String>, Vec<u8>>>;

/// Builds a small store with directories, files of several sizes (holes, tails,
/// fragments), xattrs, a symlink and two snapshots; returns what each view holds.
fn build(path: &Path) -> Model {
    let fs = Fs::open(path, Some(&StoreConfig::default())).unwrap();
    let mut core = fs.lock();
    let mut live: BTreeMap<Vec<String>, Vec<u8>> = BTreeMap::new();
    let mut model = Model::new();
    let mut dirs = vec![ROOT_INO];
    for d in 0..3 {
        let a = core
            .mknod(
                ROOT_INO,
                format!("d{d}").as_bytes(),
                libc::S_IFDIR | 0o755,
                0,
                0,
                b"",
                ROOT,
            )
            .unwrap();
        dirs.push(a.ino);
    }
    let write = |core: &mut snapfs::fs::Inner,
                 live: &mut BTreeMap<Vec<String>, Vec<u8>>,
                 d: usize,
                 name: &str,
                 off: u64,
                 data: &[u8]| {
        let ino = match core.lookup(dirs[d], name.as_bytes()) {
            Ok(a) => a.ino,
            Err(_) => {
                core.mknod(
                    dirs[d],
                    name.as_bytes(),
                    libc::S_IFREG | 0o644,
                    0,
                    0,
                    b"",
                    ROOT,
                )
                .unwrap()
                .ino
            }
        };
        let fh = core.open(ino, libc::O_WRONLY).unwrap();
        core.write(fh, ino, off, data, &[]).unwrap();
        core.release(fh).unwrap();
        let mut p = Vec::new();
        if d > 0 {
            p.push(format!("d{}", d - 1));
        }
        p.push(name.to_string());
        let f = live.entry(p).or_default();
        let end = off as usize + data.len();
        if f.len() < end {
            f.resize(end, 0);
        }
        f[off as usize..end].copy_from_slice(data);
    };
    for i in 0..12u64 {
        let len = [100, 4096, 65536, 70_000, 150_000, 1][i as usize % 6];
        write(
            &mut core,
            &mut live,
            (i % 4) as usize,
            &format!("f{i}"),
            0,
            &pattern(i, len),
        );
    }
    // A file with a hole.
    write(&mut core, &mut live, 1, "sparse", 300_000, b"after a hole");
    core.mknod(
        ROOT_INO,
        b"link",
        libc::S_IFLNK | 0o777,
        0,
        0,
        b"d0/f1",
        ROOT,
    )
    .unwrap();
    let f3 = core.lookup(dirs[3], b"f3").unwrap().ino;
    core.setxattr(f3, b"user.note", b"kept", 0, None).unwrap();
    core.sync_all().unwrap();
    core.snapshot_create(b"s1", Ts::now()).unwrap();
    model.insert("s1".into(), live.clone());
    // Changes after s1: overwrites in place (fragments), a new file, a deletion.
    write(&mut core, &mut live, 0, "f4", 4096, &pattern(100, 8192));
    write(&mut core, &mut live, 2, "f5", 70_000, &pattern(101, 65536));
    write(&mut core, &mut live, 3, "new", 0, &pattern(102, 90_000));
    core.remove(dirs[1], b"f1", false).unwrap();
    live.remove(&vec!["d0".to_string(), "f1".to_string()]);
    core.sync_all().unwrap();
    core.snapshot_create(b"s2", Ts::now()).unwrap();
    model.insert("s2".into(), live.clone());
    write(&mut core, &mut live, 0, "f6", 0, &pattern(103, 10));
    core.sync_all().unwrap();
    model.insert("live".into(), live);
    core.store().compact_metadata().unwrap();
    drop(core);
    drop(fs);
    model
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

/// How reading every file of the model went.
enum Reads {
    /// Every file read back its bytes.
    AllRight,
    /// Some read failed (an error, never other bytes).
    SomeFailed(String),
}

/// Reads every file of every view; `Err` names a file that read other bytes.
fn read_all(path: &Path, model: &Model) -> Result<Reads, String> {
    let fs = match Fs::open(path, None) {
        Ok(fs) => fs,
        Err(e) => return Ok(Reads::SomeFailed(format!("open: {e}"))),
    };
    let mut core = fs.lock();
    let mut failed = None;
    for (view, files) in model {
        let top = if view == "live" {
            Ok(ROOT_INO)
        } else {
            core.lookup(SNAPDIR_INO, view.as_bytes()).map(|a| a.ino)
        };
        for (p, want) in files {
            let got = top.as_ref().map_err(|e| e.to_string()).and_then(|top| {
                let mut ino = *top;
                for part in p {
                    ino = core
                        .lookup(ino, part.as_bytes())
                        .map_err(|e| e.to_string())?
                        .ino;
                }
                let size = core.getattr(ino).map_err(|e| e.to_string())?.rec.size;
                if size != want.len() as u64 {
                    return Ok(None);
                }
                core.read(ino, 0, size as u32 + 1)
                    .map(Some)
                    .map_err(|e| e.to_string())
            });
            match got {
                Ok(Some(b)) if b == *want => {}
                Ok(_) => return Err(format!("{view}:/{} read other bytes", p.join("/"))),
                Err(e) => {
                    failed.get_or_insert(format!("{view}:/{}: {e}", p.join("/")));
                }
            }
        }
    }
    Ok(match failed {
        None => Reads::AllRight,
        Some(why) => Reads::SomeFailed(why),
    })
}

#[test]
fn every_97th_bit_flip_of_the_metadata_is_caught() {
    let stride: usize = std::env::var("BITFLIP_STRIDE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(97);
    let most: usize = std::env::var("BITFLIP_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    let dir = tempfile::tempdir().unwrap();
    let clean: PathBuf = dir.path().join("clean");
    let model = build(&clean);
    // The intact store reads right and is clean.
    assert!(matches!(read_all(&clean, &model), Ok(Reads::AllRight)));
    let db = std::fs::read(clean.join("snapfs.redb")).unwrap();
    let (mut harmless, mut caught, mut unopenable) = (0, 0, 0);
    let mut failures = Vec::new();
    let bits = (0..db.len() * 8).step_by(stride).take(most);
    let tried = bits.len();
    std::panic::set_hook(Box::new(|_| {}));
    for bit in bits {
        let work = dir.path().join("work");
        let _ = std::fs::remove_dir_all(&work);
        copy_dir(&clean, &work);
        let mut bytes = db.clone();
        bytes[bit / 8] ^= 1 << (bit % 8);
        std::fs::write(work.join("snapfs.redb"), &bytes).unwrap();
        // fsck first: it must not change the store, and it looks before anything else.
        let fsck = std::panic::catch_unwind(|| {
            let mut ro = snapfs::store::ReadOnlyStore::open(&work, true)?;
            snapfs::check::fsck_offline(&mut ro, true, &mut |_, _| {})
        });
        let fsck_clean = match fsck {
            Err(_) => {
                failures.push(format!("bit {bit}: fsck panicked"));
                continue;
            }
            Ok(Err(_)) => {
                unopenable += 1;
                false
            }
            Ok(Ok(rep)) => rep.clean(),
        };
        let reads = std::panic::catch_unwind(|| read_all(&work, &model));
        match reads {
            Err(_) => failures.push(format!("bit {bit}: reading panicked")),
            Ok(Err(wrong)) => failures.push(format!("bit {bit}: {wrong}")),
            Ok(Ok(Reads::AllRight)) => {
                if fsck_clean {
                    harmless += 1;
                } else {
                    caught += 1;
                }
            }
            Ok(Ok(Reads::SomeFailed(why))) => {
                if fsck_clean {
                    failures.push(format!("bit {bit}: fsck clean, but {why}"));
                } else {
                    caught += 1;
                }
            }
        }
    }
    let _ = std::panic::take_hook();
    println!(
        "bit flips: {tried} tried (every {stride}th bit of {} bytes), {harmless} harmless and clean, {caught} caught by fsck ({unopenable} of them refused at open), {} failures",
        db.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
