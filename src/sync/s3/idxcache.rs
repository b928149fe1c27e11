//! Pack indexes kept on this machine, so that a sync, a restore or a mount reads
//! from the bucket only the indexes it has not read before.
//!
//! A pack index is written once under a random name and never changed, and a
//! bucket's indexes are read whole at the start of every sync: 44 bytes for each
//! extent the bucket holds (about 700 MB for a TiB of 64 KiB extents), in one GET
//! per pack. Kept here, a sync of a few changes costs a listing, not the bucket's
//! whole index again.
//!
//! What is kept is exactly the object as the bucket gave it (sealed, if the bucket
//! is encrypted: opened and checked with the key at every use, as a fresh read is),
//! under `~/.cache/snapfs/buckets/ID.idx/` (ID: blake3 of the endpoint and
//! `s3://BUCKET/PREFIX`), one file per index: the 8 bytes `snapfsC1`, blake3 (32) of
//! what follows it, the length (u32, little-endian) of the tag, the tag, then the
//! object. The tag is the object's size and entity tag as the bucket's listing
//! gives them: a kept copy is used only while the listing still gives the same, so
//! an index replaced in the bucket is read again. A file whose checksum does not
//! match is read again from the bucket (and replaced). The directory is this user's
//! own (mode 0700); one that another user could write is not used.
//! `SNAPFS_S3_INDEX_CACHE=off` turns it off.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

const MAGIC: &[u8; 8] = b"snapfsC1";

/// The indexes kept for one bucket prefix.
pub(super) struct IdxCache {
    dir: PathBuf,
}

impl IdxCache {
    /// The kept indexes of `place` (`s3://BUCKET/PREFIX`) at `endpoint`, under `home`;
    /// `None` (with a warning) when the directory cannot be made or is not this
    /// user's alone.
    pub(super) fn open(home: &std::path::Path, endpoint: &str, place: &str) -> Option<IdxCache> {
        let id = blake3::hash(format!("{endpoint}\n{place}").as_bytes());
        let parent = home.join(".cache/snapfs/buckets");
        let dir = parent.join(format!("{}.idx", &id.to_hex()[..32]));
        let made = std::fs::create_dir_all(&parent).and_then(|()| match std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
        {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            r => r,
        });
        if let Err(e) = made {
            tracing::warn!(error = %e, dir = %dir.display(), "s3: cannot keep pack indexes on this machine");
            return None;
        }
        // A directory another user could write would let them say what the bucket
        // holds: a sync would then leave extents out.
        match std::fs::symlink_metadata(&dir) {
            // SAFETY: geteuid has no preconditions.
            Ok(m)
                if m.is_dir() && m.uid() == unsafe { libc::geteuid() } && m.mode() & 0o022 == 0 => {
            }
            _ => {
                tracing::warn!(dir = %dir.display(), "s3: not keeping pack indexes in a directory that is not this user's alone");
                return None;
            }
        }
        Some(IdxCache { dir })
    }

    fn file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.idx"))
    }

    /// Index `id` as kept, if it was kept with `tag` and is whole.
    pub(super) fn get(&self, id: &str, tag: &str) -> Option<Vec<u8>> {
        let kept = std::fs::read(self.file(id)).ok()?;
        let rest = kept.strip_prefix(MAGIC.as_slice())?;
        let (sum, body) = rest.split_at_checked(32)?;
        if blake3::hash(body).as_bytes() != sum {
            tracing::debug!(id, "s3: a kept pack index is damaged; read again");
            return None;
        }
        let (len, body) = body.split_at_checked(4)?;
        let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
        let (kept_tag, object) = body.split_at_checked(len)?;
        (kept_tag == tag.as_bytes()).then(|| object.to_vec())
    }

    /// Keeps index `id`, as the bucket gave it (`object`) with `tag`. A failure
    /// costs only a read next time.
    pub(super) fn put(&self, id: &str, tag: &str, object: &[u8]) {
        let mut body = Vec::with_capacity(4 + tag.len() + object.len());
        body.extend_from_slice(&(tag.len() as u32).to_le_bytes());
        body.extend_from_slice(tag.as_bytes());
        body.extend_from_slice(object);
        let file = self.file(id);
        let tmp = self.dir.join(format!(".{id}.{}.tmp", std::process::id()));
        let res = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(MAGIC)?;
                f.write_all(blake3::hash(&body).as_bytes())?;
                f.write_all(&body)
            })
            .and_then(|()| std::fs::rename(&tmp, &file));
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(error = %e, "s3: cannot keep a pack index");
        }
    }

    /// Drops what is kept of indexes not among `ids` (the bucket's, as just listed):
    /// their packs were collected.
    pub(super) fn retain(&self, ids: &HashSet<&str>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let keep = name
                .strip_suffix(".idx")
                .is_some_and(|id| !id.starts_with('.') && ids.contains(id));
            if !keep {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_index_is_used_only_whole_and_under_the_same_tag() {
        let home = std::env::temp_dir().join(format!("snapfs-idxcache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        let c = IdxCache::open(&home, "http://e", "s3://b/p").expect("opens");
        assert_eq!(c.get("a", "1 x"), None);
        c.put("a", "1 x", b"index bytes");
        assert_eq!(c.get("a", "1 x").as_deref(), Some(&b"index bytes"[..]));
        // Replaced in the bucket: another tag.
        assert_eq!(c.get("a", "1 y"), None);
        // Damaged here: a byte changed anywhere.
        let f = c.file("a");
        let mut kept = std::fs::read(&f).unwrap();
        for i in 0..kept.len() {
            kept[i] ^= 1;
            std::fs::write(&f, &kept).unwrap();
            assert_eq!(c.get("a", "1 x"), None, "byte {i} flipped");
            kept[i] ^= 1;
        }
        std::fs::write(&f, &kept).unwrap();
        assert!(c.get("a", "1 x").is_some());
        // Another endpoint or prefix keeps its own.
        let other = IdxCache::open(&home, "http://f", "s3://b/p").unwrap();
        assert_eq!(other.get("a", "1 x"), None);
        // Collected packs' indexes go.
        c.put("b", "2 z", b"other");
        c.retain(&["b"].into_iter().collect());
        assert_eq!(c.get("a", "1 x"), None);
        assert!(c.get("b", "2 z").is_some());
        // A directory others may write is not used.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&c.dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(IdxCache::open(&home, "http://e", "s3://b/p").is_none());
        std::fs::remove_dir_all(&home).unwrap();
    }
}
