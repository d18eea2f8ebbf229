//! Encryption at rest: the codec every record-bearing value of the state store passes
//! through.
//!
//! Key hierarchy: a key-encryption key (KEK, 32 bytes from a credential, never stored)
//! wraps one or more data keys (DEKs, 32 random bytes each, stored wrapped in the
//! `keys` table under a `u32` key id). Values are sealed with the current DEK.
//!
//! Sealed value layout: `[version = 1][key id: u32 BE][nonce: 12 bytes][ciphertext + 16-byte tag]`.
//! The AES-256-GCM associated data is the 5-byte header, the table name, a zero byte and
//! the redb encoding of the row's key, so a value moved to another row or table, or a
//! header edited to point at another key, fails authentication.
//!
//! Wrapped DEK layout: `[version = 1][nonce: 12 bytes][ciphertext + tag]` with associated
//! data `concord-dek` + key id, sealed under the KEK.
//!
//! Match-key values are row keys of `match_index`, and keys cannot be sealed (they are
//! looked up by equality), so in an encrypted store they are stored as a blind index:
//! a keyed pseudo-random function of the value (AES-256 CBC-MAC over the length-prefixed
//! value, a PRF for prefix-free inputs) under an index key kept wrapped in `keys` under
//! [`INDEX_KEY_ID`]. Equal values still map to equal index entries, nothing else leaks.
//! The index key is re-wrapped by a KEK change but not replaced by data-key rotation.
//!
//! Nonces are random: one DEK must not seal more than 2^32 values (NIST SP 800-38D 8.3);
//! `concord state rotate-key` starts a new DEK long before that in any realistic store.

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use zeroize::Zeroize;

use super::StateError;

/// Version byte of a sealed value and of a wrapped DEK.
const SEALED_VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 4;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const DEK_AAD: &[u8] = b"concord-dek";

/// Key id under which the blind-index key is stored; data key ids count up from 1.
pub const INDEX_KEY_ID: u32 = u32::MAX;

/// The key-encryption key. Its `Debug` hides the bytes and they are zeroed on drop.
pub struct Kek(SecretBox<[u8; 32]>);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek([redacted])")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KekError {
    #[error("state key must be 64 hexadecimal characters (32 bytes), found {len} characters")]
    Length { len: usize },
    #[error("state key must be 64 hexadecimal characters (32 bytes); it holds a non-hexadecimal character")]
    NotHex,
}

impl Kek {
    /// Parses a secret of 64 hexadecimal characters (`openssl rand -hex 32`).
    pub fn from_secret(secret: &SecretString) -> Result<Kek, KekError> {
        let text = secret.expose_secret().trim();
        if text.len() != 64 {
            return Err(KekError::Length {
                len: text.chars().count(),
            });
        }
        let mut bytes = Box::new([0u8; 32]);
        hex::decode_to_slice(text, bytes.as_mut_slice()).map_err(|_| KekError::NotHex)?;
        Ok(Kek(SecretBox::new(bytes)))
    }

    /// A random key; for benchmarks and tests, where nothing has to read the store again.
    pub fn random() -> Kek {
        let mut bytes = Box::new([0u8; 32]);
        rand::rng().fill_bytes(bytes.as_mut_slice());
        Kek(SecretBox::new(bytes))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new_from_slice(self.0.expose_secret()).expect("a KEK is 32 bytes, the AES-256 key length")
    }
}

/// A fresh random DEK.
pub(crate) fn new_dek() -> SecretBox<[u8; 32]> {
    let mut bytes = Box::new([0u8; 32]);
    rand::rng().fill_bytes(bytes.as_mut_slice());
    SecretBox::new(bytes)
}

fn dek_aad(key_id: u32) -> Vec<u8> {
    let mut aad = DEK_AAD.to_vec();
    aad.extend_from_slice(&key_id.to_be_bytes());
    aad
}

