//! Encoding of Raft log entries and state-machine records: a version byte, then postcard.

use serde::de::DeserializeOwned;
use serde::Serialize;

const VERSION: u8 = 1;

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    let mut out = vec![VERSION];
    out.extend(postcard::to_stdvec(value)?);
    Ok(out)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    match bytes.split_first() {
        Some((&VERSION, body)) => postcard::from_bytes(body),
        _ => Err(postcard::Error::DeserializeBadEncoding),
    }
}
