//! The one rule for entry names, applied when decoding every tree object. A name is a single
//! path component: restore joins it to a directory it already holds open, so a name that
//! passes here cannot climb out of the target.

use crate::limits::MAX_NAME_BYTES;
use crate::DecodeError;

pub fn validate_name(name: &[u8]) -> Result<(), DecodeError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name == b"." || name == b".." {
        Some("is . or ..")
    } else if name.contains(&b'/') {
        Some("contains '/'")
    } else if name.contains(&0) {
        Some("contains NUL")
    } else if name.len() > MAX_NAME_BYTES {
        Some("longer than 255 bytes")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(DecodeError::InvalidName {
            name: String::from_utf8_lossy(name).into_owned(),
            reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_and_non_utf8_names() {
        validate_name(b"file.txt").unwrap();
        validate_name(b"...").unwrap();
        validate_name(&[0xff, 0xfe, b'x']).unwrap();
    }

    #[test]
    fn rejects_escapes() {
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"a/b",
            b"/etc",
            b"a\0b",
            &[b'a'; 256],
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