/// Seals a DEK under the KEK.
pub(crate) fn wrap_dek(kek: &Kek, key_id: u32, dek: &SecretBox<[u8; 32]>) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    let sealed = kek
        .cipher()
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: dek.expose_secret(),
                aad: &dek_aad(key_id),
            },
        )
        .expect("AES-GCM encryption of 32 bytes cannot exceed the length limit");
    let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
    out.push(SEALED_VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// Opens a wrapped DEK; a failure means the KEK is not the one that wrapped it.
pub(crate) fn unwrap_dek(kek: &Kek, key_id: u32, wrapped: &[u8]) -> Result<SecretBox<[u8; 32]>, StateError> {
    if wrapped.len() != 1 + NONCE_LEN + 32 + TAG_LEN || wrapped[0] != SEALED_VERSION {
        return Err(StateError::KeyRecord { key_id });
    }
    let nonce = Nonce::from_slice(&wrapped[1..1 + NONCE_LEN]);
    let plain = kek
        .cipher()
        .decrypt(
            nonce,
            Payload {
                msg: &wrapped[1 + NONCE_LEN..],
                aad: &dek_aad(key_id),
            },
        )
        .map_err(|_| StateError::WrongKey)?;
    let mut bytes = Box::new([0u8; 32]);
    bytes.copy_from_slice(&plain);
    let mut plain = plain;
    plain.zeroize();
    Ok(SecretBox::new(bytes))
}

/// The unlocked DEKs of an encrypted store.
pub(crate) struct Keyring {
    /// Key id new values are sealed with.
    pub(crate) current: u32,
    pub(crate) ciphers: BTreeMap<u32, Aes256Gcm>,
}

/// Encodes and decodes stored values: plain JSON for an unencrypted store, sealed JSON
/// for an encrypted one.
pub struct Codec {
    keyring: Option<Keyring>,
    /// Blind-index PRF key; present exactly when `keyring` is.
    index: Option<aes_gcm::aes::Aes256>,
}

impl Codec {
    pub(crate) fn plain() -> Codec {
        Codec {
            keyring: None,
            index: None,
        }
    }

    pub(crate) fn encrypted(
        current: u32,
        deks: &BTreeMap<u32, SecretBox<[u8; 32]>>,
        index_key: &SecretBox<[u8; 32]>,
    ) -> Codec {
        let ciphers = deks
            .iter()
            .map(|(id, dek)| {
                let cipher =
                    Aes256Gcm::new_from_slice(dek.expose_secret()).expect("a DEK is 32 bytes, the AES-256 key length");
                (*id, cipher)
            })
            .collect();
        let index = <aes_gcm::aes::Aes256 as aes_gcm::aes::cipher::KeyInit>::new_from_slice(index_key.expose_secret())
            .expect("an index key is 32 bytes, the AES-256 key length");
        Codec {
            keyring: Some(Keyring { current, ciphers }),
            index: Some(index),
        }
    }

    pub fn is_encrypted(&self) -> bool {
        self.keyring.is_some()
    }

    /// The key id new values are sealed with, when encrypted.
    pub fn current_key_id(&self) -> Option<u32> {
        self.keyring.as_ref().map(|k| k.current)
    }

    /// The form a match-key value takes as a `match_index` key: the value itself when
    /// unencrypted, its blind index (32 hex characters) when encrypted.
    pub(crate) fn blind<'a>(&self, value: &'a str) -> std::borrow::Cow<'a, str> {
        use aes_gcm::aes::cipher::BlockEncrypt;
        let Some(index) = &self.index else {
            return std::borrow::Cow::Borrowed(value);
        };
        let mut state = aes_gcm::aes::Block::default();
        state[..8].copy_from_slice(&(value.len() as u64).to_be_bytes());
        index.encrypt_block(&mut state);
        for chunk in value.as_bytes().chunks(16) {
            for (s, b) in state.iter_mut().zip(chunk) {
                *s ^= b;
            }
            index.encrypt_block(&mut state);
        }
        std::borrow::Cow::Owned(hex::encode(state))
    }

    /// Seals `plain` for row `key` of `table`; returns `plain` unchanged when unencrypted.
    pub(crate) fn seal(&self, table: &'static str, key: &[u8], plain: Vec<u8>) -> Vec<u8> {
        let Some(keyring) = &self.keyring else {
            return plain;
        };
        let cipher = keyring
            .ciphers
            .get(&keyring.current)
            .expect("the keyring holds its current key");
        let mut header = [0u8; HEADER_LEN];
        header[0] = SEALED_VERSION;
        header[1..].copy_from_slice(&keyring.current.to_be_bytes());
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &value_aad(&header, table, key),
                },
            )
            .expect("AES-GCM encrypts any value below 64 GiB");
        let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + sealed.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        let mut plain = plain;
        plain.zeroize();
        out
    }

    /// Opens a stored value of row `key` of `table`.
    pub(crate) fn open<'a>(
        &self,
        table: &'static str,
        key: &[u8],
        stored: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>, StateError> {
        let Some(keyring) = &self.keyring else {
            return Ok(std::borrow::Cow::Borrowed(stored));
        };
        let key_id = sealed_key_id(stored).ok_or(StateError::Tampered { table })?;
        let cipher = keyring
            .ciphers
            .get(&key_id)
            .ok_or(StateError::UnknownKeyId { table, key_id })?;
        let (header, rest) = stored.split_at(HEADER_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &value_aad(header, table, key),
                },
            )
            .map(std::borrow::Cow::Owned)
            .map_err(|_| StateError::Tampered { table })
    }
}

