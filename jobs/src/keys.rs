//! Secrets: API keys and host tokens. Only a SHA-256 of each is stored.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A freshly minted API key: show `secret` once, store `hash` and `prefix`.
pub struct MintedKey {
    pub secret: String,
    pub prefix: String,
    pub hash: Vec<u8>,
}

/// Mints an API key `hk_<8 hex>_<32 hex>`; the first part is its display prefix.
pub fn mint_api_key() -> MintedKey {
    let secret = format!("hk_{}_{}", random_hex(4), random_hex(16));
    MintedKey {
        prefix: display_prefix(&secret),
        hash: hash_secret(&secret),
        secret,
    }
}

/// The part of a key that is safe to show (`hk_1a2b3c4d`).
pub fn display_prefix(secret: &str) -> String {
    secret.chars().take(11).collect()
}

pub fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Compares two byte strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_keys_are_unique_and_hash_to_what_is_stored() {
        let a = mint_api_key();
        let b = mint_api_key();
        assert_ne!(a.secret, b.secret);
        assert_eq!(hash_secret(&a.secret), a.hash);
        assert!(a.secret.starts_with(&a.prefix));
        assert_eq!(a.prefix.len(), 11);
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
