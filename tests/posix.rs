//! POSIX behaviour of a real snapfs mount, driven with real syscalls.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;

use common::*;

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// statvfs(2) of `p`.
fn vfs(p: &Path) -> libc::statvfs {
    // SAFETY: zeroed statvfs is valid; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(cpath(p).as_ptr(), &mut st) }, 0);
    st
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

fn rename2(a: &Path, b: &Path, flags: u32) -> Result<(), i32> {
    let (a, b) = (cpath(a), cpath(b));
    // SAFETY: valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 { Ok(()) } else { Err(errno()) }
}

fn rename_err(a: &Path, b: &Path) -> i32 {
    fs::rename(a, b).unwrap_err().raw_os_error().unwrap()
}

#[test]
fn random_offset_writes_match_a_model_and_survive_remount() {
    let mut m = Mount::new();
    let p = m.path("f");
    let mut model = vec![0u8; 0];
    let f = create_rw(&p);
    let mut x = 12345u64;
    for i in 0..400 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 20) % (3 << 20);
        let len = 1 + ((x >> 8) % 200_000) as usize;
        write_modelled(&f, &mut model, off, &pattern(i, len));
        if i % 50 == 0 {
            let mut back = vec![0u8; model.len()];
            f.read_exact_at(&mut back, 0).unwrap();
            assert!(back == model, "content differs after write {i}");
        }
    }
    drop(f);
    m.remount();
    let back = fs::read(&p).unwrap();
    assert_eq!(back.len(), model.len());
    assert!(back == model, "content differs after remount");
    assert!(m.fsck().status.success());
}

#[test]
fn small_writes_into_stored_blocks_are_exact_everywhere() {
    // Small writes into stored blocks are kept as page fragments over the block and
    // folded into one extent when a block gathers many: the file, its snapshots, a
    // remount and fsck must all agree with a model.
    let mut m = Mount::new();
    let p = m.path("f");
    let size = 4usize << 20;
    let mut model = pattern(7, size);
    let f = create_rw(&p);
    f.write_all_at(&model, 0).unwrap();
    f.sync_all().unwrap();
    let mut snaps = Vec::new();
    let mut x = 99u64;
    for i in 0..600u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // Mostly page-sized and page-aligned, some odd sizes and offsets, some past
        // the end (the file grows).
        let (off, len) = match i % 4 {
            0 | 1 => (((x >> 16) % (size as u64 / 4096)) * 4096, 4096),
            2 => ((x >> 16) % (size as u64), 1 + (x >> 40) as usize % 9000),
            _ => (
                (x >> 16) % (size as u64 + 200_000),
                1 + (x >> 40) as usize % 300,
            ),
        };
        write_modelled(&f, &mut model, off, &pattern(1000 + i, len));
        if i % 9 == 0 {
            f.sync_data().unwrap();
        }
        if i % 150 == 149 {
            // Written pages the kernel still caches belong in the snapshot, by mkdir
            // or by the CLI alike.
            let name = format!("s{i}");
            if i % 300 == 149 {
                fs::create_dir(m.path(&format!(".snapshots/{name}"))).unwrap();
            } else {
                let out = snapfs(&["snapshot", "create", m.mnt.to_str().unwrap(), &name]);
                assert!(out.status.success());
            }
            snaps.push((name, model.clone()));
        }
    }
    f.sync_all().unwrap();
    drop(f);
    let same = |got: &[u8], want: &[u8], what: &str| {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        assert!(
            got.len() == want.len() && first.is_none(),
            "{what}: {} bytes, want {}; first difference at {first:?}",
            got.len(),
            want.len()
        );
    };
    let check = |m: &Mount, when: &str| {
        same(
            &fs::read(m.path("f")).unwrap(),
            &model,
            &format!("live file {when}"),
        );
        for (name, want) in &snaps {
            let got = fs::read(m.path(&format!(".snapshots/{name}/f"))).unwrap();
            same(&got, want, &format!("snapshot {name} {when}"));
        }
    };
    drop_caches();
    check(&m, "read back from the daemon");
    m.remount();
    check(&m, "after remount");
    m.unmount();
    m.assert_fsck_clean();
}

#[test]
fn a_page_written_into_a_stored_block_does_not_rewrite_the_block() {
    let m = Mount::new();
    let p = m.path("f");
    let blocks = 128u64; // of 64 KiB: an 8 MiB file
    let f = create_rw(&p);
    f.write_all_at(&pattern(3, (blocks << 16) as usize), 0)
        .unwrap();
    f.sync_all().unwrap();
    let before = segment_bytes(&m.store);
    for b in 0..blocks {
        f.write_all_at(&pattern(b + 10, 4096), (b << 16) + 8192)
            .unwrap();
        if b % 16 == 15 {
            f.sync_data().unwrap();
        }
    }
    let grown = segment_bytes(&m.store) - before;
    // One page (plus its header) per block; whole blocks would be 8 MiB.
    assert!(
        grown < blocks * 8192,
        "{blocks} one-page writes appended {grown} bytes"
    );
    let mut got = vec![0u8; 4096];
    f.read_exact_at(&mut got, (5 << 16) + 8192).unwrap();
    assert!(got == pattern(15, 4096));
}

#[test]
fn bytes_one_block_lets_go_of_and_another_takes_in_one_flush_survive() {
    // Block 0 drops the page fragment C while block 1 takes the same bytes, in one
    // flush: the shared extent must not be freed in between.
    let mut m = Mount::new();
    let p = m.path("f");
    let f = create_rw(&p);
    f.write_all_at(&pattern(1, 4 << 16), 0).unwrap();
    f.sync_all().unwrap();
    let c = pattern(2, 4096);
    f.write_all_at(&c, 4096).unwrap();
    f.sync_all().unwrap();
    f.write_all_at(&pattern(3, 4096), 4096).unwrap();
    f.write_all_at(&c, (1 << 16) + 4096).unwrap();
    f.sync_all().unwrap();
    let mut got = vec![0u8; 4096];
    f.read_exact_at(&mut got, (1 << 16) + 4096).unwrap();
    assert!(got == c);
    drop(f);
    m.remount();
    let back = fs::read(&p).unwrap();
    assert!(back[(1 << 16) + 4096..][..4096] == c[..]);
    assert!(back[4096..8192] == pattern(3, 4096)[..]);
    m.unmount();
    m.assert_fsck_clean();
}

#[test]
fn sparse_files_read_zeros_and_seek_data_hole() {
    // SEEK_DATA/SEEK_HOLE are answered by the daemon only without the writeback cache
    // (with it, see the next test).
    let m = Mount::with_options(&["nowriteback"]);
    let p = m.path("sparse");
    let f = create_rw(&p);
    let tib = 1u64 << 40;
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"tail", tib).unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), tib + 4);
    let mut buf = vec![1u8; 4096];
    f.read_exact_at(&mut buf, tib / 2).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "a hole reads as zeros");
    let mut tail = [0u8; 4];
    f.read_exact_at(&mut tail, tib).unwrap();
    assert_eq!(&tail, b"tail");
    let fd = f.as_raw_fd();
    // SAFETY: lseek on an open descriptor.
    let hole = unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) };
    assert!(
        hole > 0 && (hole as u64) < tib,
        "first hole after the head block: {hole}"
    );
    // SAFETY: as above.
    let data = unsafe { libc::lseek(fd, 1 << 20, libc::SEEK_DATA) };
    assert!(
        data as u64 <= tib && data as u64 > tib - (1 << 20),
        "next data near the tail: {data}"
    );
    // SAFETY: as above.
    let past = unsafe { libc::lseek(fd, (tib + 10) as i64, libc::SEEK_DATA) };
    assert_eq!(past, -1);
    assert_eq!(errno(), libc::ENXIO);
    // Truncating down and up again leaves zeros, not old bytes.
    f.set_len(2).unwrap();
    f.set_len(4096).unwrap();
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(&b[..2], b"he");
    assert!(b[2..].iter().all(|&x| x == 0));
}

#[test]
fn with_the_writeback_cache_seek_hole_never_hides_data() {
    // The kernel may hold written pages the daemon has not seen; lseek must not call
    // them a hole. The whole file then counts as data, up to its end.
    let m = Mount::new();
    let f = create_rw(&m.path("sparse"));
    let mib = 1u64 << 20;
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"tail", 64 * mib).unwrap();
    let fd = f.as_raw_fd();
    // SAFETY: lseek on an open descriptor.
    let hole = unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) };
    assert_eq!(hole as u64, 64 * mib + 4, "no hole before the end");
    // SAFETY: as above.
    let data = unsafe { libc::lseek(fd, mib as i64, libc::SEEK_DATA) };
    assert!(
        data >= 0 && data as u64 <= 64 * mib,
        "data at or before the tail: {data}"
    );
    let mut tail = [0u8; 4];
    f.read_exact_at(&mut tail, 64 * mib).unwrap();
    assert_eq!(&tail, b"tail");
}