/// The key id of a sealed value, or `None` when the bytes are not a sealed value.
pub(crate) fn sealed_key_id(stored: &[u8]) -> Option<u32> {
    if stored.len() < HEADER_LEN + NONCE_LEN + TAG_LEN || stored[0] != SEALED_VERSION {
        return None;
    }
    Some(u32::from_be_bytes(
        stored[1..HEADER_LEN].try_into().expect("four bytes"),
    ))
}

fn value_aad(header: &[u8], table: &str, key: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + table.len() + 1 + key.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(table.as_bytes());
    aad.push(0);
    aad.extend_from_slice(key);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> Codec {
        let mut deks = BTreeMap::new();
        deks.insert(7, new_dek());
        Codec::encrypted(7, &deks, &new_dek())
    }

    #[test]
    fn sealed_value_round_trips_and_binds_table_and_key() {
        let codec = codec();
        let sealed = codec.seal("records", b"k1", b"{\"email\":\"x\"}".to_vec());
        assert_eq!(sealed_key_id(&sealed), Some(7));
        assert_eq!(&*codec.open("records", b"k1", &sealed).unwrap(), b"{\"email\":\"x\"}");
        assert!(matches!(
            codec.open("records", b"k2", &sealed),
            Err(StateError::Tampered { .. })
        ));
        assert!(matches!(
            codec.open("decisions", b"k1", &sealed),
            Err(StateError::Tampered { .. })
        ));
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(
            codec.open("records", b"k1", &flipped),
            Err(StateError::Tampered { .. })
        ));
        assert!(matches!(
            codec.open("records", b"k1", b"{}"),
            Err(StateError::Tampered { .. })
        ));
    }

    #[test]
    fn blind_index_is_deterministic_keyed_and_hides_the_value() {
        let codec = codec();
        let a = codec.blind("ada@example.com").into_owned();
        assert_eq!(a, codec.blind("ada@example.com"));
        assert_eq!(a.len(), 32);
        // Hex holds no plaintext characters beyond a-f; the plaintext's own hex encoding
        // must not show through either (an 8-digit run would be a 1-in-16^8 accident).
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!a.contains(&hex::encode("ada@example.com")[..8]));
        assert_ne!(a, codec.blind("ada@example.co"));
        assert_ne!(codec.blind(""), codec.blind("\0"));
        assert_ne!(
            a,
            super::Codec::encrypted(7, &BTreeMap::from([(7, new_dek())]), &new_dek()).blind("ada@example.com")
        );
        assert_eq!(Codec::plain().blind("ada@example.com"), "ada@example.com");
    }

    #[test]
    fn kek_parses_hex_only_and_wrong_kek_is_refused() {
        let hex64 = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let kek = Kek::from_secret(&SecretString::from(hex64.to_string())).unwrap();
        assert!(!format!("{kek:?}").contains("0011"));
        assert!(Kek::from_secret(&SecretString::from("abc".to_string())).is_err());
        assert!(Kek::from_secret(&SecretString::from("z".repeat(64))).is_err());
        let dek = new_dek();
        let wrapped = wrap_dek(&kek, 3, &dek);
        assert_eq!(
            unwrap_dek(&kek, 3, &wrapped).unwrap().expose_secret(),
            dek.expose_secret()
        );
        assert!(matches!(
            unwrap_dek(&Kek::random(), 3, &wrapped),
            Err(StateError::WrongKey)
        ));
        assert!(matches!(unwrap_dek(&kek, 4, &wrapped), Err(StateError::WrongKey)));
    }
}
