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
//! object. The tag is the pack's id and the object's size and entity tag as the
//! bucket gave them: a kept copy is used only while the listing still gives the
//! same, so an index replaced in the bucket is read again. A file whose checksum
//! does not match is read again from the bucket (and replaced).
//!
//! The directory is made under `~/.cache/snapfs/buckets` as [`super::keep`] reaches
//! it (never through a link, nor through a directory another user can change), and
//! its files are reached through it alone; only names of the form snapfs writes are
//! ever deleted. It holds a `CACHEDIR.TAG` (the Cache Directory Tagging
//! Specification's), so that backup tools pass it over.
//! `SNAPFS_S3_INDEX_CACHE=off` turns it off.

use std::collections::HashSet;

use super::keep::Dir;

const MAGIC: &[u8; 8] = b"snapfsC1";

/// The largest index kept (a 32 MiB pack of the smallest extents lists fewer).
const MAX_KEPT: u64 = 64 << 20;

/// Free space under which nothing more is kept.
const MIN_FREE: u64 = 1 << 30;

/// The marker of a cache directory (the Cache Directory Tagging Specification's,
/// which backup tools honour).
const TAG_NAME: &str = "CACHEDIR.TAG";
const TAG: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55\n\
# This directory holds pack indexes snapfs read from an S3 bucket: a cache.\n";

/// The indexes kept for one bucket prefix.
pub(super) struct IdxCache {
    dir: Dir,
    /// Whether new indexes may be kept (the filesystem has room).
    room: bool,
}

impl IdxCache {
    /// The kept indexes of `place` (`s3://BUCKET/PREFIX`) at `endpoint`, in
    /// `parent` (`~/.cache/snapfs/buckets`); `None` (with a warning) when the
    /// directory cannot be made or is not this user's alone.
    pub(super) fn open(parent: &Dir, endpoint: &str, place: &str) -> Option<IdxCache> {
        let id = blake3::hash(format!("{endpoint}\n{place}").as_bytes());
        let dir = match parent.sub(&format!("{}.idx", &id.to_hex()[..32]), true) {
            Ok(d) => d,
            Err(why) => {
                tracing::warn!("s3: not keeping pack indexes on this machine: {why}");
                return None;
            }
        };
        if dir
            .read(TAG_NAME, TAG.len() as u64)
            .ok()
            .flatten()
            .as_deref()
            != Some(TAG)
            && let Err(e) = dir.write(TAG_NAME, &[TAG], false)
        {
            tracing::debug!(error = %e, "s3: cannot write {TAG_NAME}");
        }
        let room = dir.free().is_some_and(|f| f >= MIN_FREE);
        Some(IdxCache { dir, room })
    }

    #[cfg(test)]
    fn path(&self) -> &std::path::Path {
        &self.dir.path
    }

    /// Index `id` as kept, if it was kept with `tag` and is whole.
    pub(super) fn get(&self, id: &str, tag: &str) -> Option<Vec<u8>> {
        let kept = self
            .dir
            .read(&format!("{id}.idx"), MAX_KEPT + 4096)
            .ok()??;
        let rest = kept.strip_prefix(MAGIC.as_slice())?;
        let (sum, body) = rest.split_at_checked(32)?;
        if blake3::hash(body).as_bytes() != sum {
            tracing::debug!(id, "s3: a kept pack index is damaged; read again");
            return None;
        }
        let (len, body) = body.split_at_checked(4)?;
        let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
        let (kept_tag, object) = body.split_at_checked(len)?;
        (kept_tag == full_tag(id, tag).as_bytes()).then(|| object.to_vec())
    }

