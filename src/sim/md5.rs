//! The key an AMI client must send after `Challenge`: lowercase hex md5(challenge + secret).
//!
//! The simulator checks keys with the same function the client uses to make them
//! ([`crate::ami::login::md5_key`]), so there is one MD5 in the crate (the `md-5` crate).

use crate::secret::Secret;

/// The login key for `challenge` and `secret`.
pub fn login_key(challenge: &str, secret: &str) -> String {
    crate::ami::login::md5_key(challenge, &Secret::new(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_md5_of_challenge_then_secret_lowercase() {
        // RFC 1321: md5("abc").
        assert_eq!(login_key("", "abc"), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(login_key("ab", "c"), "900150983cd24fb0d6963f7d28e17f72");
    }
}