#[test]
fn one_gib_file_round_trips() {
    let mut m = Mount::new();
    let p = m.path("big");
    let chunk = 1 << 20;
    let mut h = blake3::Hasher::new();
    {
        let mut f = File::create(&p).unwrap();
        for i in 0..1024u64 {
            let data = pattern(i, chunk);
            h.update(&data);
            f.write_all(&data).unwrap();
        }
        f.sync_all().unwrap();
    }
    let want = h.finalize();
    m.remount();
    let mut f = File::open(&p).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 30);
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; chunk];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    assert_eq!(h.finalize(), want);
}

#[test]
fn appends_reach_the_store_at_the_end_of_the_file() {
    // Read back from the daemon, not the page cache: through the writeback cache the
    // kernel places appends and writes pages back at their own offsets.
    for opts in [&[][..], &["nowriteback"][..]] {
        let mut m = Mount::with_options(opts);
        let p = m.path("log");
        fs::write(&p, b"abc").unwrap();
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"def").unwrap();
        f.sync_all().unwrap();
        f.write_all(b"ghi").unwrap();
        f.sync_all().unwrap();
        drop(f);
        drop_caches();
        assert_eq!(fs::read(&p).unwrap(), b"abcdefghi", "options {opts:?}");
        m.remount();
        assert_eq!(fs::read(&p).unwrap(), b"abcdefghi", "options {opts:?}");
    }
}

#[test]
fn open_flags_append_trunc_excl() {
    let m = Mount::new();
    let p = m.path("f");
    fs::write(&p, b"abc").unwrap();
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"def").unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"abcdef");
    let e = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all(b"x").unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"x");
    // Names: 255 bytes work, 256 do not.
    let long = "n".repeat(255);
    fs::write(m.path(&long), b"1").unwrap();
    assert_eq!(fs::read(m.path(&long)).unwrap(), b"1");
    let e = fs::write(m.path(&"n".repeat(256)), b"1").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
}

#[test]
fn hard_links_share_data_and_count() {
    let mut m = Mount::new();
    fs::write(m.path("a"), b"shared").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    fs::hard_link(m.path("a"), m.path("d/b")).unwrap();
    let (ma, mb) = (
        fs::metadata(m.path("a")).unwrap(),
        fs::metadata(m.path("d/b")).unwrap(),
    );
    assert_eq!(ma.ino(), mb.ino());
    assert_eq!(ma.nlink(), 2);
    fs::write(m.path("d/b"), b"changed").unwrap();
    assert_eq!(fs::read(m.path("a")).unwrap(), b"changed");
    // rename over another link of the same inode does nothing
    fs::rename(m.path("a"), m.path("d/b")).unwrap();
    assert!(m.path("a").exists());
    fs::remove_file(m.path("a")).unwrap();
    assert_eq!(fs::metadata(m.path("d/b")).unwrap().nlink(), 1);
    assert_eq!(
        fs::hard_link(m.path("d"), m.path("d2"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EPERM)
    );
    m.remount();
    assert_eq!(fs::read(m.path("d/b")).unwrap(), b"changed");
    assert_eq!(fs::metadata(m.path("d/b")).unwrap().nlink(), 1);
    assert!(m.fsck().status.success());
}

#[test]
fn unlinked_open_file_stays_readable_until_closed() {
    let m = Mount::new();
    fs::write(m.path("f"), pattern(3, 300_000)).unwrap();
    let mut f = File::open(m.path("f")).unwrap();
    fs::remove_file(m.path("f")).unwrap();
    assert!(!m.path("f").exists());
    let mut back = Vec::new();
    f.read_to_end(&mut back).unwrap();
    assert_eq!(back, pattern(3, 300_000));
    drop(f);
    m.status_with("stored bytes:     0\n");
}

#[test]
fn rename_every_case() {
    let m = Mount::new();
    let p = |s: &str| m.path(s);
    fs::create_dir_all(p("a/sub")).unwrap();
    fs::create_dir(p("b")).unwrap();
    fs::write(p("a/f"), b"f").unwrap();
    fs::write(p("b/g"), b"g").unwrap();

    // replace a file
    fs::rename(p("a/f"), p("b/g")).unwrap();
    assert_eq!(fs::read(p("b/g")).unwrap(), b"f");
    assert!(!p("a/f").exists());

    // directory across parents: link counts follow
    let (na, nb) = (
        fs::metadata(p("a")).unwrap().nlink(),
        fs::metadata(p("b")).unwrap().nlink(),
    );
    fs::rename(p("a/sub"), p("b/sub")).unwrap();
    assert_eq!(fs::metadata(p("a")).unwrap().nlink(), na - 1);
    assert_eq!(fs::metadata(p("b")).unwrap().nlink(), nb + 1);

    // a directory under itself
    fs::create_dir(p("b/sub/deep")).unwrap();
    assert_eq!(rename_err(&p("b/sub"), &p("b/sub/deep/x")), libc::EINVAL);
    assert_eq!(rename_err(&p("b"), &p("b/sub/deep/x")), libc::EINVAL);

    // replace an empty directory; refuse a non-empty one
    fs::create_dir(p("empty")).unwrap();
    fs::rename(p("b/sub/deep"), p("empty")).unwrap();
    assert!(p("empty").is_dir() && !p("b/sub/deep").exists());
    fs::create_dir(p("full")).unwrap();
    fs::write(p("full/x"), b"").unwrap();
    assert_eq!(rename_err(&p("empty"), &p("full")), libc::ENOTEMPTY);

    // kinds must agree
    assert_eq!(rename_err(&p("b/g"), &p("empty")), libc::EISDIR);
    assert_eq!(rename_err(&p("empty"), &p("b/g")), libc::ENOTDIR);
    assert_eq!(rename_err(&p("nonexistent"), &p("x")), libc::ENOENT);

    // RENAME_NOREPLACE
    fs::write(p("n1"), b"1").unwrap();
    fs::write(p("n2"), b"2").unwrap();
    assert_eq!(
        rename2(&p("n1"), &p("n2"), libc::RENAME_NOREPLACE),
        Err(libc::EEXIST)
    );
    rename2(&p("n1"), &p("n3"), libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(fs::read(p("n3")).unwrap(), b"1");

    // RENAME_EXCHANGE: a file and a directory in different parents
    let (ne, nb) = (
        fs::metadata(p("empty")).unwrap().ino(),
        fs::metadata(p("b")).unwrap().nlink(),
    );
    rename2(&p("b/g"), &p("empty"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(p("empty")).unwrap(), b"f");
    assert_eq!(fs::metadata(p("b/g")).unwrap().ino(), ne);
    assert!(p("b/g").is_dir());
    assert_eq!(
        fs::metadata(p("b")).unwrap().nlink(),
        nb + 1,
        "b gained a subdirectory"
    );
    assert_eq!(
        rename2(&p("n3"), &p("missing"), libc::RENAME_EXCHANGE),
        Err(libc::ENOENT)
    );
    assert_eq!(
        rename2(&p("b"), &p("b/sub/x"), libc::RENAME_EXCHANGE),
        Err(libc::ENOENT)
    );
    fs::create_dir(p("b/sub/y")).unwrap();
    assert_eq!(
        rename2(&p("b"), &p("b/sub/y"), libc::RENAME_EXCHANGE),
        Err(libc::EINVAL)
    );
    assert!(
        m.fsck().status.success(),
        "{}",
        String::from_utf8_lossy(&m.fsck().stdout)
    );
}

fn xattr_set(p: &Path, name: &str, v: &[u8], flags: i32) -> Result<(), i32> {
    let (p, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: valid pointers for the call.
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), flags) };
    if r == 0 { Ok(()) } else { Err(errno()) }
}

fn xattr_get(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let (p, n) = (cpath(p), CString::new(name).unwrap());
    let mut buf = vec![0u8; 70000];
    // SAFETY: valid pointers for the call.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(errno());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn xattr_list(p: &Path) -> Vec<String> {
    let p = cpath(p);
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid pointers for the call.
    let r = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0);
    buf[..r as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[test]
fn xattrs_set_get_list_remove_with_flags() {
    let mut m = Mount::new();
    let f = m.path("f");
    fs::write(&f, b"").unwrap();
    // A new file has none (answered without a lookup), until one is set.
    assert_eq!(xattr_list(&f), Vec::<String>::new());
    assert_eq!(xattr_get(&f, "user.a"), Err(libc::ENODATA));
    xattr_set(&f, "user.a", b"1", 0).unwrap();
    assert_eq!(xattr_get(&f, "user.a").unwrap(), b"1");
    xattr_set(&f, "trusted.b", b"", 0).unwrap();
    let big = pattern(9, 65536);
    xattr_set(&f, "security.big", &big, 0).unwrap();
    assert_eq!(
        xattr_set(&f, "user.a", b"2", libc::XATTR_CREATE),
        Err(libc::EEXIST)
    );
    assert_eq!(
        xattr_set(&f, "user.none", b"2", libc::XATTR_REPLACE),
        Err(libc::ENODATA)
    );
    xattr_set(&f, "user.a", b"3", libc::XATTR_REPLACE).unwrap();
    assert_eq!(xattr_get(&f, "user.a").unwrap(), b"3");
    assert_eq!(xattr_get(&f, "trusted.b").unwrap(), b"");
    assert_eq!(xattr_get(&f, "user.none"), Err(libc::ENODATA));
    assert_eq!(xattr_set(&f, "bogus.x", b"1", 0), Err(libc::EOPNOTSUPP));
    let mut names = xattr_list(&f);
    names.sort();
    assert_eq!(names, ["security.big", "trusted.b", "user.a"]);
    m.remount();
    assert_eq!(xattr_get(&f, "security.big").unwrap(), big);
    let c = cpath(&f);
    let n = CString::new("user.a").unwrap();
    // SAFETY: valid pointers.
    assert_eq!(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) }, 0);
    assert_eq!(xattr_get(&f, "user.a"), Err(libc::ENODATA));
    // SAFETY: valid pointers.
    assert_eq!(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) }, -1);
    assert_eq!(errno(), libc::ENODATA);
}

