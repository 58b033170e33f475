//! How callers prove who they are: a bearer token in the `authorization` metadata of every
//! RPC. Nodes keep only [`TokenHash`]es, so a copy of the catalog leaks no usable token.

use serde::{Deserialize, Serialize};

/// gRPC metadata key carrying the token.
pub const METADATA_KEY: &str = "authorization";

/// gRPC metadata key carrying the cluster secret on node-to-node (`Peer`) calls; agents'
/// tokens are never accepted there.
pub const CLUSTER_SECRET_KEY: &str = "x-hashgrid-cluster";

/// The metadata value for `token`.
pub fn bearer_value(token: &str) -> String {
    format!("Bearer {token}")
}

/// The token inside an `authorization` value, if it is a bearer token.
pub fn parse_bearer(value: &str) -> Option<&str> {
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// A BLAKE3 key-derivation hash of a token. Tokens are 256-bit random strings, so a fast hash
/// is enough: there is nothing to brute-force.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        TokenHash(blake3::derive_key(
            "hashgrid 2026 bearer token v1",
            token.as_bytes(),
        ))
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({}..)", hex::encode(&self.0[..4]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_round_trip() {
        assert_eq!(parse_bearer(&bearer_value("abc")), Some("abc"));
        assert_eq!(parse_bearer("Basic abc"), None);
        assert_eq!(parse_bearer("Bearer "), None);
    }

    #[test]
    fn hashes_differ_per_token() {
        assert_eq!(TokenHash::of("a"), TokenHash::of("a"));
        assert_ne!(TokenHash::of("a"), TokenHash::of("b"));
    }
}
