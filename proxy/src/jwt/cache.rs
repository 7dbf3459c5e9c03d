//! Verified tokens, remembered: a client that sends the same token on every request pays a
//! hash and a compare, not a signature check.
//!
//! Bounded (`identity.jwt.cache_entries`, split over shards so threads rarely meet on a
//! lock) and exact: an entry is found by a seeded hash of the token and then compared byte
//! for byte, so two tokens can never share an entry. Only verified tokens are stored (an
//! attacker cannot fill it with forgeries), and an entry is never used at or past its
//! token's `exp`.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use super::Ids;

/// Shards: enough that the worker threads of one machine rarely wait on each other.
const SHARDS: usize = 16;

/// The cache of verified tokens.
#[derive(Debug)]
pub struct TokenCache {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    seed: u64,
}

type Shard = HashMap<u64, Entry, BuildHasherDefault<Prehashed>>;

#[derive(Debug)]
struct Entry {
    token: Box<[u8]>,
    /// The token's `exp` (Unix seconds): the entry is dead from then on.
    exp: u64,
    ids: Arc<Ids>,
}

// === impl TokenCache ===

impl TokenCache {
    /// A cache of at most `entries` tokens (0: nothing is cached).
    pub fn new(entries: usize) -> Self {
        let per_shard = entries.div_ceil(SHARDS);
        let shards = (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect();
        Self {
            shards,
            per_shard,
            seed: seed(),
        }
    }

    /// The identities of `token` if it was verified before and `now` (Unix seconds) is
    /// before its expiry.
    pub fn get(&self, token: &[u8], now: u64) -> Option<Arc<Ids>> {
        if self.per_shard == 0 {
            return None;
        }
        let h = self.hash(token);
        let shard = self.shard(h).lock().unwrap_or_else(|p| p.into_inner());
        let e = shard.get(&h)?;
        (now < e.exp && *e.token == *token).then(|| Arc::clone(&e.ids))
    }

    /// Remember a verified `token` until `exp`. A full shard first drops its expired
    /// entries, then, if still full, an eighth of the rest (arbitrary ones: a bounded cache
    /// of a busy night's tokens, not an LRU).
    pub fn insert(&self, token: &[u8], exp: u64, ids: Arc<Ids>, now: u64) {
        if self.per_shard == 0 || exp <= now {
            return;
        }
        let h = self.hash(token);
        let mut shard = self.shard(h).lock().unwrap_or_else(|p| p.into_inner());
        if shard.len() >= self.per_shard && !shard.contains_key(&h) {
            shard.retain(|_, e| now < e.exp);
            if shard.len() >= self.per_shard {
                let evict: Vec<u64> = shard
                    .keys()
                    .take((self.per_shard / 8).max(1))
                    .copied()
                    .collect();
                for k in evict {
                    shard.remove(&k);
                }
            }
        }
        shard.insert(
            h,
            Entry {
                token: token.into(),
                exp,
                ids,
            },
        );
    }

    /// Tokens held now (for tests and status).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn hash(&self, token: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64_with_seed(token, self.seed)
    }

    fn shard(&self, h: u64) -> &Mutex<Shard> {
        // The high bits pick the shard; the map uses the whole hash.
        &self.shards[(h >> 60) as usize % SHARDS]
    }
}

/// A per-process seed, so which tokens share a shard cannot be planned from outside.
fn seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x7469_6465_6761_7465_u64)
}

/// The map's keys are hashes already: pass them through.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the key is a u64); fold anything else in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(user: &str) -> Arc<Ids> {
        Arc::new(Ids {
            user: Some(http::HeaderValue::from_str(user).unwrap()),
            app: None,
        })
    }

    /// Found exactly (same bytes), never at or past `exp`; an expired token is not stored.
    #[test]
    fn exact_and_never_past_expiry() {
        let c = TokenCache::new(100);
        c.insert(b"tok-a", 1_000, ids("alice"), 500);
        let got = c.get(b"tok-a", 999).expect("cached");
        assert_eq!(got.user.as_ref().unwrap(), "alice");
        assert!(c.get(b"tok-a", 1_000).is_none(), "at exp");
        assert!(c.get(b"tok-b", 600).is_none());
        c.insert(b"tok-old", 400, ids("old"), 500);
        assert!(
            c.get(b"tok-old", 300).is_none(),
            "expired tokens are not stored"
        );
        assert_eq!(c.len(), 1);
    }

    /// Never more than the bound, whatever is inserted; expired entries go first.
    #[test]
    fn bounded() {
        let c = TokenCache::new(64);
        for i in 0..10_000u64 {
            c.insert(format!("tok-{i}").as_bytes(), 10_000 + i, ids("u"), 1);
        }
        assert!(c.len() <= 64, "{}", c.len());
        // The latest token is always kept.
        assert!(c.get(b"tok-9999", 2).is_some());
        let off = TokenCache::new(0);
        off.insert(b"t", 10, ids("u"), 1);
        assert!(off.get(b"t", 2).is_none() && off.is_empty());
    }
}