#[test]
fn permissions_hold_for_an_unprivileged_user() {
    let m = Mount::new();
    fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(m.path("private")).unwrap();
    fs::set_permissions(m.path("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(m.path("private/secret"), b"s").unwrap();
    fs::create_dir(m.path("open")).unwrap();
    fs::set_permissions(m.path("open"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(m.path("open/rootfile"), b"r").unwrap();
    fs::write(m.path("ro"), b"r").unwrap();
    fs::set_permissions(m.path("ro"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(m.path("open/suid"), b"s").unwrap();
    fs::set_permissions(m.path("open/suid"), fs::Permissions::from_mode(0o6777)).unwrap();

    let q = |s: &str| m.path(s).display().to_string();
    let denied = as_nobody(&format!("cat {}", q("private/secret")));
    assert!(
        !denied.status.success(),
        "0700 directory of root is closed to nobody"
    );
    assert!(
        !as_nobody(&format!("echo x >> {}", q("ro")))
            .status
            .success()
    );
    assert!(
        !as_nobody(&format!("chmod 777 {}", q("ro")))
            .status
            .success()
    );
    assert!(
        !as_nobody(&format!("rm -f {}", q("open/rootfile")))
            .status
            .success(),
        "sticky bit"
    );
    let ok = as_nobody(&format!("echo mine > {0} && chmod 600 {0}", q("open/mine")));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let md = fs::metadata(m.path("open/mine")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777),
        (65534, 65534, 0o600)
    );
    // a write by another user clears setuid and setgid
    let w = as_nobody(&format!("echo more >> {}", q("open/suid")));
    assert!(w.status.success());
    assert_eq!(
        fs::metadata(m.path("open/suid")).unwrap().mode() & 0o6000,
        0
    );
}

/// The kernel leaves set-id bits to snapfs (FUSE_HANDLE_KILLPRIV_V2): a write,
/// truncate or fallocate by a caller without CAP_FSETID drops them, as does any chown of
/// a file; set-group-id without group execute and directories keep theirs.
#[test]
fn set_id_bits_drop_as_on_a_local_filesystem() {
    let m = Mount::new();
    fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o777)).unwrap();
    let mode = |n: &str| fs::metadata(m.path(n)).unwrap().mode() & 0o7777;
    let make = |n: &str, perm: u32, owner: Option<u32>| {
        fs::write(m.path(n), b"data").unwrap();
        if let Some(uid) = owner {
            std::os::unix::fs::chown(m.path(n), Some(uid), None).unwrap();
        }
        fs::set_permissions(m.path(n), fs::Permissions::from_mode(perm)).unwrap();
        assert_eq!(mode(n), perm, "{n} set up");
    };
    let nobody = |script: &str| {
        let o = as_nobody(script);
        assert!(
            o.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let q = |s: &str| m.path(s).display().to_string();

    make("w", 0o4755, Some(65534));
    nobody(&format!("echo x >> {}", q("w")));
    assert_eq!(mode("w"), 0o755, "write by the owner, unprivileged");
    make("rw", 0o6775, None);
    fs::OpenOptions::new()
        .append(true)
        .open(m.path("rw"))
        .unwrap()
        .write_all(b"x")
        .unwrap();
    assert_eq!(mode("rw"), 0o6775, "root holds CAP_FSETID");

    make("t", 0o6777, None);
    nobody(&format!("truncate -s 100 {}", q("t")));
    assert_eq!(mode("t"), 0o777, "truncate by nobody");
    assert_eq!(fs::metadata(m.path("t")).unwrap().len(), 100);
    make("rt", 0o6755, None);
    fs::OpenOptions::new()
        .write(true)
        .open(m.path("rt"))
        .unwrap()
        .set_len(1)
        .unwrap();
    assert_eq!(mode("rt"), 0o6755, "truncate by root");
    make("o", 0o4777, None);
    nobody(&format!("echo y > {}", q("o")));
    assert_eq!(mode("o"), 0o777, "O_TRUNC open by nobody");
    make("f", 0o4755, Some(65534));
    nobody(&format!("fallocate -l 8192 {}", q("f")));
    assert_eq!(mode("f"), 0o755, "fallocate by nobody");

    make("cr", 0o4755, Some(65534));
    nobody(&format!(
        "/usr/bin/python3 -c 'import os; s = os.open(\"{0}\", os.O_RDONLY); d = os.open(\"{1}\", os.O_WRONLY); os.copy_file_range(s, d, 4)'",
        q("t"),
        q("cr")
    ));
    assert_eq!(mode("cr"), 0o755, "copy_file_range by nobody");

    // A file capability goes with an unprivileged write too (the kernel drops it).
    make("cap", 0o755, Some(65534));
    let o = Command::new("setcap")
        .args(["cap_net_raw+ep", &q("cap")])
        .output()
        .expect("setcap (apt-get install libcap2-bin)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(xattr_get(&m.path("cap"), "security.capability").is_ok());
    nobody(&format!("echo x >> {}", q("cap")));
    assert_eq!(
        xattr_get(&m.path("cap"), "security.capability"),
        Err(libc::ENODATA)
    );

    make("c", 0o6755, None);
    std::os::unix::fs::chown(m.path("c"), Some(65534), None).unwrap();
    assert_eq!(mode("c"), 0o755, "chown by root drops both");
    make("g", 0o2745, None);
    std::os::unix::fs::chown(m.path("g"), None, Some(65534)).unwrap();
    assert_eq!(
        mode("g"),
        0o2745,
        "set-group-id without group execute stays"
    );
    // ...unless a caller outside the file's group, without CAP_FSETID, changes it.
    make("gn", 0o2745, Some(65534));
    nobody(&format!("chgrp 65534 {}", q("gn")));
    assert_eq!(mode("gn"), 0o745, "chgrp by nobody, outside group 0");
    fs::create_dir(m.path("d")).unwrap();
    fs::set_permissions(m.path("d"), fs::Permissions::from_mode(0o6775)).unwrap();
    std::os::unix::fs::chown(m.path("d"), Some(65534), None).unwrap();
    assert_eq!(mode("d"), 0o6775, "directories keep theirs");

    // All of it is stored, not only cached by the kernel.
    let mut m = m;
    m.remount();
    let mode = |n: &str| fs::metadata(m.path(n)).unwrap().mode() & 0o7777;
    assert_eq!(
        ["w", "rw", "t", "rt", "o", "f", "cr", "c", "g", "gn"].map(mode),
        [
            0o755, 0o6775, 0o777, 0o6755, 0o777, 0o755, 0o755, 0o755, 0o2745, 0o745
        ]
    );
}

#[test]
fn default_acls_are_inherited_and_enforced() {
    let m = Mount::new();
    let d = m.path("shared");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o750)).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .expect("acl tools (apt-get install acl)");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ds = d.display().to_string();
    assert!(!as_nobody(&format!("ls {ds}")).status.success());
    run(&["setfacl", "-m", "u:nobody:rx", &ds]);
    assert!(
        as_nobody(&format!("ls {ds}")).status.success(),
        "named-user ACL grants access"
    );
    run(&["setfacl", "-d", "-m", "u:nobody:rw", &ds]);
    fs::write(d.join("child"), b"c").unwrap();
    let acl = run(&["getfacl", "-c", &d.join("child").display().to_string()]);
    assert!(acl.contains("user:nobody:rw-"), "inherited ACL:\n{acl}");
    fs::create_dir(d.join("subdir")).unwrap();
    let acl = run(&["getfacl", "-c", &d.join("subdir").display().to_string()]);
    assert!(
        acl.contains("default:user:nobody:rw-"),
        "subdirectories inherit the default:\n{acl}"
    );
    assert!(as_nobody(&format!("echo n >> {ds}/child")).status.success());
    // chmod narrows the mask
    run(&["chmod", "600", &d.join("child").display().to_string()]);
    assert!(!as_nobody(&format!("echo n >> {ds}/child")).status.success());
}

#[test]
fn special_files_and_symlinks() {
    let mut m = Mount::new();
    let c = |s: &str| cpath(&m.path(s));
    // SAFETY: valid paths.
    unsafe {
        assert_eq!(libc::mknod(c("fifo").as_ptr(), libc::S_IFIFO | 0o644, 0), 0);
        assert_eq!(
            libc::mknod(
                c("chr").as_ptr(),
                libc::S_IFCHR | 0o644,
                libc::makedev(1, 3)
            ),
            0
        );
        assert_eq!(
            libc::mknod(
                c("blk").as_ptr(),
                libc::S_IFBLK | 0o644,
                libc::makedev(8, 1)
            ),
            0
        );
        assert_eq!(
            libc::mknod(c("sock").as_ptr(), libc::S_IFSOCK | 0o644, 0),
            0
        );
    }
    std::os::unix::fs::symlink("target/../x", m.path("link")).unwrap();
    m.remount();
    let md = fs::symlink_metadata(m.path("chr")).unwrap();
    assert_eq!(md.mode() & libc::S_IFMT, libc::S_IFCHR);
    assert_eq!(md.rdev(), libc::makedev(1, 3));
    assert_eq!(
        fs::symlink_metadata(m.path("fifo")).unwrap().mode() & libc::S_IFMT,
        libc::S_IFIFO
    );
    assert_eq!(
        fs::symlink_metadata(m.path("sock")).unwrap().mode() & libc::S_IFMT,
        libc::S_IFSOCK
    );
    assert_eq!(
        fs::read_link(m.path("link")).unwrap(),
        Path::new("target/../x")
    );
}

#[test]
fn fallocate_punch_hole_and_copy_file_range_sharing() {
    let m = Mount::new();
    let src = m.path("src");
    let data = pattern(5, 8 << 20);
    fs::write(&src, &data).unwrap();
    let stored = |m: &Mount| -> u64 {
        let out = snapfs(&["status", m.mnt.to_str().unwrap()]);
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        s.lines()
            .find_map(|l| l.strip_prefix("stored bytes:"))
            .unwrap_or_else(|| panic!("no stored bytes in {s}"))
            .trim()
            .parse()
            .unwrap()
    };
    let before = stored(&m);
    assert_eq!(before, 8 << 20);
    let fin = File::open(&src).unwrap();
    let fout = File::create(m.path("dst")).unwrap();
    let mut copied = 0usize;
    while copied < data.len() {
        // SAFETY: valid descriptors, null offsets use the file positions.
        let n = unsafe {
            libc::copy_file_range(
                fin.as_raw_fd(),
                std::ptr::null_mut(),
                fout.as_raw_fd(),
                std::ptr::null_mut(),
                data.len() - copied,
                0,
            )
        };
        assert!(
            n > 0,
            "copy_file_range: {}",
            std::io::Error::last_os_error()
        );
        copied += n as usize;
    }
    drop(fout);
    assert!(fs::read(m.path("dst")).unwrap() == data);
    assert_eq!(stored(&m), before, "the copy shares extents");

    // punch a hole in the copy: zeros there, the source untouched, size unchanged
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("dst"))
        .unwrap();
    // SAFETY: valid descriptor.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            100_000,
            1_000_000,
        )
    };
    assert_eq!(r, 0);
    let back = fs::read(m.path("dst")).unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back[100_000..1_100_000].iter().all(|&b| b == 0));
    assert!(back[..100_000] == data[..100_000] && back[1_100_000..] == data[1_100_000..]);
    assert!(fs::read(&src).unwrap() == data);
    // plain fallocate extends the size
    // SAFETY: valid descriptor.
    assert_eq!(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 10 << 20) }, 0);
    assert_eq!(f.metadata().unwrap().len(), 10 << 20);
}

