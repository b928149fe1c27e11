//! Client-side encryption of a bucket (`--encrypt-key-file`): every object snapfs
//! writes there, but the lock, is sealed with XChaCha20-Poly1305 under a key derived
//! from the key file, so that the bucket holds neither names, nor content, nor the
//! extents' hashes (which would let anyone holding a file confirm it is there).
//!
//! - Whole objects (the root, manifests, pack indexes) are `MAGIC`, a random 24-byte
//!   nonce, and the sealed plaintext: its length (u64, little-endian), the bytes, and
//!   zeros up to a multiple of [`OBJECT_GRAIN`], so that sizes show only to that
//!   grain. The associated data is the object's name under the prefix: an object
//!   moved to another name does not open.
//! - Extents in a pack are sealed one by one (a nonce, then the sealed bytes), with
//!   the pack's name as associated data, so that a restore still reads spans of a pack;
//!   where each is, only the (sealed) index says. A pack is padded with random bytes
//!   to a multiple of [`PACK_GRAIN`].
//!
//! A sealed object that does not open (another key, or damage) is an error naming
//! it; an opened extent is still checked against its hash.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// What a sealed whole object starts with.
pub const MAGIC: &[u8; 8] = b"snapfsE1";

/// Sealed whole objects are padded to a multiple of this many bytes.
pub const OBJECT_GRAIN: usize = 4096;

/// Packs of a sealed bucket are padded to a multiple of this many bytes.
pub const PACK_GRAIN: usize = 256 << 10;

/// Bytes a sealed extent takes beyond its own: the nonce and the tag.
pub const EXTENT_OVERHEAD: usize = 24 + 16;

/// The key of a sealed bucket.
pub struct Seal {
    aead: XChaCha20Poly1305,
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seal(..)")
    }
}

/// Random bytes from the kernel.
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    let mut at = 0;
    while at < N {
        // SAFETY: getrandom into the rest of a local buffer, of its length.
        let n = unsafe { libc::getrandom(b[at..].as_mut_ptr().cast(), N - at, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "getrandom: {e}");
            continue;
        }
        at += n as usize;
    }
    b
}

impl Seal {
    /// The key of key file `path`: at least 32 bytes (say `head -c 32 /dev/urandom`),
    /// readable by its owner alone. The key is derived from all its bytes.
    pub fn from_file(path: &Path) -> Result<Seal, String> {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let shown = path.display();
        // Checked on the file opened, then read from it: no other file in between.
        let f = std::fs::File::open(path).map_err(|e| format!("key file {shown}: {}", e.kind()))?;
        let meta = f
            .metadata()
            .map_err(|e| format!("key file {shown}: {}", e.kind()))?;
        if !meta.is_file() {
            return Err(format!("key file {shown}: not a regular file"));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "key file {shown} can be read by other users (mode {:04o}): chmod 600 it",
                meta.mode() & 0o7777
            ));
        }
        let mut bytes = Vec::new();
        f.take(1 << 20)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("key file {shown}: {}", e.kind()))?;
        if bytes.len() < 32 {
            return Err(format!(
                "key file {shown} holds {} bytes; a key needs at least 32 (head -c 32 /dev/urandom > FILE)",
                bytes.len()
            ));
        }
        Ok(Seal::from_bytes(&bytes))
    }

    /// The key derived from `secret`.
    pub fn from_bytes(secret: &[u8]) -> Seal {
        let key = blake3::derive_key("snapfs 2026-12-04 bucket encryption key", secret);
        Seal {
            aead: XChaCha20Poly1305::new(&key.into()),
        }
    }

    /// A random nonce, then `msg` sealed with associated data `aad` (and its tag).
    fn seal(&self, aad: &str, msg: &[u8], prefix: &[u8]) -> Vec<u8> {
        let nonce = random::<24>();
        let sealed = self
            .aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg,
                    aad: aad.as_bytes(),
                },
            )
            .expect("sealing cannot fail");
        let mut out = Vec::with_capacity(prefix.len() + 24 + sealed.len());
        out.extend_from_slice(prefix);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// What [`Seal::seal`] made of `data` (without its prefix), opened; `None` if it
    /// does not open.
    fn open(&self, aad: &str, data: &[u8]) -> Option<Vec<u8>> {
        if data.len() < EXTENT_OVERHEAD {
            return None;
        }
        let (nonce, sealed) = data.split_at(24);
        self.aead
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: aad.as_bytes(),
                },
            )
            .ok()
    }

    /// Seals a whole object named `name`.
    pub fn seal_object(&self, name: &str, data: &[u8]) -> Vec<u8> {
        let len = 8 + data.len();
        let padded = len.div_ceil(OBJECT_GRAIN) * OBJECT_GRAIN;
        let mut plain = Vec::with_capacity(padded);
        plain.extend_from_slice(&(data.len() as u64).to_le_bytes());
        plain.extend_from_slice(data);
        plain.resize(padded, 0);
        self.seal(name, &plain, MAGIC)
    }

    /// Opens a whole object named `name`; `None` if it does not open (another key,
    /// damaged, or moved from another name).
    pub fn open_object(&self, name: &str, data: &[u8]) -> Option<Vec<u8>> {
        let plain = self.open(name, data.strip_prefix(MAGIC.as_slice())?)?;
        let len = u64::from_le_bytes(plain.get(..8)?.try_into().ok()?);
        let end = usize::try_from(len).ok()?.checked_add(8)?;
        plain.get(8..end).map(<[u8]>::to_vec)
    }

    /// Seals an extent stored in pack `pack`.
    pub fn seal_extent(&self, pack: &str, data: &[u8]) -> Vec<u8> {
        self.seal(pack, data, &[])
    }

    /// Opens an extent of pack `pack`; `None` if it does not open.
    pub fn open_extent(&self, pack: &str, data: &[u8]) -> Option<Vec<u8>> {
        self.open(pack, data)
    }
}

/// Whether `data` is a sealed whole object.
pub fn is_sealed(data: &[u8]) -> bool {
    data.starts_with(MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_opens_with_its_key_and_name_only() {
        let s = Seal::from_bytes(&[7; 32]);
        let sealed = s.seal_object("manifests/a", b"hello");
        assert!(is_sealed(&sealed));
        assert_eq!(sealed.len(), MAGIC.len() + 24 + OBJECT_GRAIN + 16);
        assert_eq!(s.open_object("manifests/a", &sealed).unwrap(), b"hello");
        assert!(s.open_object("manifests/b", &sealed).is_none());
        assert!(
            Seal::from_bytes(&[8; 32])
                .open_object("manifests/a", &sealed)
                .is_none()
        );
        let mut bad = sealed.clone();
        bad[40] ^= 1;
        assert!(s.open_object("manifests/a", &bad).is_none());
        assert!(s.open_object("manifests/a", &sealed[..30]).is_none());
    }

    #[test]
    fn an_extent_opens_in_its_pack_only() {
        let s = Seal::from_bytes(b"0123456789abcdef0123456789abcdef");
        let e = s.seal_extent("packs/x.pack", b"data");
        assert_eq!(e.len(), 4 + EXTENT_OVERHEAD);
        assert_eq!(s.open_extent("packs/x.pack", &e).unwrap(), b"data");
        assert!(s.open_extent("packs/y.pack", &e).is_none());
        assert!(s.open_extent("packs/x.pack", &e[..10]).is_none());
    }
}
