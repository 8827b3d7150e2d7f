//! Hashing and hex (core): the one lowercase-hex encoder of the crate and
//! sha256 of bytes, used by the checkpoint reader, the file hashes of
//! [`crate::fsutil`], the cache's settings hash and manifest checksum, and
//! run ids. (The `hex` crate is not in the offline registry this project
//! builds from; the encoder is five lines.)

use sha2::{Digest, Sha256};

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        write!(s, "{b:02x}").expect("writing to a String cannot fail");
    }
    s
}

/// The first 12 characters of a hex hash, to name it in messages and
/// listings (the whole string when shorter; never panics).
pub fn abbrev(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// sha256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sha256_of_abc() {
        assert_eq!(
            super::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(super::hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
