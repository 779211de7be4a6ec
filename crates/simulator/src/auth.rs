//! OAuth tokens of the simulated portal: access tokens with a lifetime, refresh tokens with
//! strict rotation (a refresh token works once), one-time authorization codes. Pure: time and
//! randomness are passed in.

use std::collections::{HashMap, HashSet};

/// Lower-case letters and digits, as Bitrix24 tokens and `Random::getString` ids look.
pub fn random_token(rng: &mut fastrand::Rng, len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..len)
        .map(|_| char::from(ALPHABET[rng.usize(..ALPHABET.len())]))
        .collect()
}

/// A freshly issued token pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Issued {
    pub access_token: String,
    pub refresh_token: String,
    /// Unix time the access token expires.
    pub expires: i64,
    pub expires_in: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessCheck {
    Valid,
    Unknown,
    Expired,
}

#[derive(Debug, Clone)]
pub struct TokenStore {
    ttl: f64,
    /// access token → unix expiry
    access: HashMap<String, f64>,
    refresh: HashSet<String>,
    codes: HashSet<String>,
    /// Every token ever issued, access and refresh (tests look for them where they must not be).
    issued: Vec<String>,
}

impl TokenStore {
    pub fn new(ttl_secs: f64) -> TokenStore {
        TokenStore {
            ttl: ttl_secs,
            access: HashMap::new(),
            refresh: HashSet::new(),
            codes: HashSet::new(),
            issued: Vec::new(),
        }
    }

    /// A new pair, as at installation; other pairs stay valid.
    pub fn issue(&mut self, rng: &mut fastrand::Rng, now: f64) -> Issued {
        let access_token = random_token(rng, 32);
        let refresh_token = random_token(rng, 32);
        let expires_at = now + self.ttl;
        self.access.insert(access_token.clone(), expires_at);
        self.refresh.insert(refresh_token.clone());
        self.issued.push(access_token.clone());
        self.issued.push(refresh_token.clone());
        Issued {
            access_token,
            refresh_token,
            expires: expires_at.floor() as i64,
            expires_in: self.ttl.round() as i64,
        }
    }

    pub fn check(&self, access_token: &str, now: f64) -> AccessCheck {
        match self.access.get(access_token) {
            None => AccessCheck::Unknown,
            Some(expires_at) if now >= *expires_at => AccessCheck::Expired,
            Some(_) => AccessCheck::Valid,
        }
    }

    /// `grant_type=refresh_token`: the used refresh token stops working at once.
    pub fn refresh(
        &mut self,
        refresh_token: &str,
        rng: &mut fastrand::Rng,
        now: f64,
    ) -> Option<Issued> {
        if !self.refresh.remove(refresh_token) {
            return None;
        }
        Some(self.issue(rng, now))
    }

    pub fn new_code(&mut self, rng: &mut fastrand::Rng) -> String {
        let code = random_token(rng, 32);
        self.codes.insert(code.clone());
        code
    }

    /// `grant_type=authorization_code`: each code works once.
    pub fn redeem(&mut self, code: &str, rng: &mut fastrand::Rng, now: f64) -> Option<Issued> {
        if !self.codes.remove(code) {
            return None;
        }
        Some(self.issue(rng, now))
    }

    /// Every access and refresh token issued so far.
    pub fn issued(&self) -> &[String] {
        &self.issued
    }

    /// Every access token issued so far is expired from now on.
    pub fn expire_all(&mut self) {
        for expires_at in self.access.values_mut() {
            *expires_at = f64::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_tokens_expire_after_their_ttl() {
        let mut rng = fastrand::Rng::with_seed(1);
        let mut store = TokenStore::new(3600.0);
        let pair = store.issue(&mut rng, 100.0);
        assert_eq!(pair.access_token.len(), 32);
        assert_eq!((pair.expires, pair.expires_in), (3700, 3600));
        assert_eq!(store.check(&pair.access_token, 3699.0), AccessCheck::Valid);
        assert_eq!(
            store.check(&pair.access_token, 3700.0),
            AccessCheck::Expired
        );
        assert_eq!(store.check("nope", 0.0), AccessCheck::Unknown);
    }

    #[test]
    fn refresh_rotates_strictly() {
        let mut rng = fastrand::Rng::with_seed(2);
        let mut store = TokenStore::new(3600.0);
        let first = store.issue(&mut rng, 0.0);
        let second = store
            .refresh(&first.refresh_token, &mut rng, 10.0)
            .expect("valid refresh");
        assert_ne!(second.refresh_token, first.refresh_token);
        assert!(
            store
                .refresh(&first.refresh_token, &mut rng, 11.0)
                .is_none()
        );
        assert!(
            store
                .refresh(&second.refresh_token, &mut rng, 12.0)
                .is_some()
        );
        // The old access token lives until its own expiry.
        assert_eq!(store.check(&first.access_token, 20.0), AccessCheck::Valid);
    }

    #[test]
    fn codes_work_once_and_expire_all_expires_everything_issued() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut store = TokenStore::new(3600.0);
        let code = store.new_code(&mut rng);
        let pair = store.redeem(&code, &mut rng, 0.0).expect("fresh code");
        assert!(store.redeem(&code, &mut rng, 0.0).is_none());
        store.expire_all();
        assert_eq!(store.check(&pair.access_token, 1.0), AccessCheck::Expired);
        let later = store.issue(&mut rng, 1.0);
        assert_eq!(store.check(&later.access_token, 2.0), AccessCheck::Valid);
        // The refresh token still works after the access tokens expired.
        assert!(store.refresh(&pair.refresh_token, &mut rng, 2.0).is_some());
    }
}