#[test]
fn statfs_reports_the_disk_under_the_store() {
    let m = Mount::new();
    let (a, b) = (vfs(&m.mnt), vfs(&m.store));
    assert_eq!(a.f_blocks * a.f_frsize, b.f_blocks * b.f_frsize);
    assert!(a.f_bavail > 0);
}

#[test]
fn seek_positions_and_directory_listing() {
    let m = Mount::new();
    fs::create_dir(m.path("d")).unwrap();
    for i in 0..500 {
        fs::write(m.path(&format!("d/file-{i:04}")), b"").unwrap();
    }
    let mut names: Vec<String> = fs::read_dir(m.path("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 500);
    assert_eq!(names[0], "file-0000");
    assert_eq!(
        fs::remove_dir(m.path("d")).unwrap_err().raw_os_error(),
        Some(libc::ENOTEMPTY)
    );
    let mut f = File::create(m.path("s")).unwrap();
    f.seek(SeekFrom::Start(70_000)).unwrap();
    f.write_all(b"z").unwrap();
    assert_eq!(f.metadata().unwrap().len(), 70_001);
}

#[test]
fn several_request_threads_serve_parallel_writers_correctly() {
    let mut m = Mount::with_options(&["threads=4"]);
    let handles: Vec<_> = (0..8u64)
        .map(|t| {
            let dir = m.mnt.join(format!("t{t}"));
            std::thread::spawn(move || {
                fs::create_dir(&dir).unwrap();
                for i in 0..40u64 {
                    let p = dir.join(format!("f{i}"));
                    fs::write(&p, pattern(t * 1000 + i, 70_000 + i as usize)).unwrap();
                    if i % 3 == 0 {
                        fs::rename(&p, dir.join(format!("r{i}"))).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    m.remount();
    for t in 0..8u64 {
        for i in 0..40u64 {
            let name = if i % 3 == 0 {
                format!("r{i}")
            } else {
                format!("f{i}")
            };
            let back = fs::read(m.path(&format!("t{t}/{name}"))).unwrap();
            assert!(
                back == pattern(t * 1000 + i, 70_000 + i as usize),
                "t{t}/{name}"
            );
        }
    }
    m.unmount();
    assert!(m.fsck().status.success());
}

/// The names a directory stream yields from where it stands to its end.
fn read_names(d: *mut libc::DIR) -> Vec<String> {
    let mut names = Vec::new();
    loop {
        // SAFETY: `d` is an open directory stream.
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            return names;
        }
        // SAFETY: readdir returned a valid entry whose name is NUL-terminated.
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
        names.push(name.to_string_lossy().into_owned());
    }
}

#[test]
fn rewinddir_sees_entries_made_after_opendir() {
    let m = Mount::new();
    std::fs::create_dir(m.path("d")).unwrap();
    std::fs::write(m.path("d/before"), b"x").unwrap();
    let path = std::ffi::CString::new(m.path("d").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    let d = unsafe { libc::opendir(path.as_ptr()) };
    assert!(!d.is_null());
    let mut first = read_names(d);
    first.sort();
    assert_eq!(first, [".", "..", "before"]);
    std::fs::write(m.path("d/after"), b"y").unwrap();
    std::fs::remove_file(m.path("d/before")).unwrap();
    // SAFETY: `d` is open.
    unsafe { libc::rewinddir(d) };
    let mut again = read_names(d);
    again.sort();
    // SAFETY: `d` is open, and closed once.
    unsafe { libc::closedir(d) };
    assert_eq!(again, [".", "..", "after"]);
    // Opened, filled, rewound before its first read (generic/471's order).
    // SAFETY: a NUL-terminated path.
    let d = unsafe { libc::opendir(path.as_ptr()) };
    assert!(!d.is_null());
    std::fs::write(m.path("d/later"), b"z").unwrap();
    // SAFETY: `d` is open.
    unsafe { libc::rewinddir(d) };
    let mut names = read_names(d);
    names.sort();
    // SAFETY: `d` is open, and closed once.
    unsafe { libc::closedir(d) };
    assert_eq!(names, [".", "..", "after", "later"]);
}

/// A file handle (struct file_handle with room for any handle FUSE makes).
#[repr(C)]
struct FileHandle {
    bytes: u32,
    kind: i32,
    f: [u8; 128],
}

/// The handle of `p`, as name_to_handle_at(2) gives it.
fn handle_of(p: &Path) -> FileHandle {
    let mut h = FileHandle {
        bytes: 128,
        kind: 0,
        f: [0; 128],
    };
    let mut mount_id = 0;
    let c = cpath(p);
    // SAFETY: a NUL-terminated path and a handle buffer of the size it says.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            c.as_ptr(),
            &mut h as *mut FileHandle,
            &mut mount_id as *mut i32,
            0,
        )
    };
    assert_eq!(r, 0, "name_to_handle_at {}: errno {}", p.display(), errno());
    h
}

/// open_by_handle_at(2) on the mount at `mnt`: the file's contents, or the errno.
fn read_by_handle(mnt: &Path, h: &FileHandle) -> Result<Vec<u8>, i32> {
    let dir = File::open(mnt).unwrap();
    // SAFETY: a valid handle buffer and an open descriptor of the mount.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            dir.as_raw_fd(),
            h as *const FileHandle,
            libc::O_RDONLY,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: a descriptor the call just opened, owned here alone.
    let mut f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    Ok(v)
}

#[test]
fn file_handles_stay_good_across_cache_drops_and_remounts() {
    let mut m = Mount::new();
    fs::create_dir(m.path("dir")).unwrap();
    fs::write(m.path("dir/kept"), b"kept bytes").unwrap();
    fs::write(m.path("dir/gone"), b"gone bytes").unwrap();
    let kept = handle_of(&m.path("dir/kept"));
    let gone = handle_of(&m.path("dir/gone"));
    let dir = handle_of(&m.path("dir"));
    fs::remove_file(m.path("dir/gone")).unwrap();
    drop_caches();
    assert_eq!(
        read_by_handle(&m.mnt, &kept).as_deref(),
        Ok(&b"kept bytes"[..])
    );
    assert_eq!(read_by_handle(&m.mnt, &gone), Err(libc::ESTALE));
    // A handle cannot be made up from an inode number: FUSE's handle is the node id
    // (two 32-bit words) and the generation, and another file's node id with this
    // one's generation is stale.
    fs::write(m.path("dir/other"), b"other bytes").unwrap();
    let other = handle_of(&m.path("dir/other"));
    let mut forged = FileHandle {
        bytes: kept.bytes,
        kind: kept.kind,
        f: kept.f,
    };
    forged.f[..8].copy_from_slice(&other.f[..8]);
    assert_ne!(
        forged.f[8..12],
        other.f[8..12],
        "generations differ per file"
    );
    drop_caches();
    assert_eq!(read_by_handle(&m.mnt, &forged), Err(libc::ESTALE));
    assert_eq!(
        read_by_handle(&m.mnt, &other).as_deref(),
        Ok(&b"other bytes"[..])
    );
    m.unmount();
    m.mount(&[]);
    assert_eq!(
        read_by_handle(&m.mnt, &kept).as_deref(),
        Ok(&b"kept bytes"[..])
    );
    assert_eq!(read_by_handle(&m.mnt, &gone), Err(libc::ESTALE));
    // A directory's handle opens it, and its ".." leads to the root.
    let d = {
        let dfd = File::open(&m.mnt).unwrap();
        // SAFETY: as above.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                dfd.as_raw_fd(),
                &dir as *const FileHandle,
                libc::O_RDONLY | libc::O_DIRECTORY,
            )
        };
        assert!(
            fd >= 0,
            "open_by_handle_at of a directory: errno {}",
            errno()
        );
        // SAFETY: as above.
        unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
    };
    let up = format!("/proc/self/fd/{}/..", d.as_raw_fd());
    let root = fs::metadata(&m.mnt).unwrap();
    let parent = fs::metadata(&up).unwrap();
    assert_eq!(parent.ino(), root.ino());
    drop(d);
    // A file in a snapshot has a handle while the snapshot is shown; once it is
    // deleted, the handle is stale (it reaches no deleted epoch).
    let out = snapfs(&["snapshot", "create", m.mnt.to_str().unwrap(), "s"]);
    assert!(out.status.success());
    let snap = handle_of(&m.path(".snapshots/s/dir/kept"));
    drop_caches();
    assert_eq!(
        read_by_handle(&m.mnt, &snap).as_deref(),
        Ok(&b"kept bytes"[..])
    );
    let out = snapfs(&["snapshot", "delete", m.mnt.to_str().unwrap(), "s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop_caches();
    assert_eq!(read_by_handle(&m.mnt, &snap), Err(libc::ESTALE));
}

#[test]
fn writes_by_others_drop_set_id_bits_and_stat_shows_it_at_once() {
    let m = Mount::new();
    let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
    // (mode before, mode after a write by someone outside the file's group who
    // lacks CAP_FSETID): set-user-id always goes; set-group-id goes too, with group
    // execute or without (the writer is not in the group: Linux 6.2 and later).
    for (i, (before, after)) in [
        (0o6666, 0o666),
        (0o6676, 0o676),
        (0o6766, 0o766),
        (0o2666, 0o666),
    ]
    .into_iter()
    .enumerate()
    {
        for (how, cmd) in [
            ("fallocate", "fallocate -l 8192 {}"),
            ("punch hole", "fallocate -p -o 0 -l 4096 {}"),
            (
                "direct write",
                "dd if=/dev/zero of={} bs=4096 count=1 oflag=direct conv=notrunc status=none",
            ),
        ] {
            let p = m.path(&format!("f{i}-{}", how.replace(' ', "-")));
            fs::write(&p, vec![1u8; 8192]).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(before)).unwrap();
            // The kernel caches the mode it saw.
            assert_eq!(mode(&p), before);
            let out = as_nobody(&cmd.replace("{}", p.to_str().unwrap()));
            assert!(
                out.status.success(),
                "{how}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(mode(&p), after, "{how} on a {before:o} file");
        }
    }
}

#[test]
fn an_acl_set_by_the_owner_outside_the_group_drops_set_group_id() {
    let m = Mount::new();
    for (name, inside) in [("outside", false), ("inside", true)] {
        let p = m.path(name);
        fs::write(&p, b"x").unwrap();
        // Owned by nobody; its group is root's, or nobody's own.
        let gid = if inside { 65534 } else { 0 };
        std::os::unix::fs::chown(&p, Some(65534), Some(gid)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o2777)).unwrap();
        let out = as_nobody(&format!("setfacl -m u:4321:r {}", p.display()));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = if inside { 0o2777 } else { 0o777 };
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, want, "{name}");
    }
}

#[test]
fn an_open_directory_removed_or_renamed_over_still_answers_fstat() {
    let mut m = Mount::new();
    fs::create_dir(m.path("gone")).unwrap();
    fs::create_dir(m.path("over")).unwrap();
    fs::create_dir(m.path("src")).unwrap();
    let gone = File::open(m.path("gone")).unwrap();
    let over = File::open(m.path("over")).unwrap();
    fs::remove_dir(m.path("gone")).unwrap();
    fs::rename(m.path("src"), m.path("over")).unwrap();
    for (name, f) in [("removed", &gone), ("renamed over", &over)] {
        let st = f
            .metadata()
            .unwrap_or_else(|e| panic!("{name}: fstat: {e}"));
        assert!(st.is_dir(), "{name}");
        assert_eq!(st.nlink(), 0, "{name}");
    }
    drop((gone, over));
    m.unmount();
    // Closed, they went: nothing is left behind.
    let f = snapfs(&["fsck", m.store.to_str().unwrap()]);
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stdout));
}

#[test]
fn fallocate_of_more_than_the_free_space_is_refused() {
    let m = Mount::new();
    let f = create_rw(&m.path("big"));
    let free = {
        let st = vfs(&m.mnt);
        st.f_bavail * st.f_frsize
    };
    // SAFETY: fallocate(2) on a descriptor we own.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, (free * 2) as i64) };
    assert_eq!((r, errno()), (-1, libc::ENOSPC));
    assert_eq!(f.metadata().unwrap().len(), 0, "nothing changed");
    // What fits is given.
    // SAFETY: as above.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 1 << 20) };
    assert_eq!(r, 0, "errno {}", errno());
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
}

#[test]
fn a_directory_read_first_from_the_middle_lists_the_rest() {
    let m = Mount::new();
    fs::create_dir(m.path("d")).unwrap();
    for i in 0..20 {
        fs::write(m.path(&format!("d/f{i:02}")), b"x").unwrap();
    }
    let path = cpath(&m.path("d"));
    // Where each entry is, and its name.
    let mut at = Vec::new();
    // SAFETY: a NUL-terminated path; the stream is read, then closed once.
    unsafe {
        let d = libc::opendir(path.as_ptr());
        assert!(!d.is_null());
        loop {
            let pos = libc::telldir(d);
            let e = libc::readdir(d);
            if e.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*e).d_name.as_ptr());
            at.push((pos, name.to_string_lossy().into_owned()));
        }
        libc::closedir(d);
    }
    assert_eq!(at.len(), 22);
    // A new stream, the kernel's cached listing gone, whose first read starts at
    // the tenth entry (as knfsd reads a directory, one request at a time).
    drop_caches();
    let (pos, _) = &at[10];
    // SAFETY: as above.
    let rest = unsafe {
        let d = libc::opendir(path.as_ptr());
        assert!(!d.is_null());
        libc::seekdir(d, *pos);
        let names = read_names(d);
        libc::closedir(d);
        names
    };
    let want: Vec<String> = at[10..].iter().map(|(_, n)| n.clone()).collect();
    assert_eq!(rest, want);
}

