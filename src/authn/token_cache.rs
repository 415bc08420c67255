//! Positive authentication results remembered until the token expires, so a
//! renewal storm with the same tokens costs one check (signature or
//! TokenReview) per token. Keyed by the SHA-256 of the token (plus whatever
//! else the result depends on): tokens themselves are never stored. Bounded.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;

/// Most results remembered per cache.
pub const TOKEN_CACHE_CAPACITY: usize = 16_384;

/// Results of type `V` until their expiry (unix seconds).
pub struct TokenCache<V> {
    entries: Mutex<HashMap<[u8; 32], (V, i64)>>,
    capacity: usize,
}

impl<V: Clone> Default for TokenCache<V> {
    fn default() -> Self {
        Self::with_capacity(TOKEN_CACHE_CAPACITY)
    }
}

impl<V: Clone> TokenCache<V> {
    pub fn with_capacity(capacity: usize) -> Self {
        TokenCache {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// The key of `token` in the context `scope` (e.g. a cluster id), so the
    /// same token reviewed by two clusters is two entries.
    pub fn key(scope: &str, token: &str) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(scope.as_bytes());
        ctx.update(&[0]);
        ctx.update(token.as_bytes());
        let mut k = [0u8; 32];
        k.copy_from_slice(ctx.finish().as_ref());
        k
    }

    pub fn get(&self, key: &[u8; 32], now: i64) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(key)
            .filter(|(_, exp)| *exp > now)
            .map(|(v, _)| v.clone())
    }

    /// Remembers `value` until `exp`. When full, expired entries go first and,
    /// if that is not enough, everything (the next requests re-check).
    pub fn put(&self, key: [u8; 32], value: V, exp: i64, now: i64) {
        if exp <= now {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            entries.retain(|_, (_, e)| *e > now);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(key, (value, exp));
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The `exp` claim of a JWT, read WITHOUT verifying anything: only to bound
/// how long a result that was verified another way may be remembered.
pub fn unverified_expiry(token: &str) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Exp {
        exp: Option<serde_json::Number>,
    }
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let exp: Exp = serde_json::from_slice(&bytes).ok()?;
    exp.exp?.as_i64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_expire_with_their_token() {
        let cache = TokenCache::default();
        let k = TokenCache::<u32>::key("c", "token");
        cache.put(k, 1u32, 100, 50);
        assert_eq!(cache.get(&k, 99), Some(1));
        assert_eq!(cache.get(&k, 100), None, "expired at exp");
        assert_eq!(cache.get(&TokenCache::<u32>::key("c", "other"), 50), None);
        cache.put(TokenCache::<u32>::key("c", "old"), 2, 40, 50);
        assert_eq!(cache.len(), 1, "already expired results are not stored");
    }

    #[test]
    fn the_scope_is_part_of_the_key() {
        assert_ne!(
            TokenCache::<u32>::key("cluster-a", "t"),
            TokenCache::<u32>::key("cluster-b", "t")
        );
        assert_ne!(
            TokenCache::<u32>::key("a", "bc"),
            TokenCache::<u32>::key("ab", "c")
        );
    }

    #[test]
    fn the_cache_stays_bounded() {
        let cache = TokenCache::with_capacity(100);
        for n in 0..250u32 {
            cache.put(TokenCache::<u32>::key("", &n.to_string()), n, 1000, 0);
            assert!(cache.len() <= 100);
        }
        // Expired entries are dropped first.
        let cache = TokenCache::with_capacity(2);
        cache.put(TokenCache::<u32>::key("", "short"), 1, 10, 0);
        cache.put(TokenCache::<u32>::key("", "long"), 2, 1000, 0);
        cache.put(TokenCache::<u32>::key("", "new"), 3, 1000, 20);
        assert_eq!(cache.get(&TokenCache::<u32>::key("", "long"), 20), Some(2));
        assert_eq!(cache.get(&TokenCache::<u32>::key("", "new"), 20), Some(3));
    }

    #[test]
    fn the_expiry_is_read_from_the_unverified_payload() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!(
            "{}.{}.sig",
            b64("{}"),
            b64(r#"{"exp":1700000000,"sub":"x"}"#)
        );
        assert_eq!(unverified_expiry(&token), Some(1_700_000_000));
        for bad in [
            "",
            "onlyone",
            &format!("h.{}.s", b64(r#"{"sub":"x"}"#)),
            &format!("h.{}.s", b64(r#"{"exp":"soon"}"#)),
            &format!("h.{}.s", b64(r#"{"exp":1.5}"#)),
            "h.!!!.s",
        ] {
            assert_eq!(unverified_expiry(bad), None, "{bad}");
        }
    }
}