    /// Keeps index `id`, as the bucket gave it (`object`) with `tag`. A failure
    /// costs only a read next time.
    pub(super) fn put(&self, id: &str, tag: &str, object: &[u8]) {
        if !self.room || object.len() as u64 > MAX_KEPT {
            return;
        }
        let tag = full_tag(id, tag);
        let len = (tag.len() as u32).to_le_bytes();
        let mut h = blake3::Hasher::new();
        h.update(&len).update(tag.as_bytes()).update(object);
        let sum = h.finalize();
        if let Err(e) = self.dir.write(
            &format!("{id}.idx"),
            &[MAGIC, sum.as_bytes(), &len, tag.as_bytes(), object],
            false,
        ) {
            tracing::debug!(error = %e, "s3: cannot keep a pack index");
        }
    }

    /// Drops the kept copy of index `id` (it did not open or decode).
    pub(super) fn drop_kept(&self, id: &str) {
        self.dir.unlink(&format!("{id}.idx"));
    }

    /// Drops what is kept of indexes not among `ids` (the bucket's, as just listed):
    /// their packs were collected. Only names snapfs writes go.
    pub(super) fn retain(&self, ids: &HashSet<&str>) {
        for name in self.dir.names() {
            let ours = match name.strip_suffix(".idx") {
                Some(id) => super::is_pack_id(id) && !ids.contains(id),
                // A file left by a writer that stopped before its rename.
                None => name.starts_with('.') && name.ends_with(".tmp") && name.contains(".idx."),
            };
            if ours {
                self.dir.unlink(&name);
            }
        }
    }
}

/// What a kept index is bound to: its pack's id and the bucket's tag of it.
fn full_tag(id: &str, tag: &str) -> String {
    format!("{id} {tag}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn home(name: &str) -> std::path::PathBuf {
        let home =
            std::env::temp_dir().join(format!("snapfs-idxcache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(&home).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
        home
    }

    fn open(home: &Path, endpoint: &str) -> Option<IdxCache> {
        IdxCache::open(&Dir::buckets(home).unwrap(), endpoint, "s3://b/p")
    }

    #[test]
    fn a_kept_index_is_used_only_whole_and_under_the_same_tag() {
        let home = home("tag");
        let c = open(&home, "http://e").expect("opens");
        let dir = c.path().to_path_buf();
        assert_eq!(c.get("a", "1 x"), None);
        c.put("a", "1 x", b"index bytes");
        assert_eq!(c.get("a", "1 x").as_deref(), Some(&b"index bytes"[..]));
        // Replaced in the bucket: another tag.
        assert_eq!(c.get("a", "1 y"), None);
        // Damaged here: a byte changed anywhere.
        let f = dir.join("a.idx");
        let mut kept = std::fs::read(&f).unwrap();
        for i in 0..kept.len() {
            kept[i] ^= 1;
            std::fs::write(&f, &kept).unwrap();
            assert_eq!(c.get("a", "1 x"), None, "byte {i} flipped");
            kept[i] ^= 1;
        }
        std::fs::write(&f, &kept).unwrap();
        assert!(c.get("a", "1 x").is_some());
        // Another pack's copy under this one's name is not believed, tag alike.
        std::fs::copy(&f, dir.join("b.idx")).unwrap();
        assert_eq!(c.get("b", "1 x"), None);
        // Another endpoint or prefix keeps its own.
        let other = open(&home, "http://f").unwrap();
        assert_eq!(other.get("a", "1 x"), None);
        // Collected packs' indexes go, and files left half written; nothing else.
        c.put("b", "2 z", b"other");
        std::fs::write(dir.join(".a.idx.1.2.tmp"), b"half").unwrap();
        std::fs::write(dir.join("notes.txt"), b"not snapfs's").unwrap();
        c.retain(&["b"].into_iter().collect());
        assert_eq!(c.get("a", "1 x"), None);
        assert!(c.get("b", "2 z").is_some());
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["CACHEDIR.TAG", "b.idx", "notes.txt"]);
        // A directory made before it had a CACHEDIR.TAG gets one.
        std::fs::remove_file(dir.join("CACHEDIR.TAG")).unwrap();
        assert!(open(&home, "http://e").is_some());
        assert_eq!(std::fs::read(dir.join("CACHEDIR.TAG")).unwrap(), TAG);
        std::fs::remove_dir_all(&home).unwrap();
    }
}