#[test]
fn st_blocks_counts_the_data_a_file_holds_not_its_holes() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let mut m = Mount::new();
    let kib = |p: &Path| fs::metadata(p).unwrap().blocks() / 2;
    // 50 KiB at 1600 KiB: a sparse file (xfstests' own probe for sparse files).
    let sparse = m.path("sparse");
    let f = create_rw(&sparse);
    // What the kernel's page cache holds and has not written back is not the
    // daemon's to count: an open file with a size shows every page of it rather than
    // none (which `tar --sparse` would take for all hole); closing writes it back.
    f.write_all_at(&pattern(1, 51200), 1_638_400).unwrap();
    assert!(
        f.metadata().unwrap().blocks() > 0,
        "open, written, not flushed"
    );
    drop(f);
    assert_eq!(kib(&sparse), 52);
    // A byte takes a page; a file of zeros written out takes nothing.
    fs::write(m.path("byte"), b"x").unwrap();
    assert_eq!(kib(&m.path("byte")), 4);
    fs::write(m.path("zeros"), vec![0u8; 1 << 20]).unwrap();
    // (Until the kernel's release of the closed file arrives, an open file with no
    // stored block shows a page.)
    let settles = |p: &Path, want: u64| {
        // (The kernel is told to drop its cached count at the release; the attribute
        // timeout, 10 s, bounds it anyway.)
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(12);
        while kib(p) != want && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(kib(p), want, "{}", p.display());
    };
    settles(&m.path("zeros"), 0);
    // A full file, then a hole punched in it, then a page written into the hole.
    let full = m.path("full");
    fs::write(&full, pattern(2, 4 << 20)).unwrap();
    assert_eq!(kib(&full), 4096);
    snapfs_ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "s1"]);
    let f = fs::OpenOptions::new().write(true).open(&full).unwrap();
    // SAFETY: fallocate(2) on a descriptor we own.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            1 << 20,
            2 << 20,
        )
    };
    assert_eq!(r, 0, "errno {}", errno());
    assert_eq!(kib(&full), 2048);
    f.write_all_at(b"y", (2 << 20) + 5).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(kib(&full), 2052);
    // The snapshot still holds what it froze; a truncate frees the live file's.
    let snap = m.path(".snapshots/s1/full");
    assert_eq!(kib(&snap), 4096);
    fs::OpenOptions::new()
        .write(true)
        .open(&full)
        .unwrap()
        .set_len(0)
        .unwrap();
    settles(&full, 0);
    // Counted afresh from the store after a remount.
    m.remount();
    assert_eq!(kib(&sparse), 52);
    assert_eq!(kib(&m.path("byte")), 4);
    assert_eq!(kib(&snap), 4096);
    assert_eq!(kib(&full), 0);
    m.assert_fsck_clean();
}

#[test]
fn rename_whiteout_leaves_a_whiteout_device_at_the_old_name() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut m = Mount::new();
    fs::write(m.path("a"), b"moved").unwrap();
    fs::write(m.path("b"), b"replaced").unwrap();
    rename2(&m.path("a"), &m.path("b"), libc::RENAME_WHITEOUT).unwrap();
    assert_eq!(fs::read(m.path("b")).unwrap(), b"moved");
    let check = |m: &Mount| {
        let w = fs::symlink_metadata(m.path("a")).unwrap();
        assert!(w.file_type().is_char_device());
        assert_eq!((w.rdev(), w.mode() & 0o7777, w.nlink()), (0, 0, 1));
        assert_ne!(w.ino(), fs::metadata(m.path("b")).unwrap().ino());
    };
    check(&m);
    // Into a new name in another directory, and refused with RENAME_EXCHANGE.
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("c"), b"c").unwrap();
    rename2(&m.path("c"), &m.path("d/c"), libc::RENAME_WHITEOUT).unwrap();
    assert!(
        fs::symlink_metadata(m.path("c"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert_eq!(
        rename2(
            &m.path("b"),
            &m.path("d/c"),
            libc::RENAME_WHITEOUT | libc::RENAME_EXCHANGE
        ),
        Err(libc::EINVAL)
    );
    m.remount();
    check(&m);
    fs::remove_file(m.path("a")).unwrap();
    m.assert_fsck_clean();
}

#[test]
fn o_tmpfile_makes_an_unnamed_file_that_linkat_can_name() {
    use std::os::unix::fs::MetadataExt;
    let mut m = Mount::new();
    let dir = cpath(&m.mnt);
    let tmpfile = |extra: i32| -> File {
        // SAFETY: open(2) of a NUL-terminated path; the descriptor is owned below.
        let fd = unsafe { libc::open(dir.as_ptr(), libc::O_TMPFILE | libc::O_RDWR | extra, 0o640) };
        assert!(fd >= 0, "O_TMPFILE: {}", std::io::Error::last_os_error());
        // SAFETY: a descriptor just opened and owned by nobody else.
        unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
    };
    let data = pattern(7, 300_000);
    let f = tmpfile(0);
    f.write_all_at(&data, 0).unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(
        (md.nlink(), md.mode() & 0o7777, md.len()),
        (0, 0o640, 300_000)
    );
    assert!(fs::read_dir(&m.mnt).unwrap().next().is_none(), "no name");
    // linkat(AT_EMPTY_PATH) gives it a name; the data is there under it.
    let name = cpath(&m.path("named"));
    let empty = CString::new("").unwrap();
    // SAFETY: valid descriptor and NUL-terminated paths.
    let r = unsafe {
        libc::linkat(
            f.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            name.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    assert_eq!(r, 0, "linkat: {}", std::io::Error::last_os_error());
    assert_eq!(f.metadata().unwrap().nlink(), 1);
    drop(f);
    assert!(fs::read(m.path("named")).unwrap() == data);
    // O_EXCL: never linkable.
    let f = tmpfile(libc::O_EXCL);
    let name2 = cpath(&m.path("never"));
    // SAFETY: as above.
    let r = unsafe {
        libc::linkat(
            f.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            name2.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    assert_eq!((r, errno()), (-1, libc::ENOENT));
    // An unnamed file's data goes when it is closed.
    f.write_all_at(&pattern(8, 4 << 20), 0).unwrap();
    f.sync_all().unwrap();
    m.status_with(&format!("stored bytes:     {}\n", 300_000 + (4 << 20)));
    drop(f);
    m.status_with("stored bytes:     300000\n");
    m.remount();
    assert!(fs::read(m.path("named")).unwrap() == data);
    m.assert_fsck_clean();
    // One left open when the daemon dies is freed at the next mount.
    let f = tmpfile(0);
    f.write_all_at(&pattern(9, 1 << 20), 0).unwrap();
    f.sync_all().unwrap();
    std::mem::forget(f);
    m.kill9();
    m.mount(&[]);
    m.assert_fsck_clean();
    let names: Vec<_> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["named"]);
}

#[test]
fn statx_gives_the_creation_time() {
    let mut m = Mount::new();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    fs::write(m.path("f"), b"x").unwrap();
    let btime = |p: &Path| -> (u32, i64, u32, i64) {
        let c = cpath(p);
        // SAFETY: an all-zero statx is a valid out buffer.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: valid path and buffer.
        let r = unsafe {
            libc::statx(
                libc::AT_FDCWD,
                c.as_ptr(),
                0,
                libc::STATX_BASIC_STATS | libc::STATX_BTIME,
                &mut st,
            )
        };
        assert_eq!(r, 0, "statx: {}", std::io::Error::last_os_error());
        (
            st.stx_mask & libc::STATX_BTIME,
            st.stx_btime.tv_sec,
            st.stx_mode as u32,
            st.stx_mtime.tv_sec,
        )
    };
    let (mask, born, mode, _) = btime(&m.path("f"));
    assert_eq!(mask, libc::STATX_BTIME);
    assert!(
        (before - 1..=before + 2).contains(&born),
        "btime {born}, now {before}"
    );
    assert_eq!(mode & libc::S_IFMT, libc::S_IFREG);
    // Later writes move mtime, never btime; it survives a remount and shows in snapshots.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    fs::write(m.path("f"), b"y").unwrap();
    let (_, again, _, mtime) = btime(&m.path("f"));
    assert_eq!(again, born);
    assert!(mtime > born);
    snapfs_ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "s"]);
    m.remount();
    assert_eq!(btime(&m.path("f")).1, born);
    assert_eq!(btime(&m.path(".snapshots/s/f")).1, born);
}

#[test]
fn access_times_follow_relatime_strictatime_noatime_and_nodiratime() {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let atime = |p: &Path| {
        let md = fs::metadata(p).unwrap();
        (md.atime(), md.atime_nsec())
    };
    let pause = || std::thread::sleep(std::time::Duration::from_millis(1100));
    let read = |p: &Path| drop(fs::read(p).unwrap());
    // relatime, the default: the first read after a change moves it, the next not.
    let mut m = Mount::new();
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/f"), b"data").unwrap();
    let (f, d) = (m.path("d/f"), m.path("d"));
    let (t0, d0) = (atime(&f), atime(&d));
    pause();
    read(&f);
    let t1 = atime(&f);
    assert!(
        t1 > t0,
        "a read after the write moves atime: {t0:?} then {t1:?}"
    );
    assert_eq!(atime(&d), d0, "a lookup is no access to the directory");
    pause();
    read(&f);
    assert_eq!(atime(&f), t1, "relatime: once per change");
    // O_NOATIME asks for none (the daemon's own opens to wait for write-back use it).
    fs::write(&f, b"changed").unwrap();
    let t1 = atime(&f);
    pause();
    drop(
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOATIME)
            .open(&f)
            .unwrap(),
    );
    assert_eq!(atime(&f), t1, "O_NOATIME");
    read(&f);
    let t1 = atime(&f);
    fs::read_dir(&d).unwrap().for_each(drop);
    let d1 = atime(&d);
    assert!(d1 > d0, "listing a changed directory moves its atime");
    // O_NOATIME on a directory too (the daemon opens the root so for syncfs).
    fs::write(d.join("another"), b"x").unwrap();
    let d1 = atime(&d);
    pause();
    drop(
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOATIME | libc::O_DIRECTORY)
            .open(&d)
            .unwrap(),
    );
    assert_eq!(atime(&d), d1, "O_NOATIME on a directory");
    fs::read_dir(&d).unwrap().for_each(drop);
    assert!(atime(&d) > d1, "a plain listing after it does move it");
    // The time is the store's, not just the kernel's.
    m.remount();
    assert_eq!(atime(&f), t1);
    // strictatime: every read.
    m.unmount();
    m.mount(&["strictatime"]);
    pause();
    read(&f);
    let t2 = atime(&f);
    assert!(t2 > t1);
    pause();
    read(&f);
    assert!(atime(&f) > t2, "strictatime: every read");
    // noatime: none; nodiratime: none for directories.
    m.unmount();
    m.mount(&["noatime"]);
    let t3 = atime(&f);
    pause();
    read(&f);
    fs::read_dir(&d).unwrap().for_each(drop);
    assert_eq!(atime(&f), t3);
    m.unmount();
    m.mount(&["strictatime,nodiratime"]);
    let d3 = atime(&d);
    pause();
    fs::read_dir(&d).unwrap().for_each(drop);
    assert_eq!(atime(&d), d3);
    read(&f);
    assert!(atime(&f) > t3, "nodiratime leaves files alone");
    // A read-only mount moves nothing.
    let t4 = atime(&f);
    m.unmount();
    m.mount(&["ro,strictatime"]);
    pause();
    read(&f);
    fs::read_dir(&d).unwrap().for_each(drop);
    assert_eq!((atime(&f), atime(&d)), (t4, d3));
}

fn get_flags(p: &Path) -> Result<u32, i32> {
    let f = File::open(p).map_err(|e| e.raw_os_error().unwrap())?;
    let mut v: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes an int through the pointer.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut v) };
    if r == 0 { Ok(v as u32) } else { Err(errno()) }
}

fn set_flags(p: &Path, flags: u32) -> Result<(), i32> {
    let f = File::open(p).map_err(|e| e.raw_os_error().unwrap())?;
    let v = flags as libc::c_int;
    // SAFETY: FS_IOC_SETFLAGS reads an int through the pointer.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &v) };
    if r == 0 { Ok(()) } else { Err(errno()) }
}

#[test]
fn immutable_and_append_only_flags_are_kept_and_enforced() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    const IMMUTABLE: u32 = 0x10;
    const APPEND: u32 = 0x20;
    const NODUMP: u32 = 0x40;
    const NOATIME: u32 = 0x80;
    let eperm = |r: std::io::Result<()>| {
        assert_eq!(r.map_err(|e| e.raw_os_error()), Err(Some(libc::EPERM)));
    };
    let mut m = Mount::with_options(&["strictatime"]);
    let (f, d) = (m.path("f"), m.path("d"));
    fs::write(&f, b"kept").unwrap();
    fs::create_dir(&d).unwrap();
    fs::write(m.path("d/in"), b"x").unwrap();
    xattr_set(&f, "user.a", b"1", 0).unwrap();
    assert_eq!(get_flags(&f), Ok(0));
    let ctime = fs::metadata(&f).unwrap().ctime_nsec();
    std::thread::sleep(std::time::Duration::from_millis(20));
    set_flags(&f, IMMUTABLE | NODUMP).unwrap();
    set_flags(&d, IMMUTABLE).unwrap();
    assert_eq!(get_flags(&f), Ok(IMMUTABLE | NODUMP));
    // Immutable: read, nothing else.
    assert_eq!(fs::read(&f).unwrap(), b"kept");
    for opts in [
        fs::OpenOptions::new().write(true).clone(),
        fs::OpenOptions::new().append(true).clone(),
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .truncate(true)
            .clone(),
    ] {
        eperm(opts.open(&f).map(drop));
    }
    eperm(fs::remove_file(&f));
    eperm(fs::rename(&f, m.path("g")));
    eperm(fs::hard_link(&f, m.path("g")));
    eperm(fs::set_permissions(&f, fs::Permissions::from_mode(0o600)));
    eperm(std::os::unix::fs::chown(&f, Some(1), None));
    // SAFETY: truncate(2) of a NUL-terminated path.
    let r = unsafe { libc::truncate(cpath(&f).as_ptr(), 0) };
    assert_eq!((r, errno()), (-1, libc::EPERM));
    assert_eq!(xattr_set(&f, "user.a", b"2", 0), Err(libc::EPERM));
    // SAFETY: utimes(2) with a NUL-terminated path and no times (now).
    let r = unsafe { libc::utimes(cpath(&f).as_ptr(), std::ptr::null()) };
    assert_eq!((r, errno()), (-1, libc::EPERM));
    // An immutable directory takes no new entry and loses none.
    eperm(fs::write(m.path("d/new"), b"").map(drop));
    eperm(fs::create_dir(m.path("d/sub")));
    eperm(fs::remove_file(m.path("d/in")));
    eperm(fs::rename(m.path("d/in"), m.path("out")));
    assert_eq!(fs::read(m.path("d/in")).unwrap(), b"x");
    // Only a holder of CAP_LINUX_IMMUTABLE changes it, and only the owner sets flags.
    let out = as_nobody(&format!("chattr -i {} 2>&1", f.display()));
    assert!(!out.status.success());
    assert_eq!(get_flags(&f), Ok(IMMUTABLE | NODUMP));
    // Flags snapfs does not keep are refused (FS_COMPR_FL).
    assert_eq!(set_flags(&f, 0x4), Err(libc::EOPNOTSUPP));
    // Kept across a remount, and in a snapshot.
    snapfs_ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "s"]);
    m.remount();
    assert_eq!(get_flags(&f), Ok(IMMUTABLE | NODUMP));
    // The change time moved (the kernel keeps a regular file's own ctime while it is
    // cached under the writeback cache, and takes the store's when it loads it).
    assert_ne!(
        fs::metadata(&f).unwrap().ctime_nsec(),
        ctime,
        "chattr moves ctime"
    );
    assert_eq!(get_flags(&m.path(".snapshots/s/f")), Ok(IMMUTABLE | NODUMP));
    assert_eq!(set_flags(&m.path(".snapshots/s/f"), 0), Err(libc::EROFS));
    eperm(fs::remove_file(&f));
    set_flags(&f, 0).unwrap();
    set_flags(&d, 0).unwrap();
    fs::write(m.path("d/new"), b"").unwrap();
    // Append-only: writes at the end only, no truncate, no removal.
    set_flags(&f, APPEND).unwrap();
    eperm(fs::OpenOptions::new().write(true).open(&f).map(drop));
    let mut h = fs::OpenOptions::new().append(true).open(&f).unwrap();
    h.write_all(b" more").unwrap();
    h.sync_all().unwrap();
    eperm(h.set_len(0));
    drop(h);
    assert_eq!(fs::read(&f).unwrap(), b"kept more");
    eperm(fs::remove_file(&f));
    eperm(fs::set_permissions(&f, fs::Permissions::from_mode(0o600)));
    // Touching it (times to now) is allowed, as on a local filesystem.
    // SAFETY: utimes(2) with a NUL-terminated path and no times (now).
    assert_eq!(
        unsafe { libc::utimes(cpath(&f).as_ptr(), std::ptr::null()) },
        0
    );
    // O_APPEND cleared with fcntl (the kernel knows nothing of the flag): a write
    // below the end never lands, nor does a copy into the file.
    let h = fs::OpenOptions::new().append(true).open(&f).unwrap();
    // SAFETY: fcntl(2) on a descriptor we own.
    assert_eq!(unsafe { libc::fcntl(h.as_raw_fd(), libc::F_SETFL, 0) }, 0);
    let landed = h.write_all_at(b"XXXX", 0).and_then(|_| h.sync_all());
    assert!(
        landed.is_err(),
        "an overwrite of an append-only file was kept"
    );
    drop(h);
    let src = m.path("src");
    fs::write(&src, b"YYYY").unwrap();
    let (i, o) = (
        File::open(&src).unwrap(),
        fs::OpenOptions::new().append(true).open(&f).unwrap(),
    );
    // SAFETY: fcntl(2) and copy_file_range(2) on descriptors we own.
    unsafe { libc::fcntl(o.as_raw_fd(), libc::F_SETFL, 0) };
    let mut at: i64 = 0;
    // SAFETY: as above; `at` is a valid offset pointer.
    let n = unsafe {
        libc::copy_file_range(
            i.as_raw_fd(),
            std::ptr::null_mut(),
            o.as_raw_fd(),
            &mut at,
            4,
            0,
        )
    };
    assert_eq!((n, errno()), (-1, libc::EPERM));
    drop((i, o));
    drop_caches();
    assert_eq!(fs::read(&f).unwrap(), b"kept more");
    // A set mtime alone is refused too (utimensat with UTIME_OMIT for atime).
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 1000,
            tv_nsec: 0,
        },
    ];
    // SAFETY: utimensat(2) with a NUL-terminated path and two timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, cpath(&f).as_ptr(), times.as_ptr(), 0) };
    assert_eq!((r, errno()), (-1, libc::EPERM));
    set_flags(&f, 0).unwrap();
    // No-atime: reads leave the access time even under strictatime.
    set_flags(&f, NOATIME).unwrap();
    let before = fs::metadata(&f).unwrap().atime_nsec();
    std::thread::sleep(std::time::Duration::from_millis(50));
    drop(fs::read(&f).unwrap());
    assert_eq!(fs::metadata(&f).unwrap().atime_nsec(), before);
    set_flags(&f, 0).unwrap();
    fs::remove_file(&f).unwrap();
    m.assert_fsck_clean();
}

#[test]
fn without_the_writeback_cache_a_descriptor_opened_before_chattr_i_cannot_write() {
    let m = Mount::with_options(&["nowriteback"]);
    let f = m.path("f");
    let mut h = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&f)
        .unwrap();
    h.write_all(b"before").unwrap();
    set_flags(&f, 0x10).unwrap();
    let e = h.write_all(b" after").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    drop(h);
    set_flags(&f, 0).unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"before");
}

#[test]
fn fallocated_blocks_count_as_allocated_read_as_zeros_and_seek_as_holes() {
    let mut m = Mount::new();
    let kib = |p: &Path| fs::metadata(p).unwrap().blocks() / 2;
    let falloc = |f: &File, mode: i32, off: i64, len: i64| {
        // SAFETY: fallocate(2) on a descriptor we own.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) };
        assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    };
    // xfstests generic/568: a write into an allocated range takes no more space.
    let p = m.path("small");
    let f = create_rw(&p);
    falloc(&f, 0, 4095, 2);
    drop(f);
    assert_eq!(kib(&p), 8);
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(b"ab", 4095).unwrap();
    drop(f);
    assert_eq!(kib(&p), 8);
    assert_eq!(&fs::read(&p).unwrap()[4094..], b"\0ab");
    // xfstests generic/701: allocated, then cut by a truncate.
    let p = m.path("big");
    let f = create_rw(&p);
    falloc(&f, 0, 0, 5 << 20);
    assert_eq!(f.metadata().unwrap().len(), 5 << 20);
    f.set_len(4 << 20).unwrap();
    drop(f);
    assert_eq!(kib(&p), 4096);
    assert!(fs::read(&p).unwrap().iter().all(|b| *b == 0));
    // Beyond the end with KEEP_SIZE: counted, the size unchanged.
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    falloc(&f, libc::FALLOC_FL_KEEP_SIZE, 4 << 20, 1 << 20);
    assert_eq!(f.metadata().unwrap().len(), 4 << 20);
    drop(f);
    assert_eq!(kib(&p), 5120);
    // Nothing is stored for them, and they survive a remount; fsck is clean.
    // (The small file's write-back is its two pages, stored as one extent.)
    m.status_with("stored bytes:     4097\n");
    m.remount();
    assert_eq!((kib(&m.path("small")), kib(&p)), (8, 5120));
    m.assert_fsck_clean();
    // Without the writeback cache SEEK_DATA answers from the store: an allocated
    // block nothing wrote is a hole, as an unwritten extent is on ext4 and XFS.
    m.unmount();
    m.mount(&["nowriteback"]);
    let f = File::open(&p).unwrap();
    // SAFETY: lseek(2) on a descriptor we own.
    let r = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    assert_eq!(
        (r, errno()),
        (-1, libc::ENXIO),
        "all allocated, nothing written"
    );
}

#[test]
fn a_process_in_a_removed_directory_can_still_leave_it() {
    // xfstests generic/011 (dirstress): another process removes the working
    // directory; chdir("..") out of it still works, as on a local filesystem.
    let m = Mount::new();
    fs::create_dir_all(m.path("top/d")).unwrap();
    let child = Command::new("sh")
        .arg("-c")
        // (After the kernel's cached attributes of the removed directory expire: it
        // asks for them then.)
        .arg("cd d && while [ ! -e ../../go ]; do sleep 0.02; done && sleep 11 && cd -P .. && pwd -P")
        .current_dir(m.path("top"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    fs::remove_dir(m.path("top/d")).unwrap();
    fs::write(m.path("go"), b"").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "cd .. out of a removed directory: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        m.path("top").to_str().unwrap()
    );
}

/// Punches a hole of `len` bytes at `off` in `f`, keeping its size.
fn punch(f: &File, off: u64, len: u64) {
    // SAFETY: plain fallocate(2) on an open descriptor.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as i64,
            len as i64,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
}

/// A store made with another block size (`-o block_size=`, 4K to 1M) keeps every
/// byte as one of 64K does: writes across, inside and far past blocks, a short tail,
/// a punched hole and copy_file_range, read back through the page cache, after the
/// caches are dropped and after a remount, with a snapshot keeping what it froze.
/// The size is the store's once it holds anything: a remount without the option
/// keeps it, and another size is refused in one line.
#[test]
fn a_store_of_any_block_size_reads_back_what_was_written() {
    for (opt, bs, other) in [("4K", 4096u64, "64K"), ("1M", 1 << 20, "4K")] {
        let mut m = Mount::with_options(&[&format!("block_size={opt}")]);
        let shown = m.status_with("block size:");
        assert!(
            shown.contains(&format!("block size:       {bs}\n")),
            "{shown}"
        );
        let f = create_rw(&m.path("f"));
        let mut model = Vec::new();
        let writes = [
            (0, 3 * bs / 2),
            (bs - 7, 100),
            (5 * bs + 13, 2 * bs + 1),
            (bs / 2, 11),
            (9 * bs, bs),
        ];
        for (seed, (off, len)) in writes.into_iter().enumerate() {
            write_modelled(&f, &mut model, off, &pattern(seed as u64 + 1, len as usize));
        }
        // A short tail: the last block is a short extent.
        let len = 7 * bs + 123;
        f.set_len(len).unwrap();
        model.resize(len as usize, 0);
        f.sync_all().unwrap();
        assert_eq!(fs::metadata(m.path("f")).unwrap().blksize(), bs);
        assert_eq!(fs::read(m.path("f")).unwrap(), model, "block size {opt}");
        fs::create_dir(m.path(".snapshots/one")).unwrap();
        let frozen = model.clone();

        // After the snapshot: a hole punched across a block boundary, a write inside
        // one block, and a copy from one unaligned offset to another.
        punch(&f, bs / 2, bs);
        model[(bs / 2) as usize..(3 * bs / 2) as usize].fill(0);
        write_modelled(&f, &mut model, 2 * bs + 5, &pattern(99, 17));
        let g = create_rw(&m.path("g"));
        let mut copy = vec![0u8; 3];
        copy.extend_from_slice(&model[(bs - 3) as usize..(4 * bs + 2) as usize]);
        let (mut from, mut to) = ((bs - 3) as i64, 3i64);
        let mut left = (3 * bs + 5) as usize;
        while left > 0 {
            // SAFETY: copy_file_range(2) between two open descriptors with offsets
            // this frame owns.
            let n = unsafe {
                libc::copy_file_range(f.as_raw_fd(), &mut from, g.as_raw_fd(), &mut to, left, 0)
            };
            assert!(n > 0, "{}", std::io::Error::last_os_error());
            left -= n as usize;
        }
        f.sync_all().unwrap();
        g.sync_all().unwrap();
        drop((f, g));
        assert_eq!(fs::read(m.path("f")).unwrap(), model, "block size {opt}");
        assert_eq!(fs::read(m.path("g")).unwrap(), copy, "block size {opt}");
        drop_caches();
        assert_eq!(fs::read(m.path(".snapshots/one/f")).unwrap(), frozen);

        m.unmount();
        m.mount(&[]);
        let shown = m.status_with("block size:");
        assert!(
            shown.contains(&format!("block size:       {bs}\n")),
            "{shown}"
        );
        assert_eq!(fs::read(m.path("f")).unwrap(), model, "block size {opt}");
        assert_eq!(fs::read(m.path("g")).unwrap(), copy, "block size {opt}");
        assert_eq!(fs::read(m.path(".snapshots/one/f")).unwrap(), frozen);
        m.unmount();
        let out = mount_with(&m, &format!("block_size={other}"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!(
                "has block size {opt}, fixed once it holds anything: block_size={other}"
            )),
            "{err}"
        );
        assert!(!mounted_at(&m.mnt), "a refused mount left {opt} mounted");
        // The store's own size may be spelled out (as an fstab line would).
        m.mount(&[&format!("block_size={bs}")]);
        m.assert_fsck_clean();
    }
    // A store that holds nothing yet (made by a mount without the option) takes the
    // size asked at its next mount; once it holds a file, no other.
    let mut m = Mount::new();
    m.unmount();
    // Not through a read-only mount, which writes nothing.
    let out = mount_with(&m, "ro,block_size=16K");
    assert_eq!(out.status.code(), Some(2));
    m.mount(&["block_size=16K"]);
    let shown = m.status_with("block size:");
    assert!(shown.contains("block size:       16384\n"), "{shown}");
    fs::write(m.path("f"), pattern(5, 100_000)).unwrap();
    m.unmount();
    let out = mount_with(&m, "block_size=64K");
    assert_eq!(out.status.code(), Some(2));
    m.mount(&[]);
    assert_eq!(fs::read(m.path("f")).unwrap(), pattern(5, 100_000));
}

/// `snapfs mount -o OPTS` of `m`'s store at its mountpoint, as it ended.
fn mount_with(m: &Mount, opts: &str) -> std::process::Output {
    snapfs(&[
        "mount",
        "-o",
        opts,
        m.store.to_str().unwrap(),
        m.mnt.to_str().unwrap(),
    ])
}

/// Whether anything is mounted at `p`.
fn mounted_at(p: &Path) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == p.to_str())
}
